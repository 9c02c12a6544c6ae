"""The package as users import it: its version, and what `import softjax` pulls in."""

import inspect
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import softjax

ROOT = Path(__file__).parent.parent


def test_version_is_the_installed_distribution_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert softjax.__version__ == version


def test_flax_module_is_an_attribute_loaded_on_first_use():
    code = (
        "import sys, softjax\n"
        "assert 'flax' not in sys.modules, 'import softjax imported flax'\n"
        "assert callable(softjax.flax.make_attention_fn)\n"
        "assert 'softjax.flax' in sys.modules\n"
    )
    env = {"JAX_PLATFORMS": "cpu", "PATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_docstrings_hold_no_latex_for_help():
    # help() shows docstrings raw, so their maths is plain text in literal blocks: a reST
    # math role or a LaTeX command (a backslash before a letter) would read as noise there.
    names = getattr(softjax, "__all__", None) or [n for n in dir(softjax) if n[0] != "_"]
    calibration = softjax.calibration
    objects = {name: getattr(softjax, name) for name in names}
    objects["softjax.calibration"] = calibration
    for name in calibration.__all__:
        obj = getattr(calibration, name)
        if inspect.isfunction(obj):
            objects[f"softjax.calibration.{name}"] = obj
    latex = re.compile(r"\.\. math::|:math:|\\[A-Za-z]")
    bad = [name for name, obj in objects.items() if latex.search(obj.__doc__ or "")]
    assert not bad, bad
    assert "\\" not in pydoc.render_doc(softjax.cross_entropy, renderer=pydoc.plaintext)
