"""Shared fixtures. Tests run offline against ../shared/data."""

from __future__ import annotations

import os

import pytest
import torch
from testutils import GPT2_TOKENIZER, REPO, SHARED_DATA, tiny_gpt2

os.environ.setdefault("LIGHTNING_ROME_DATA", str(SHARED_DATA))
# Trained test models and statistics are cached here between test runs.
os.environ.setdefault("LIGHTNING_ROME_CACHE", str(REPO / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: the suite's models are tiny, and DDP tests run two processes on the
# two cores of CI (with two threads each they oversubscribe it and run ~10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def torch_threads():
    """Every test runs with the suite's thread count (OMP_NUM_THREADS, 1 by default), restored
    after code under test (e.g. the demo) changes it."""
    n = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder with a random 3-layer GPT-2 and the real GPT-2 tokenizer, loadable by name
    through ``from_pretrained`` (the CLI's and the loaders' path)."""
    from lightning_rome.models import load_tokenizer

    d = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2(n_layer=3).save_pretrained(d)
    load_tokenizer(GPT2_TOKENIZER).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def shared_data():
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE tokenizer, from ../shared/data."""
    from lightning_rome.models import load_tokenizer

    return load_tokenizer(GPT2_TOKENIZER)


@pytest.fixture
def tiny_model():
    return tiny_gpt2()
