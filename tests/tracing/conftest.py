"""Fixtures for the causal tracing tests."""

from __future__ import annotations

import pytest
from tracing_helpers import peaked_gpt2
from transformers import GPT2LMHeadModel


@pytest.fixture(scope="module")
def gpt2_model() -> GPT2LMHeadModel:
    """A 4-layer random GPT-2 with peaked outputs, shared by the tests of one module."""
    return peaked_gpt2()
