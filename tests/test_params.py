"""Study params are validated before any compute, with errors that name the problem."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from saelib.__main__ import main
from saelib.params import (
    ParamsError,
    load_yaml,
    parse_override,
    parse_params,
    require_all_positive,
    require_fraction,
    require_non_negative,
    require_positive,
)
from saelib.runs.runner import resolve_params
from saelib.studies import STUDIES, common
from saelib.studies.common import available_bytes, training_bytes
from saelib.studies.topk_grid import TopKGridParams

GRID = STUDIES["topk_grid"]
ORTHO = STUDIES["progressive_orthogonality"]


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


@pytest.mark.parametrize(
    ("study", "name", "text", "expected"),
    [
        (GRID, "k_values", "[2, 8]", [2, 8]),  # papermill -p k_values "[2, 8]" passes text
        (GRID, "seeds", "[3]", [3]),
        (GRID, "latent_dims", "[32,64]", [32, 64]),
        (ORTHO, "runs", "[baseline, run1]", ["baseline", "run1"]),
    ],
)
def test_a_list_given_as_text_is_parsed(study, name, text, expected):
    params = resolve_params(study, study.smoke_params, {name: text})
    assert getattr(params, name) == expected


@pytest.mark.parametrize("text", ["[2, 8", "5", "abc", "{k: 2}"])
def test_text_that_is_not_a_list_is_refused_for_a_list_param(text):
    message = f"cli: k_values={text!r} has type str, expected list"
    with pytest.raises(ParamsError, match=f"^{re.escape(message)}$"):
        parse_params(TopKGridParams, {"k_values": text}, source="cli")


def test_the_items_of_a_list_given_as_text_are_checked():
    with pytest.raises(ParamsError, match=r"k_values\[1\]='x' has type str, expected int"):
        parse_params(TopKGridParams, {"k_values": "[2, x]"})


def test_cli_reports_a_bad_param_without_running(tmp_path, capsys):
    code = main(["run", "topk_grid", "-f", str(GRID.smoke_params), "-p", "k_values", "[100]"])
    assert code == 2
    assert "k=100 is larger than latent_dim=32" in capsys.readouterr().err


def test_cli_rejects_an_unknown_study(capsys):
    assert main(["run", "no_such_study"]) == 2
    assert "unknown study 'no_such_study'" in capsys.readouterr().err


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


# ------------------------------------------------------------ refused before any compute


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "-Infinity"])
def test_non_finite_floats_are_refused_by_name(value):
    with pytest.raises(ParamsError, match=rf"^cli: lr={value!r} is not a finite number$"):
        parse_params(TopKGridParams, {"lr": value}, source="cli")


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
def test_yaml_nan_and_inf_in_a_params_file_are_refused(tmp_path, text):
    path = tmp_path / "grid.yaml"
    path.write_text(f"epochs: 2\nauxk_alpha: {text}\n")
    with pytest.raises(ParamsError, match=rf"^{path}: auxk_alpha=(nan|-?inf) is not a finite"):
        resolve_params(GRID, path)


def test_nan_inside_a_list_is_refused_with_its_index():
    with pytest.raises(ParamsError, match=r"k_values\[1\]=nan is not a finite number"):
        parse_params(TopKGridParams, {"k_values": [5, float("nan")]})


@pytest.mark.parametrize(
    "check", [require_positive, require_non_negative, require_all_positive, require_fraction]
)
def test_value_checks_are_not_fooled_by_nan(check):
    nan = float("nan")
    params = SimpleNamespace(x=[1.0, nan] if check is require_all_positive else nan)
    with pytest.raises(ParamsError, match="^x must"):
        check(params, "x")


@pytest.mark.parametrize(
    ("study", "override", "message"),
    [
        (GRID, {"seeds": [0, 1, 1]}, r"^seeds holds 1 twice: \[0, 1, 1\]$"),
        (ORTHO, {"seeds": [3, 3]}, r"^seeds holds 3 twice"),
        (GRID, {"k_values": [2, 8, 2]}, r"^k_values holds 2 twice"),
        (GRID, {"latent_dims": [64, 64]}, r"^latent_dims holds 64 twice"),
        (ORTHO, {"runs": ["baseline", "run1", "baseline"]}, "^runs holds 'baseline' twice"),
        (ORTHO, {"absorption_letters": "abca"}, "^absorption_letters holds 'a' twice"),
        (GRID, {"seeds": [-1]}, r"^seeds must lie in 0..2\*\*64-1, got -1$"),
    ],
)
def test_duplicate_and_impossible_list_entries_are_refused(study, override, message):
    with pytest.raises(ParamsError, match=message):
        resolve_params(study, study.smoke_params, override)


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:", "cuda:x", "cuda0", "tpu", ""])
def test_an_unknown_device_is_refused(device):
    message = rf"^device={device!r} is not one of auto, cpu, cuda, cuda:N, mps$"
    with pytest.raises(ParamsError, match=message):
        resolve_params(GRID, GRID.smoke_params, {"device": device})


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_an_unavailable_cuda_device_is_refused(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = rf"^device='{device}' is not available: torch sees 0 CUDA device\(s\)$"
    with pytest.raises(ParamsError, match=message):
        resolve_params(ORTHO, ORTHO.smoke_params, {"device": device})


def test_a_cuda_index_beyond_the_visible_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ParamsError, match=r"device='cuda:2' is not available: torch sees 2"):
        resolve_params(GRID, GRID.smoke_params, {"device": "cuda:2"})


def test_an_unavailable_mps_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ParamsError, match="^device='mps' is not available"):
        resolve_params(GRID, GRID.smoke_params, {"device": "mps"})


@pytest.mark.parametrize(
    "dataset",
    ["./missing.jsonl", "missing.jsonl.gz", "~/no-such-folder/docs.txt", "/no/such/file.json"],
)
def test_a_missing_dataset_file_is_refused_by_name(dataset):
    with pytest.raises(ParamsError, match=rf"^dataset: file {re.escape(dataset)} does not exist$"):
        resolve_params(GRID, GRID.smoke_params, {"dataset": dataset})


def test_a_missing_file_under_an_existing_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="^dataset: file data/docs does not exist$"):
        resolve_params(ORTHO, ORTHO.smoke_params, {"dataset": "data/docs"})


def test_an_existing_file_of_an_unreadable_kind_is_refused(tmp_path):
    table = tmp_path / "docs.csv"
    table.write_text("text\nhello\n")
    for path in (table, tmp_path):
        with pytest.raises(ParamsError, match=rf"^dataset: {path} is not a .jsonl, .jsonl.gz"):
            resolve_params(GRID, GRID.smoke_params, {"dataset": str(path)})


def test_a_relative_dataset_file_is_accepted_and_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.chdir(tmp_path)
    params = resolve_params(GRID, GRID.smoke_params, {"dataset": "docs.jsonl"})
    assert params.dataset == str(tmp_path / "docs.jsonl")


def test_a_hub_dataset_needs_the_datasets_package(monkeypatch):
    monkeypatch.setattr(common, "_datasets_installed", lambda: False)
    with pytest.raises(ParamsError, match="^dataset='owner/corpus' is neither embedded.*datasets"):
        resolve_params(GRID, GRID.smoke_params, {"dataset": "owner/corpus"})
    monkeypatch.setattr(common, "_datasets_installed", lambda: True)
    assert resolve_params(GRID, GRID.smoke_params, {"dataset": "owner/corpus"}).dataset == (
        "owner/corpus"
    )
    with pytest.raises(ParamsError, match="nor a Hugging Face dataset name"):
        resolve_params(GRID, GRID.smoke_params, {"dataset": "my corpus"})


@pytest.mark.parametrize(
    ("study", "override", "message"),
    [
        (ORTHO, {"core_eval_texts": 0}, "^core_eval_texts must be positive, got 0$"),
        (ORTHO, {"probing_train_per_class": 0}, "^probing_train_per_class must be positive"),
        (ORTHO, {"probing_test_per_class": -2}, "^probing_test_per_class must be positive"),
        (ORTHO, {"absorption_words_per_letter": 1}, "^absorption_words_per_letter must be >= 2"),
        (ORTHO, {"absorption_letters": ""}, "^absorption_letters must not be empty$"),
        (ORTHO, {"absorption_letters": "aB"}, "^absorption_letters must be a-z, got 'aB'$"),
        (ORTHO, {"d_sae": 0}, "^d_sae must be positive, got 0$"),
        (ORTHO, {"k": 0}, "^k=0 must lie in 1..d_sae=64$"),
        (ORTHO, {"dead_after_tokens": 0}, "^dead_after_tokens must be positive"),
        (ORTHO, {"batch_size": 0}, "^batch_size must be positive, got 0$"),
        (ORTHO, {"auxk_alpha": -0.5}, r"^auxk_alpha must be >= 0, got -0.5$"),
        (ORTHO, {"static_weight": -1}, r"^static_weight must be >= 0"),
        (GRID, {"k_values": [0, 2]}, r"^k_values must hold positive values only, got 0"),
        (GRID, {"latent_dims": [32, -64]}, r"^latent_dims must hold positive values only, got -64"),
        (GRID, {"harvest_batch_size": 0}, "^harvest_batch_size must be positive"),
        (GRID, {"max_tokens": 0}, "^max_tokens must be positive"),
        (GRID, {"epochs": 0}, "^epochs must be positive"),
        (GRID, {"dead_after_tokens": -1}, "^dead_after_tokens must be positive"),
    ],
)
def test_count_like_params_must_be_positive(study, override, message):
    with pytest.raises(ParamsError, match=message):
        resolve_params(study, study.smoke_params, override)


def test_training_bytes_counts_weights_adam_state_latents_and_activations():
    # weights 2*10*100 + 2*10*200 = 6000, x4 (grads, two Adam moments); latents 4 * 8 * 200;
    # activations 50 * 10; all float32
    assert training_bytes(10, [100, 200], 8, 50) == 4 * (4 * 6000 + 4 * 8 * 200 + 50 * 10)
    assert training_bytes(10, [100], 1000, 50) == 4 * (4 * 2000 + 4 * 50 * 100 + 50 * 10)


def test_available_memory_is_read_for_the_cpu():
    free, where = available_bytes("cpu")
    assert free is not None and free > 0 and where == "of available memory"


@pytest.mark.parametrize(
    ("study", "override", "name"),
    [(ORTHO, {"d_sae": 10**9}, "d_sae=1000000000"), (GRID, {"latent_dims": [10**9]}, None)],
)
def test_a_latent_size_too_large_for_memory_is_refused(study, override, name):
    name = name or r"latent_dims=\[1000000000\]"
    message = rf"^{name}: training \d+ SAE\(s\) on d_in=576 needs about [\d,.]+ GiB, but only"
    with pytest.raises(ParamsError, match=message):
        resolve_params(study, study.smoke_params, override)


def test_the_memory_check_refuses_exactly_above_what_is_available(monkeypatch):
    smoke = resolve_params(ORTHO, ORTHO.smoke_params)
    n_saes = len(smoke.runs) * len(smoke.seeds)
    needed = training_bytes(576, [smoke.d_sae] * n_saes, smoke.batch_size, smoke.max_tokens)
    monkeypatch.setattr(common, "available_bytes", lambda device: (needed, "free"))
    resolve_params(ORTHO, ORTHO.smoke_params)
    monkeypatch.setattr(common, "available_bytes", lambda device: (needed - 1, "free"))
    with pytest.raises(ParamsError, match=f"^d_sae=64: training {n_saes} SAE"):
        resolve_params(ORTHO, ORTHO.smoke_params)
    activations = 4 * smoke.max_tokens * 576  # they alone do not fit: name max_tokens
    monkeypatch.setattr(common, "available_bytes", lambda device: (activations - 1, "free"))
    with pytest.raises(ParamsError, match="^max_tokens=1500: training"):
        resolve_params(ORTHO, ORTHO.smoke_params)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n"])
def test_an_empty_params_file_is_refused_by_name(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    message = rf"^{path}: the file holds no parameters \(it is empty or only comments\)$"
    with pytest.raises(ParamsError, match=message):
        resolve_params(GRID, path)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("lr: 1.0e-3\nk_values: [5, 10\nseeds: [0]\n", 3, "expected ',' or ']', but got ':'"),
        ("lr: 1.0e-3\nepochs: 2\n  seeds: [0]\n", 3, "mapping values are not allowed here"),
        ("lr: 1.0e-3\n\tepochs: 2\n", 2, "found character '\\t' that cannot start any token"),
        ("lr: 1.0e-3\nepochs: 2\nlr: 0.1\n", 3, "key 'lr' is given twice"),
    ],
)
def test_malformed_yaml_is_refused_with_file_and_line(tmp_path, text, line, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as caught:
        load_yaml(path)
    assert str(caught.value).startswith(f"{path}:{line}: {problem}")
    assert "\n" not in str(caught.value)


def test_a_params_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lr\n- epochs\n")
    with pytest.raises(ParamsError, match="expected a mapping of parameter names to values"):
        load_yaml(path)
    with pytest.raises(ParamsError, match=f"params file {tmp_path} does not exist"):
        load_yaml(tmp_path)


def test_a_malformed_override_is_refused_naming_the_parameter():
    with pytest.raises(ParamsError) as caught:
        parse_override("[5, 10", "k_values")
    assert str(caught.value) == (
        "-p k_values: '[5, 10' is not a valid YAML value: expected ',' or ']', but got "
        "'<stream end>'"
    )
    assert parse_override("[5, 10]", "k_values") == [5, 10]
    assert parse_override("1e-3", "lr") == "1e-3"  # coerced to float by parse_params


def test_cli_prints_one_line_for_a_malformed_override(capsys):
    code = main(["run", "topk_grid", "-p", "k_values", "[5, 10"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: -p k_values: '[5, 10' is not a valid YAML value: expected ',' or ']', but got "
        "'<stream end>'"
    ]
