"""SAEs in the formats researchers already have: SAELens, sparsify and dictionary_learning.

- SAELens (``cfg.json`` + ``sae_weights.safetensors``; Gemma Scope, Llama Scope and most
  published SAEs): ``standard`` (ReLU), ``topk`` and ``jumprelu`` load; every saelib SAE of those
  kinds saves (:func:`save_saelens`). Its ``W_enc`` is (d_in, d_sae), saelib's the transpose.
  ``apply_b_dec_to_input=False`` (the encoder reads x, not x - b_dec) is folded into the encoder
  bias, b_enc + b_dec W_enc, so that saelib's formula gives the same codes. TopK's
  ``rescale_acts_by_decoder_norm`` (pre-activations times the decoder norms, codes divided by
  them before decoding) is folded into the weights: encoder and its bias times the norms,
  decoder rows to unit norm. ``normalize_activations`` other than ``none`` needs
  the per-token input scaling saelib's SAEs do not have: refused by name.
  The ``hook_name`` maps to saelib's ``layer`` (the residual stream after that block):
  ``blocks.L.hook_resid_post`` is layer L, ``blocks.L.hook_resid_pre`` layer L - 1; other hooks
  (MLP or attention outputs) are refused by name.
- sparsify (``cfg.json`` + ``sae.safetensors``, ``SparseCoder``) with ``activation: topk``,
  without skip connection or transcoding: a saelib TopK SAE.
- dictionary_learning (``ae.pt`` + ``config.json``, ``AutoEncoderTopK``): a saelib TopK SAE.

:func:`load_any` tells the formats apart (and saelib's own checkpoints) by their files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saelib.io import write_json, write_with
from saelib.saes.base import SAE, load_sae
from saelib.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelib.saes.relu import ReLUConfig, ReLUSAE
from saelib.saes.topk import TopKConfig, TopKSAE

SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
DICTIONARY_LEARNING_CONFIG, DICTIONARY_LEARNING_WEIGHTS = "config.json", "ae.pt"
SAELENS_FORMAT = "6.0.0"  # the cfg.json layout written (SAELens reads older ones as pre-6.0)
RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class FormatError(ValueError):
    """A folder whose SAE saelib cannot read or write in that format (one line, named)."""


def load_any(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """An SAE from a folder in any known format: saelib's own, SAELens, sparsify or
    dictionary_learning."""
    folder = Path(folder)
    if (folder / SAELENS_WEIGHTS).is_file():
        return load_saelens(folder, device)
    if (folder / SPARSIFY_WEIGHTS).is_file() and (folder / SPARSIFY_CONFIG).is_file():
        return load_sparsify(folder, device)
    if (folder / DICTIONARY_LEARNING_WEIGHTS).is_file():
        return load_dictionary_learning(folder, device)
    if (folder / "config.json").is_file():
        return load_sae(folder, device)
    raise FormatError(
        f"{folder}: no SAE found (looked for saelib's config.json, SAELens's {SAELENS_WEIGHTS}, "
        f"sparsify's {SPARSIFY_WEIGHTS} + {SPARSIFY_CONFIG}, dictionary_learning's "
        f"{DICTIONARY_LEARNING_WEIGHTS})"
    )


def weights_file(folder: str | Path) -> Path:
    """The file holding the weights of the SAE in ``folder`` (whatever its format)."""
    folder = Path(folder)
    for name in (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, DICTIONARY_LEARNING_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise FormatError(f"{folder}: no SAE weights found")


# ---------------------------------------------------------------------------------- SAELens


def load_saelens(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """A saelib SAE with the codes and reconstructions of the SAELens SAE in ``folder``."""
    folder = Path(folder)
    config = _read_json(folder / SAELENS_CONFIG)
    weights = {name: value.float() for name, value in load_file(folder / SAELENS_WEIGHTS).items()}
    architecture = config.get("architecture", "standard")
    normalization = config.get("normalize_activations", "none") or "none"
    if normalization != "none":
        raise FormatError(
            f"{folder}: normalize_activations={normalization!r} is not supported (saelib's SAEs "
            "read the residual stream unscaled); fold the scaling into the weights first"
        )
    d_in, d_sae = int(config["d_in"]), int(config["d_sae"])
    W_enc, W_dec, b_enc = weights["W_enc"], weights["W_dec"], weights["b_enc"]
    if not config.get("apply_b_dec_to_input", True):  # saelib's encoder reads x - b_dec
        b_enc = b_enc + weights["b_dec"] @ W_enc
    if architecture == "topk" and config.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1).clamp_min(1e-8)  # pre-activations times the decoder norms
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    sae = _saelens_model(folder, architecture, d_in, d_sae, config)
    state = {
        "W_enc": W_enc.T.contiguous(),
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_dec": weights["b_dec"],
    }
    if architecture == "jumprelu":
        state["threshold"] = weights["threshold"]
    sae.load_state_dict(state, strict=True)
    sae.metadata = _saelens_metadata(folder, config)
    return sae.to(device)


def _saelens_model(folder: Path, architecture: str, d_in: int, d_sae: int, config: dict) -> SAE:
    if architecture == "topk":
        return TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=int(config["k"])))
    if architecture == "standard":
        return ReLUSAE(ReLUConfig(d_in=d_in, d_sae=d_sae))
    if architecture == "jumprelu":
        return JumpReLUSAE(JumpReLUConfig(d_in=d_in, d_sae=d_sae))
    raise FormatError(
        f"{folder}: SAELens architecture {architecture!r} is not supported "
        "(supported: standard, topk, jumprelu)"
    )


def _saelens_metadata(folder: Path, config: dict) -> dict[str, Any]:
    metadata = dict(config.get("metadata") or {})
    hook_name = metadata.get("hook_name") or config.get("hook_name") or config.get("hook_point")
    model_name = metadata.get("model_name") or config.get("model_name")
    found = {"format": "saelens", "source": str(folder)}
    if model_name:
        found["model"] = model_name
    if hook_name:
        found["hook_name"] = hook_name
        found["layer"] = layer_of_hook(hook_name, folder)
    return found


def layer_of_hook(hook_name: str, folder: Path | None = None) -> int:
    """saelib's layer (the residual stream after that block) for a TransformerLens hook name."""
    match = RESID_HOOK.match(hook_name)
    where = f"{folder}: " if folder is not None else ""
    if match is None:
        raise FormatError(
            f"{where}hook_name {hook_name!r} is not a residual-stream hook "
            "(blocks.L.hook_resid_post or blocks.L.hook_resid_pre): saelib reads the residual "
            "stream"
        )
    block, kind = int(match.group(1)), match.group(2)
    if kind == "pre" and block == 0:
        raise FormatError(
            f"{where}hook_name {hook_name!r} reads the embeddings, not a block's output"
        )
    return block if kind == "post" else block - 1


