"""Study params are validated before any compute, with errors that name the problem."""

from __future__ import annotations

import pytest

from saelib.__main__ import main
from saelib.params import ParamsError, parse_params
from saelib.runner import resolve_params
from saelib.studies import STUDIES
from saelib.studies.topk_grid import TopKGridParams

GRID = STUDIES["topk_grid"]


def test_default_and_smoke_params_are_valid():
    defaults = resolve_params(GRID)
    assert defaults.k_values == [5, 10, 20, 100] and defaults.latent_dims == [512, 1024, 2048]
    assert defaults.lr == 1e-3 and defaults.epochs == 25 and defaults.batch_size == 256
    resolve_params(GRID, GRID.smoke_params)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"learning_rate": 0.1}, r"unknown key\(s\) \['learning_rate'\]"),
        ({"epochs": "many"}, "epochs='many' has type str, expected float"),
        ({"k_values": [5, "ten"]}, r"k_values\[1\]='ten'"),
        ({"use_decoder_bias": 1}, "use_decoder_bias=1 has type int, expected bool"),
        ({"positions": "middle"}, "positions='middle' is not one of"),
        ({"k_values": [600], "latent_dims": [512]}, "k=600 is larger than latent_dim=512"),
        ({"layer": 30}, r"layer 30 is out of range for smollm2-135m \(layers 0..29\)"),
        ({"val_fraction": 1.5}, "val_fraction must lie in"),
    ],
)
def test_bad_params_stop_with_a_named_error(override, message):
    with pytest.raises(ParamsError, match=message):
        resolve_params(GRID, GRID.smoke_params, override)


def test_integers_are_accepted_for_floats_and_yaml_exponents_are_read():
    params = parse_params(TopKGridParams, {"lr": "1e-3", "epochs": 3})
    assert params.lr == 1e-3 and isinstance(params.epochs, float)


def test_cli_reports_a_bad_param_without_running(tmp_path, capsys):
    code = main(["run", "topk_grid", "-f", str(GRID.smoke_params), "-p", "k_values", "[100]"])
    assert code == 2
    assert "k=100 is larger than latent_dim=32" in capsys.readouterr().err


def test_cli_rejects_an_unknown_study(capsys):
    assert main(["run", "no_such_study"]) == 2
    assert "unknown study 'no_such_study'" in capsys.readouterr().err


ORTHO = STUDIES["progressive_orthogonality"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"runs": ["baseline", "run8"]}, r"unknown run\(s\) \['run8'\]"),
        ({"k": 100, "d_sae": 64}, "k=100 must lie in 1..d_sae=64"),
        ({"penalty": "weights"}, "penalty='weights' is not one of"),
        ({"static_tau": 0}, "static_tau must be positive"),
        ({"layer": -1}, r"layer -1 is out of range"),
    ],
)
def test_bad_orthogonality_params_stop_with_a_named_error(override, message):
    with pytest.raises(ParamsError, match=message):
        resolve_params(ORTHO, ORTHO.smoke_params, override)
