"""Every notebook runs top to bottom on CPU in a fresh kernel, the way a Colab user runs it:
from a directory outside the checkout, with softjax installed from a wheel (never the
editable source tree), and prints what it teaches. Its install cell is the same in every
notebook and installs this softjax, never the package index's unrelated namesake."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PYPROJECT = (ROOT / "pyproject.toml").read_text()
REPOSITORY = re.search(r'^Repository = "([^"]+)"', PYPROJECT, re.M).group(1)
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)

# notebook, strings its outputs must contain, extra module it needs.
EXPECTED = [
    pytest.param("01_softmax_explained", ["softjax: [0. 0. 0.]"], None, id="01"),
    pytest.param("02_large_vocabulary", ["step 4: loss"], None, id="02"),
    pytest.param(
        "03_attention",
        ["softjax row 3: [0. 0. 0. 0.]  lse: -inf", "softjax grad has NaN: False"],
        None,
        id="03",
    ),
    pytest.param(
        "04_sampling_and_calibration",
        ["ECE before", "conformal", "mean set size", "sparsemax"],
        "sklearn",
        id="04",
    ),
    # The two notebooks that train a language model (80-90 s each here) run under `slow`;
    # the training script they drive is tested by default (tests/test_tiny_lm.py).
    pytest.param(
        "05_train_a_tiny_lm",
        ["ECE before", "NLL before", "below the bigram"],
        "flax",
        id="05",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "06_scoring_and_distillation",
        ["max |log p - float64|", "student held-out: distilled", "S= 4096"],
        "flax",
        id="06",
        marks=pytest.mark.slow,
    ),
]


def check_05(text):
    # The tiny LM must clearly beat the bigram model, and temperature scaling must lower the
    # held-out NLL it minimises (on positions the fit did not see).
    bits = float(re.search(r"held-out: ([0-9.]+) bits per byte", text).group(1))
    bigram = float(re.search(r"bigram ([0-9.]+) bits per byte", text).group(1))
    assert bits < bigram - 0.5, (bits, bigram)
    before, after = map(float, re.search(r"NLL before ([0-9.]+), after ([0-9.]+)", text).groups())
    assert after < before, (before, after)


def check_06(text):
    # Scores are exact, memory flat, the scores give the loss again, distillation lowers its
    # own loss, and the sampled loss's error shrinks as the sample grows.
    for err in re.findall(r"max \|(?:log p|H) - float64\|: ([0-9.e-]+)", text):
        assert float(err) < 1e-5, err
    fused = [float(m) for m in re.findall(r"linear_log_probs +([0-9.]+) MiB", text)]
    assert len(fused) == 3 and fused[-1] <= 1.1 * fused[0], fused
    bits = re.search(r"held-out: ([0-9.]+) bits per byte \(from the loss: ([0-9.]+)\)", text)
    assert abs(float(bits.group(1)) - float(bits.group(2))) < 2e-3, bits.group(0)
    first, last = map(
        float, re.search(r"loss: ([0-9.]+) in the first 10 .*?([0-9.]+) in the", text).groups()
    )
    assert last < first, (first, last)
    errors = [abs(float(e)) for e in re.findall(r"error ([+-][0-9.]+)", text)]
    assert len(errors) == 3 and errors[-1] < errors[0], errors


CHECKS = {"05_train_a_tiny_lm": check_05, "06_scoring_and_distillation": check_06}


def install_cell(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


@pytest.fixture(scope="session")
def wheel_site(tmp_path_factory):
    """``(wheel, site)``: softjax built as a wheel and unpacked into a directory of its own,
    which the notebook kernels put first on their path."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the wheel is made of: builds in the checkout would share its
    # build/ directory with the other test worker's.
    src = tmp / "src"
    shutil.copytree(ROOT / "softjax", src / "softjax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
        check=True,
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("softjax_nn-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    return wheel, site


def test_every_notebook_starts_with_the_same_install_cell():
    cells = {nb.name: install_cell(nb) for nb in NOTEBOOKS}
    assert len(cells) == 6
    first = cells[NOTEBOOKS[0].name]
    assert all(c == first for c in cells.values()), [n for n, c in cells.items() if c != first]
    assert first.startswith("# Installs softjax") and '\nSOFTJAX_SOURCE = ""\n' in first
    assert f'REPOSITORY = "{REPOSITORY}"' in first


def test_readme_has_a_colab_badge_per_notebook_from_the_repository():
    readme = (ROOT / "README.md").read_text()
    slug = REPOSITORY.removeprefix("https://github.com/")
    links = re.findall(r"\(https://colab\.research\.google\.com/github/([^)]+)\)", readme)
    assert links == [f"{slug}/blob/main/notebooks/{nb.name}" for nb in NOTEBOOKS]


def _run_install_cell(tmp_path, namesake=None) -> list:
    """Runs the install cell in a fresh interpreter, with the directory ``namesake`` first on
    the path, and returns the pip commands it issued (recorded; an uninstall takes
    ``namesake`` off the path, an install does nothing: this softjax is importable)."""
    script = tmp_path / "cell.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import json, subprocess, sys
            NAMESAKE = {str(namesake) if namesake else None!r}
            if NAMESAKE:
                sys.path.insert(0, NAMESAKE)
            calls = []

            def check_call(cmd):
                calls.append([str(c) for c in cmd[3:]])  # after [python, -m, pip]
                if cmd[3] == "uninstall":
                    sys.path.remove(NAMESAKE)

            subprocess.check_call = check_call
            """
        )
        + install_cell(NOTEBOOKS[0])
        + "\nprint('CALLS', json.dumps(calls))\n"
    )
    env = {**os.environ, "SOFTJAX_SOURCE": "/wheels/softjax_nn-0.1.0-py3-none-any.whl"}
    out = subprocess.run(
        [sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f"softjax {VERSION} from {ROOT / 'softjax'}" in out.stdout, out.stdout
    return json.loads(out.stdout.split("CALLS ", 1)[1])


def test_install_cell_replaces_the_namesake_and_installs_this_softjax(tmp_path):
    # The index's `softjax` is importable (and has no linear_cross_entropy): the cell removes
    # it, then installs SOFTJAX_SOURCE with the notebooks' extras.
    namesake = tmp_path / "namesake" / "softjax"
    namesake.mkdir(parents=True)
    (namesake / "__init__.py").write_text("relax = None\n")
    calls = _run_install_cell(tmp_path, namesake.parent)
    wheel = "/wheels/softjax_nn-0.1.0-py3-none-any.whl"
    assert calls == [
        ["uninstall", "-q", "-y", "softjax"],
        ["install", "-q", f"{wheel}[notebooks]"],
    ]


def test_install_cell_installs_nothing_when_softjax_is_already_this_one(tmp_path):
    assert _run_install_cell(tmp_path) == []


@pytest.mark.parametrize("name, expected, needs", EXPECTED)
def test_notebook_runs_outside_the_checkout_from_a_wheel(
    name, expected, needs, wheel_site, tmp_path, monkeypatch
):
    if needs is not None:
        pytest.importorskip(needs)
    wheel, site = wheel_site
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("SOFTJAX_SOURCE", str(wheel))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in cells for o in c.get("outputs", []))
    # softjax came from the wheel, and the install cell found it there (installed nothing).
    assert f"softjax {VERSION} from {site / 'softjax'}\n" in text, text[:500]
    for s in expected:
        assert s in text, s
    CHECKS.get(name, lambda text: None)(text)


@pytest.mark.slow
def test_notebook_installs_softjax_into_a_fresh_environment(wheel_site, tmp_path):
    # The Colab situation end to end: a new virtual environment with nothing in it, the
    # install cell pip-installs SOFTJAX_SOURCE (the wheel) with its extras from the index,
    # then the first notebook runs there.
    wheel, _ = wheel_site
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "nbclient", "ipykernel"], check=True)
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import nbclient, nbformat
            nb = nbformat.read({str(NOTEBOOKS[0])!r}, as_version=4)
            nbclient.NotebookClient(nb, timeout=900, kernel_name="python3").execute()
            print("".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])))
            """
        )
    )
    env = {**os.environ, "SOFTJAX_SOURCE": str(wheel), "JAX_PLATFORMS": "cpu"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([python, script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"from {venv}" in out.stdout and "softjax: [0. 0. 0.]" in out.stdout
