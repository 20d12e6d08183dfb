"""Typed study parameters, validated before any compute.

Each study declares a dataclass of its parameters. ``parse_params`` turns a mapping (from YAML,
the command line or a notebook's globals) into that dataclass, stopping with a
:class:`ParamsError` that names the problem: an unknown key, a wrong type, an impossible value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

P = TypeVar("P")


class ParamsError(ValueError):
    """Invalid study parameters."""


def parse_params(cls: type[P], raw: dict[str, Any], source: str = "params") -> P:
    """Build ``cls`` from ``raw``, checking every key and type; then run ``cls.check()``."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(name, value, hints[name], source) for name, value in raw.items()}
    try:
        params = cls(**values)
    except TypeError as error:  # a required field is missing
        raise ParamsError(f"{source}: {error}") from None
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameter names to values")
    return data


def parse_override(text: str) -> Any:
    """A command-line value, read as YAML: `5` is an int, `[5, 10]` a list, `abc` a string."""
    return yaml.safe_load(text)


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        for option in options:
            try:
                return _coerce(name, value, option, source)
            except ParamsError:
                continue
        raise _type_error(name, value, hint, source)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{source}: {name}={value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _type_error(name, value, hint, source)
        items = [_coerce(f"{name}[{i}]", item, args[0], source) for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and isinstance(value, hint) and not _bool_for_number(value, hint):
        return value
    raise _type_error(name, value, hint, source)


def _bool_for_number(value: Any, hint: type) -> bool:
    return isinstance(value, bool) and hint in (int, float)


def _type_error(name: str, value: Any, hint: Any, source: str) -> ParamsError:
    expected = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return ParamsError(
        f"{source}: {name}={value!r} has type {type(value).__name__}, expected {expected}"
    )


def require_positive(params: Any, *names: str) -> None:
    for name in names:
        if getattr(params, name) <= 0:
            raise ParamsError(f"{name} must be positive, got {getattr(params, name)}")


def require_non_empty(params: Any, *names: str) -> None:
    for name in names:
        if not getattr(params, name):
            raise ParamsError(f"{name} must not be empty")


def require_fraction(params: Any, name: str) -> None:
    if not 0 < getattr(params, name) < 1:
        raise ParamsError(f"{name} must lie in (0, 1), got {getattr(params, name)}")


def require_layer_in_model(model: str, layer: int) -> None:
    """The model's config is read (no weights are loaded) to check the layer index."""
    from saelib.lm import num_layers

    n_layers = num_layers(model)
    if not 0 <= layer < n_layers:
        raise ParamsError(f"layer {layer} is out of range for {model} (layers 0..{n_layers - 1})")
