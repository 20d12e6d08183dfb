"""notebooks/feature_explorer.ipynb executed headlessly by papermill on a smoke run.

No browser needed: it lives here to share the smoke run with the browser tests.
"""

from __future__ import annotations

import nbformat
import pytest

from saelib.studies.record import NOTEBOOKS_DIR

pytestmark = pytest.mark.slow

NOTEBOOK = NOTEBOOKS_DIR / "feature_explorer.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_committed_without_outputs_and_with_parameters_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "run_dir = None" in tagged[0].source


def test_explorer_notebook_runs_headless(explorer_notebook_run, smoke_run):
    notebook = nbformat.read(explorer_notebook_run, as_version=4)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    html_outputs = [
        output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {})
    ]
    assert sum('class="saelib-card"' in text for text in html_outputs) == 2  # one block per SAE
    assert any(WIDGET_VIEW in output.get("data", {}) for output in outputs), "the live explorer"
    cached = list(smoke_run.glob("checkpoints/*/feature_stats/stats.json"))
    assert len(cached) >= 2, "statistics are cached beside each checkpoint"
    html = explorer_notebook_run.with_suffix(".html").read_text()
    assert html.count('class="saelib-card"') == 2 * 4  # n_cards per SAE in the HTML render


def test_explorer_notebook_opens_a_saelens_folder(tmp_path):
    import papermill
    import torch

    from saelib.runs.runner import kernel_name
    from saelib.saes import TopKConfig, TopKSAE
    from saelib.saes.formats import save_saelens

    sae = TopKSAE(TopKConfig(d_in=576, d_sae=64, k=4), torch.Generator().manual_seed(0))
    folder = save_saelens(sae, tmp_path / "my_sae", model_name="smollm2-135m", layer=3)
    executed = tmp_path / "explorer.ipynb"
    parameters = {"sae_folder": str(folder), "max_tokens": 300, "n_cards": 2, "device": "cpu"}
    papermill.execute_notebook(
        str(NOTEBOOK), str(executed), parameters=parameters, kernel_name=kernel_name(),
        cwd=str(NOTEBOOK.parent), progress_bar=False,
    )  # fmt: skip
    notebook = nbformat.read(executed, as_version=4)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    texts = "".join(output.get("text", "") for output in outputs)
    assert "(saelens format)" in texts
    html = [
        output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {})
    ]
    assert sum(text.count('class="saelib-card"') for text in html) == 2
    assert any(WIDGET_VIEW in output.get("data", {}) for output in outputs), "the live explorer"
    assert (folder / "feature_stats" / "stats.json").is_file(), "cached beside the SAE"