def save_saelens(
    sae: SAE, folder: str | Path, model_name: str | None = None, layer: int | None = None
) -> Path:
    """Write ``sae`` in SAELens's format (``cfg.json`` + ``sae_weights.safetensors``)."""
    folder = Path(folder)
    architecture = _saelens_architecture(sae)
    layer = layer if layer is not None else sae.metadata.get("layer")
    model_name = model_name or sae.metadata.get("model")
    state = {
        "W_enc": sae.W_enc.detach().T.contiguous().cpu().float(),
        "b_enc": sae.b_enc.detach().cpu().float(),
        "W_dec": sae.W_dec.detach().contiguous().cpu().float(),
        "b_dec": sae.b_dec.detach().cpu().float(),
    }
    if architecture == "jumprelu":
        state["threshold"] = sae.threshold.detach().cpu().float()
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT, "exported_by": "saelib"}
    if model_name is not None:
        metadata["model_name"] = model_name
    if layer is not None:
        metadata["hook_name"] = f"blocks.{int(layer)}.hook_resid_post"
    config: dict[str, Any] = {
        "architecture": architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": metadata,
    }  # fmt: skip
    if architecture == "topk":
        config |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    folder.mkdir(parents=True, exist_ok=True)
    write_with(folder / SAELENS_WEIGHTS, lambda path: save_file(state, str(path)))
    write_json(folder / SAELENS_CONFIG, config)
    return folder


def _saelens_architecture(sae: SAE) -> str:
    if isinstance(sae, TopKSAE):
        return "topk"
    if isinstance(sae, JumpReLUSAE):
        return "jumprelu"
    if isinstance(sae, ReLUSAE):
        extras = {"layer_norm": sae.config.layer_norm, "skip": sae.config.skip != "none",
                  "attention": sae.config.attention}  # fmt: skip
        used = [name for name, on in extras.items() if on]
        if used:
            raise FormatError(f"SAELens has no ReLU SAE with {', '.join(used)}: cannot export it")
        return "standard"
    raise FormatError(f"SAELens has no {type(sae).__name__} architecture: cannot export it")


# ------------------------------------------------------------------ sparsify, dictionary_learning


