"""notebooks/clip.ipynb: valid nbformat v4, stored without outputs, and runs top to bottom without an error.

The notebook's own `assert`s compare each library function with a hand-written version, so a wrong answer in
clip.py, simplex.py, tokenizer.py or train.lr_at fails here too. Needs nbclient, nbformat and ipykernel
(requirements-dev.txt).
"""

import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements-dev.txt")
nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt")
pytest.importorskip("ipykernel", reason="pip install -r requirements-dev.txt")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "clip.ipynb")
CELL_TIMEOUT = 240  # s; a hung cell fails with CellTimeoutError naming it, not a stuck test run


def test_valid_and_stored_without_outputs():
    with open(NOTEBOOK, encoding="utf-8") as f:
        raw = json.load(f)
    assert raw["nbformat"] == 4
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    nbformat.validate(nb)  # raises ValidationError on a malformed notebook
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) > 10 and any(c.cell_type == "markdown" for c in nb.cells)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} have stored outputs; clear them before committing"


def test_runs_top_to_bottom(tmp_path, monkeypatch):
    # A kernelspec "python3" that runs this interpreter (not whatever python3 the system or user has registered):
    # JUPYTER_PATH is searched first.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel starts in an unrelated folder and is told where the notebook is, as JupyterLab does, so the
    # notebook must find the repo from its own location rather than from the current directory.
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.setenv("JPY_SESSION_NAME", NOTEBOOK)
    monkeypatch.setenv("CLIP_NOTEBOOK_EPOCHS", "0.5")  # the training cell's 2 minutes -> a few seconds
    # one thread per process: on a busy shared machine, OpenMP threads spinning for a core cost far more than they give
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(work)}})
    km = client.create_kernel_manager()
    assert km.kernel_spec.argv[0] == sys.executable
    t0 = time.time()
    client.execute()  # raises CellExecutionError with the cell's source and traceback on the first failing cell
    elapsed = time.time() - t0

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "exit code 0" in text and "zero-shot top-1" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images == 6  # schedule, batch grid, simplex, stretch, loss curve, similarity matrix
    assert not list(work.iterdir()), "the notebook wrote files into its working directory"
    print(f"notebook ran in {elapsed:.0f} s")
