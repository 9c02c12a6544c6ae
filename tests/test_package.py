"""The package as users import it: its version, and what `import softjax` pulls in."""

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
