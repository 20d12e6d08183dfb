"""Typed study parameters, validated before any compute.

Each study declares a dataclass of its parameters. ``parse_params`` turns a mapping (from YAML,
the command line or a notebook's globals) into that dataclass, stopping with a
:class:`ParamsError` that names the problem: an unknown key, a wrong type, an impossible value.
Every message is one line that names the parameter, or the file and line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Hashable, Sequence
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
    """The mapping of a params file; an empty file is refused (it would mean "all defaults")."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ParamsError(_yaml_problem(str(path), error)) from None
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text ({error.reason})") from None
    if data is None:
        raise ParamsError(f"{path}: the file holds no parameters (it is empty or only comments)")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameter names to values")
    names = [key for key in data if not isinstance(key, str)]
    if names:
        raise ParamsError(f"{path}: parameter names must be text, got {names[0]!r}")
    return data


def parse_override(text: str, name: str = "value") -> Any:
    """A command-line value, read as YAML: `5` is an int, `[5, 10]` a list, `abc` a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ParamsError(f"-p {name}: {text!r} is not a valid YAML value: {problem}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(source: str, error: yaml.YAMLError) -> str:
    """``<file>:<line>: <problem>`` from a YAML error (lines counted from 1)."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return f"{source}: {error}"
    message = f"{source}:{mark.line + 1}: {getattr(error, 'problem', None) or error}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        message += f" ({context} started on line {context_mark.line + 1})"
    elif context:
        message += f" ({context})"
    return message


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):  # YAML .nan, .inf
        raise _not_finite(name, value, source)
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
        if isinstance(value, str):  # papermill's -p passes "[2, 8]" as text
            value = _list_from_text(name, value, hint, source)
        if not isinstance(value, list | tuple):
            raise _type_error(name, value, hint, source)
        items = [_coerce(f"{name}[{i}]", item, args[0], source) for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        return _float_from_text(name, value, source)
    if isinstance(hint, type) and isinstance(value, hint) and not _bool_for_number(value, hint):
        return value
    raise _type_error(name, value, hint, source)


def _list_from_text(name: str, value: str, hint: Any, source: str) -> Any:
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise _type_error(name, value, hint, source) from None
    if not isinstance(parsed, list):
        raise _type_error(name, value, hint, source)
    return parsed


def _float_from_text(name: str, value: str, source: str) -> float:
    try:  # YAML reads 1e-3 (no dot) as a string
        number = float(value)
    except ValueError:
        raise _type_error(name, value, float, source) from None
    if not math.isfinite(number):  # float() also reads "nan" and "inf"
        raise _not_finite(name, value, source)
    return number


def _bool_for_number(value: Any, hint: type) -> bool:
    return isinstance(value, bool) and hint in (int, float)


def _not_finite(name: str, value: Any, source: str) -> ParamsError:
    return ParamsError(f"{source}: {name}={value!r} is not a finite number")


def _type_error(name: str, value: Any, hint: Any, source: str) -> ParamsError:
    expected = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return ParamsError(
        f"{source}: {name}={value!r} has type {type(value).__name__}, expected {expected}"
    )


# The checks below are written as "not (value > 0)" and the like: NaN fails every comparison,
# so it is refused rather than let through.


def require_positive(params: Any, *names: str) -> None:
    for name in names:
        if not getattr(params, name) > 0:
            raise ParamsError(f"{name} must be positive, got {getattr(params, name)}")


def require_non_negative(params: Any, *names: str) -> None:
    for name in names:
        if not getattr(params, name) >= 0:
            raise ParamsError(f"{name} must be >= 0, got {getattr(params, name)}")


def require_all_positive(params: Any, *names: str) -> None:
    """Every item of each list field is positive."""
    for name in names:
        values = getattr(params, name)
        bad = [value for value in values if not value > 0]
        if bad:
            raise ParamsError(f"{name} must hold positive values only, got {bad[0]} in {values}")


def require_unique(params: Any, *names: str) -> None:
    """No item of each list (or string) field appears twice."""
    for name in names:
        values = getattr(params, name)
        seen: set = set()
        for value in values:
            if value in seen:
                raise ParamsError(f"{name} holds {value!r} twice: {values}")
            seen.add(value)


def require_non_empty(params: Any, *names: str) -> None:
    for name in names:
        if not getattr(params, name):
            raise ParamsError(f"{name} must not be empty")


def require_choices(params: Any, name: str, known: Sequence[str]) -> None:
    """Every value of the field (a list, or one string) is one of ``known``."""
    value = getattr(params, name)
    unknown = [item for item in ([value] if isinstance(value, str) else value) if item not in known]
    if unknown:
        raise ParamsError(f"{name}: {unknown[0]!r} is not one of {list(known)}")


def require_fraction(params: Any, *names: str) -> None:
    for name in names:
        if not 0 < getattr(params, name) < 1:
            raise ParamsError(f"{name} must lie in (0, 1), got {getattr(params, name)}")


def require_probability(params: Any, *names: str) -> None:
    for name in names:
        if not 0 <= getattr(params, name) <= 1:
            raise ParamsError(f"{name} must lie in [0, 1], got {getattr(params, name)}")


def require_layer_in_model(model: str, layer: int) -> None:
    """The model's config is read (no weights are loaded) to check the layer index."""
    from saelib.activations import check_layer
    from saelib.lm import num_layers

    n_layers = _from_model_config(model, num_layers)
    try:
        check_layer(layer, n_layers, model)
    except ValueError as error:
        raise ParamsError(str(error)) from None


def _from_model_config(model: str, read: Callable[[str], int]) -> int:
    """``read(model)``, with a model whose config cannot be read refused as a params error."""
    from saelib.assets import AssetError

    try:
        return read(model)
    except (OSError, ValueError, AssetError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ParamsError(f"model {model!r}: cannot read its config: {first_line}") from None
