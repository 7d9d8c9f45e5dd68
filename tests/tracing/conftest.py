"""Fixtures for the causal tracing tests."""

from __future__ import annotations

import pytest
import torch
from tracing_helpers import peaked_gpt2
from transformers import GPT2LMHeadModel


@pytest.fixture(scope="module")
def gpt2_model() -> GPT2LMHeadModel:
    """A 4-layer random GPT-2 with peaked outputs, shared by the tests of one module."""
    return peaked_gpt2()


@pytest.fixture(autouse=True)
def _one_thread():
    """These tiny models gain nothing from intra-op threads, and on a shared, busy machine
    OpenMP's spinning threads slow them down tenfold; run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
