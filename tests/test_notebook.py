"""experiments/analysis.ipynb executed with nbclient on a synthetic finished run (no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from fake_run import make_fake_run

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "analysis.ipynb"
FIGURES = ["training_curves", "reward_kl_frontier", "overoptimisation", "lengths"]


def _execute(tmp_path, monkeypatch, run_dir: Path) -> nbformat.NotebookNode:
    fig_dir = tmp_path / "figs"
    monkeypatch.setenv("PREFOPT_RUN_DIR", str(run_dir))
    monkeypatch.setenv("PREFOPT_FIG_DIR", str(fig_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("PREFOPT_WANDB_GROUP", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3": jupyter_client starts it with this interpreter (it replaces the spec's bare `python`)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _pngs(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_notebook_executes_and_draws_every_figure(tmp_path, monkeypatch):
    run = make_fake_run(tmp_path / "runs", "fake")
    nb = _execute(tmp_path, monkeypatch, run)
    for name in FIGURES:
        png = tmp_path / "figs" / f"{name}.png"
        assert png.exists() and png.stat().st_size > 5000, name
    assert _pngs(nb) == len(FIGURES)
    text = "".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
                   for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    assert "simpo" in text and "0.51" in text  # the evaluate table's simpo gold score
    assert "PREFOPT_WANDB_GROUP not set" in text


def test_kernel_is_this_environment(tmp_path):
    """The `python3` kernel spec says `python`; jupyter_client must start it with this venv's interpreter."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert Path(nb.cells[0].outputs[0]["text"].strip()) == Path(sys.executable)


def test_notebook_survives_a_run_without_aligners(tmp_path, monkeypatch):
    run = make_fake_run(tmp_path / "runs", "partial", stages=("task", "sft"))
    nb = _execute(tmp_path, monkeypatch, run)
    assert _pngs(nb) == len(FIGURES)
    assert all((tmp_path / "figs" / f"{n}.png").exists() for n in FIGURES)
