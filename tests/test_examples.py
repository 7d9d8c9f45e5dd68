"""Smoke tests of the examples (offline, on the cached fact-knowing model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.mark.timeout(600)
def test_edit_callback_example_flips_the_fact(capsys):
    import edit_callback

    out = edit_callback.main([])
    assert out["before_new"] < 0.05
    assert out["after_new"] > out["after_true"]
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
