"""SAEs across formats, against the real packages: saved by saelib and loaded by SAELens,
sparsify and dictionary_learning (and the reverse) with the same codes and reconstructions."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys

import pytest
import torch

from saelib.saes import JumpReLUConfig, JumpReLUSAE, ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from saelib.saes.formats import (
    FormatError,
    layer_of_hook,
    load_any,
    save_dictionary_learning,
    save_saelens,
    save_sparsify,
)

D_IN, D_SAE = 16, 64


def batch() -> torch.Tensor:
    return torch.randn(50, D_IN, generator=torch.Generator().manual_seed(1)) * 2 + 0.3


def randomized(sae):
    """Every parameter drawn at random (biases non-zero), as a trained SAE's would be."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(D_SAE, generator=generator) * 0.5)
    sae.metadata = {"layer": 3, "model": "smollm2-135m"}
    return sae


def assert_same_outputs(sae, their_outputs, rtol: float = 1e-5) -> None:
    """saelib's codes and reconstructions of a batch equal the other library's
    (``their_outputs(x) -> (codes, reconstruction)``)."""
    x = batch()
    with torch.no_grad():
        output = sae(x)
        their_codes, their_recon = their_outputs(x)
    codes = output.dense()
    assert (codes != 0).any() and (codes == 0).any(), "a code with active and inactive latents"
    torch.testing.assert_close(codes, their_codes, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(output.recon, their_recon, rtol=rtol, atol=1e-5)


def dense_outputs(model):
    """(codes, reconstruction) of a model whose encode gives the dense code (SAELens,
    dictionary_learning)."""
    return lambda x: (model.encode(x), model.decode(model.encode(x)))


# ------------------------------------------------------------------------------------ SAELens


def saelens_config(architecture: str, **fields):
    import sae_lens

    classes = {"topk": sae_lens.TopKSAEConfig, "standard": sae_lens.StandardSAEConfig,
               "jumprelu": sae_lens.JumpReLUSAEConfig}  # fmt: skip
    config = classes[architecture](d_in=D_IN, d_sae=D_SAE, **fields)
    config.metadata.hook_name = "blocks.4.hook_resid_post"
    config.metadata.model_name = "smollm2-135m"
    return config


SAELIB_MODELS = {
    "topk": lambda: TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=6)),
    "standard": lambda: ReLUSAE(ReLUConfig(d_in=D_IN, d_sae=D_SAE)),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUConfig(d_in=D_IN, d_sae=D_SAE)),
}


@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_saelib_saved_saes_load_in_saelens_with_the_same_outputs(architecture, tmp_path):
    from sae_lens import SAE

    sae = randomized(SAELIB_MODELS[architecture]())
    save_saelens(sae, tmp_path)
    theirs = SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == architecture
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert_same_outputs(sae, dense_outputs(theirs))


@pytest.mark.parametrize(
    ("architecture", "fields"),
    [
        ("topk", {"k": 6}),
        ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("jumprelu", {}),
    ],
)
def test_saelens_saes_load_in_saelib_with_the_same_outputs(architecture, fields, tmp_path):
    theirs = randomized(_saelens_model(saelens_config(architecture, **fields)))
    theirs.save_model(tmp_path)
    sae = load_any(tmp_path)
    assert sae.metadata["layer"] == 4 and sae.metadata["model"] == "smollm2-135m"
    assert_same_outputs(sae, dense_outputs(theirs), rtol=1e-4)  # folded weights: rounding


def _saelens_model(config):
    from sae_lens import SAE

    return SAE.get_sae_class_for_architecture(config.architecture())(config)


def test_unsupported_saelens_folders_are_refused_by_name(tmp_path):
    theirs = randomized(_saelens_model(saelens_config("topk", k=6)))
    theirs.save_model(tmp_path)
    stored = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(stored | {"normalize_activations": "layer_norm"}))
    with pytest.raises(FormatError, match="normalize_activations='layer_norm' is not supported"):
        load_any(tmp_path)
    assert layer_of_hook("blocks.7.hook_resid_pre") == 6
    with pytest.raises(FormatError, match="'blocks.2.hook_mlp_out' is not a residual-stream"):
        layer_of_hook("blocks.2.hook_mlp_out")
    with pytest.raises(FormatError, match="SAELens has no ReLU SAE with skip"):
        save_saelens(ReLUSAE(ReLUConfig(d_in=D_IN, d_sae=D_SAE, skip="output")), tmp_path / "x")


# ------------------------------------------------------------------- sparsify, dictionary_learning


def sparsify_module(name: str):
    """``sparsify.<name>`` without the package ``__init__`` (its Trainer import is heavy)."""
    if "sparsify" not in sys.modules:
        spec = importlib.util.find_spec("sparsify")
        sys.modules["sparsify"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"sparsify.{name}")


def sparsify_outputs(coder):
    def outputs(x):
        encoded = coder.encode(x)
        codes = torch.zeros(len(x), coder.num_latents)
        codes.scatter_(1, encoded.top_indices, encoded.top_acts)
        return codes, coder.decode(encoded.top_acts, encoded.top_indices)

    return outputs


def test_sparsify_round_trip(tmp_path):
    sparse_coder = sparsify_module("sparse_coder")
    sae = randomized(TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=6)))
    save_sparsify(sae, tmp_path / "mine")
    assert_same_outputs(
        sae, sparsify_outputs(sparse_coder.SparseCoder.load_from_disk(tmp_path / "mine"))
    )

    config = sparse_coder.SparseCoderConfig(num_latents=D_SAE, k=5)
    coder = randomized(sparse_coder.SparseCoder(D_IN, config, "cpu", dtype=torch.float32))
    coder.save_to_disk(tmp_path / "layers.7")  # sparsify names a hookpoint's folder so
    loaded = load_any(tmp_path / "layers.7")
    assert loaded.k == 5 and loaded.metadata["layer"] == 7
    assert_same_outputs(loaded, sparsify_outputs(coder))


def test_dictionary_learning_round_trip(tmp_path):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    sae = randomized(TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=6)))
    save_dictionary_learning(sae, tmp_path / "mine")
    theirs = AutoEncoderTopK.from_pretrained(str(tmp_path / "mine" / "ae.pt"))
    assert_same_outputs(sae, dense_outputs(theirs))

    ae = randomized(AutoEncoderTopK(D_IN, D_SAE, 5))
    folder = tmp_path / "theirs"
    folder.mkdir()
    torch.save(ae.state_dict(), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"layer": 9, "lm_name": "m"}}))
    loaded = load_any(folder)
    assert loaded.k == 5 and (loaded.metadata["layer"], loaded.metadata["model"]) == (9, "m")
    assert_same_outputs(loaded, dense_outputs(ae))


def test_an_sae_folder_that_does_not_say_its_model_and_layer_needs_them_given(tmp_path):
    from saelib.features.explorer import external_sae

    save_sparsify(randomized(TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=6))), tmp_path / "x")
    with pytest.raises(ValueError, match=r"which \['model', 'layer'\] it reads; pass model= and"):
        external_sae(tmp_path / "x")
    sae = external_sae(tmp_path / "x", model="smollm2-135m", layer=2)
    assert (sae.metadata["model"], sae.metadata["layer"], sae.metadata["format"]) == (
        "smollm2-135m", 2, "sparsify",
    )  # fmt: skip
    with pytest.raises(FormatError, match="no SAE found"):
        load_any(tmp_path)