def load_sparsify(folder: str | Path, device: str | torch.device = "cpu") -> TopKSAE:
    """A saelib TopK SAE from a sparsify ``SparseCoder`` folder (TopK, no skip, not a
    transcoder)."""
    folder = Path(folder)
    config = _read_json(folder / SPARSIFY_CONFIG)
    for option, wanted in (
        ("activation", "topk"),
        ("skip_connection", False),
        ("transcode", False),
    ):
        if config.get(option, wanted) != wanted:
            raise FormatError(f"{folder}: sparsify {option}={config[option]!r} is not supported")
    weights = load_file(folder / SPARSIFY_WEIGHTS)
    W_enc = weights["encoder.weight"].float()
    d_sae, d_in = W_enc.shape
    sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=int(config["k"])))
    sae.load_state_dict({
        "W_enc": W_enc, "b_enc": weights["encoder.bias"].float(),
        "W_dec": weights["W_dec"].float(), "b_dec": weights["b_dec"].float(),
    })  # fmt: skip
    sae.metadata = {"format": "sparsify", "source": str(folder)}
    hookpoint = re.fullmatch(r"(?:model\.)?layers\.(\d+)", folder.name)  # sparsify names folders so
    if hookpoint:
        sae.metadata["layer"] = int(hookpoint.group(1))
    return sae.to(device)


def load_dictionary_learning(folder: str | Path, device: str | torch.device = "cpu") -> TopKSAE:
    """A saelib TopK SAE from a dictionary_learning ``AutoEncoderTopK`` folder."""
    folder = Path(folder)
    state = torch.load(folder / DICTIONARY_LEARNING_WEIGHTS, map_location="cpu", weights_only=True)
    if "encoder.weight" not in state or "k" not in state:
        raise FormatError(f"{folder}: {DICTIONARY_LEARNING_WEIGHTS} is not an AutoEncoderTopK")
    W_enc = state["encoder.weight"].float()
    d_sae, d_in = W_enc.shape
    sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=int(state["k"])))
    sae.load_state_dict({
        "W_enc": W_enc, "b_enc": state["encoder.bias"].float(),
        "W_dec": state["decoder.weight"].float().T.contiguous(), "b_dec": state["b_dec"].float(),
    })  # fmt: skip
    sae.metadata = {"format": "dictionary_learning", "source": str(folder)}
    if (folder / DICTIONARY_LEARNING_CONFIG).is_file():  # the trainer's config, when saved
        trainer = _read_json(folder / DICTIONARY_LEARNING_CONFIG).get("trainer", {})
        if "layer" in trainer:  # its submodule's output: the residual stream after that block
            sae.metadata["layer"] = int(trainer["layer"])
        if "lm_name" in trainer:
            sae.metadata["model"] = trainer["lm_name"]
    return sae.to(device)


def save_sparsify(sae: TopKSAE, folder: str | Path) -> Path:
    """Write a TopK SAE as a sparsify ``SparseCoder`` folder."""
    folder = Path(folder)
    _require_topk(sae, "sparsify")
    config = {
        "activation": "topk", "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": True, "num_latents": sae.d_sae, "k": sae.k, "multi_topk": False,
        "skip_connection": False, "transcode": False, "d_in": sae.d_in,
    }  # fmt: skip
    state = {
        "encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }  # fmt: skip
    state = {name: value.detach().cpu().float().contiguous() for name, value in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    write_with(folder / SPARSIFY_WEIGHTS, lambda path: save_file(state, str(path)))
    write_json(folder / SPARSIFY_CONFIG, config)
    return folder


def save_dictionary_learning(sae: TopKSAE, folder: str | Path) -> Path:
    """Write a TopK SAE as a dictionary_learning ``AutoEncoderTopK`` folder."""
    folder = Path(folder)
    _require_topk(sae, "dictionary_learning")
    state = {
        "k": torch.tensor(sae.k, dtype=torch.int), "threshold": torch.tensor(-1.0),
        "decoder.weight": sae.W_dec.detach().T, "encoder.weight": sae.W_enc.detach(),
        "encoder.bias": sae.b_enc.detach(), "b_dec": sae.b_dec.detach(),
    }  # fmt: skip
    state = {name: value.cpu().contiguous() for name, value in state.items()}
    trainer = {"dict_class": "AutoEncoderTopK", "activation_dim": sae.d_in,
               "dict_size": sae.d_sae, "k": sae.k}  # fmt: skip
    if sae.metadata.get("layer") is not None:
        trainer["layer"] = int(sae.metadata["layer"])
    if sae.metadata.get("model") is not None:
        trainer["lm_name"] = sae.metadata["model"]
    folder.mkdir(parents=True, exist_ok=True)
    write_with(folder / DICTIONARY_LEARNING_WEIGHTS, lambda path: torch.save(state, path))
    write_json(folder / DICTIONARY_LEARNING_CONFIG, {"trainer": trainer})
    return folder


def _require_topk(sae: SAE, where: str) -> None:
    if not isinstance(sae, TopKSAE):
        raise FormatError(f"{where} holds TopK SAEs only, not {type(sae).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path} is missing") from None
    except json.JSONDecodeError as error:
        raise FormatError(f"{path} is not valid JSON: {error}") from None
