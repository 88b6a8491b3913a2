"""The tutorial notebook runs top to bottom on a CPU, so it cannot rot."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

# Executing the notebook in a fresh kernel takes minutes: left out of the quick loop.
pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "docs", "tutorial.ipynb")


def test_tutorial_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a fresh kernel from this interpreter; any exception in a cell (the notebook asserts its own
    # claims, e.g. AGCAM's IoU above rollout's) fails the test with the cell's traceback
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "| IoU |" in text and "| ABPC |" in text and "share of mass on" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert not [o for o in outputs if o.output_type == "error"]
