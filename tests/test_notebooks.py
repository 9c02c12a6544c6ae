"""Every notebook runs top to bottom on CPU in a fresh kernel and prints what it teaches."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]

# notebook, strings its outputs must contain, extra module it needs; the heavier ones are slow.
NOTEBOOKS = [
    pytest.param("01_softmax_explained", ["softjax: [0. 0. 0.]"], None, id="01"),
    pytest.param("02_large_vocabulary", ["step 4: loss"], None, id="02"),
    pytest.param(
        "03_attention",
        ["softjax row 3: [0. 0. 0. 0.]  lse: -inf", "softjax grad has NaN: False"],
        None,
        id="03",
        marks=pytest.mark.slow,  # ~50 s
    ),
    pytest.param(
        "04_sampling_and_calibration",
        ["ECE before", "sparsemax"],
        "sklearn",
        id="04",
        marks=pytest.mark.slow,  # ~45 s
    ),
    pytest.param(
        "05_train_a_tiny_lm",
        ["ECE before", "bits per byte"],
        None,
        id="05",
        marks=pytest.mark.slow,  # ~75 s (150 training steps)
    ),
]


@pytest.mark.parametrize("name, expected, needs", NOTEBOOKS)
def test_notebook_runs(name, expected, needs, monkeypatch):
    if needs is not None:
        pytest.importorskip(needs)
    # The kernel imports this checkout's softjax (and bench), whatever else is installed.
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), path) if p))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in cells for o in c.get("outputs", []))
    for s in expected:
        assert s in text, s
