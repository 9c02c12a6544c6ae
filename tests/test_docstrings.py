"""Every example in a softjax docstring runs and prints what it says, as a user would see it.

Each example is self-contained: it runs in an empty namespace (not the module's globals), so
what it imports is what a user pasting it would need. The suite's defaults are a user's
(x64 off, see conftest), so the printed dtypes are the ones a user gets.
"""

import doctest
import importlib
import pkgutil

import pytest

import softjax

# NORMALIZE_WHITESPACE: jax wraps long array reprs at its own width.
FLAGS = doctest.NORMALIZE_WHITESPACE


def modules_with_examples() -> list[str]:
    """The softjax modules whose docstrings hold at least one example."""
    names = []
    for info in pkgutil.walk_packages(softjax.__path__, "softjax."):
        module = importlib.import_module(info.name)
        if any(t.examples for t in doctest.DocTestFinder().find(module, globs={})):
            names.append(info.name)
    return names


MODULES = modules_with_examples()


def test_the_public_functions_have_examples():
    # The finder must see the modules that define the public API (so the test below can
    # fail): at least the softmax family, the losses and the vocabulary op.
    assert {"softjax._softmax", "softjax._losses", "softjax._vocab.api"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = []
    for test in doctest.DocTestFinder().find(module, globs={}):
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted > 0
    assert failed == 0, "".join(report)
