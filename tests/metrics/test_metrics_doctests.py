"""The docstring examples of lightning_rome.metrics run and print exactly what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_rome.metrics

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(lightning_rome.metrics.__path__, "lightning_rome.metrics.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
