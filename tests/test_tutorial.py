"""docs/tutorial.ipynb runs top to bottom without an error, and is stored without outputs.

The notebook runs in a fresh Jupyter kernel of this Python (nbclient and ipykernel, in the `test`
extra), in a temporary working folder. Without those packages the run is skipped, except with
CI=true, where it must run."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "tutorial.ipynb"
CELL_TIMEOUT = 300  # seconds for any one cell: a bound for a stuck kernel, far above what a cell needs
MISSING = [name for name in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(name) is None]


def test_the_stored_notebook_has_no_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, "the tutorial has no code cell"
    for number, cell in enumerate(code, 1):
        assert cell.get("outputs") == [], f"code cell {number} is stored with outputs; strip them"
        assert cell.get("execution_count") is None, f"code cell {number} is stored with an execution count"


def test_the_tutorial_runs_top_to_bottom(tmp_path, monkeypatch):
    if MISSING:
        reason = f"the notebook runner is not installed ({', '.join(MISSING)}): pip install 'mnist-vae[test]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the tutorial must run)", pytrace=False)
        pytest.skip(reason)
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # The kernel is this interpreter, whatever other "python3" kernels the machine has installed.
    kernels = tmp_path / "kernels"
    (kernels / "python3").mkdir(parents=True)
    (kernels / "python3" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    for variable, folder in (("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"),
                             ("MPLCONFIGDIR", "matplotlib")):  # nothing written into the user's home
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend
    work = tmp_path / "work"
    work.mkdir()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    manager = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "ELBO by hand" in text and "model.elbo" in text and "largest pixel difference" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 9, "the pictures did not show"
    assert not any(work.iterdir()), "the tutorial left files in its working folder"
