"""Shared fixtures. Tests run offline against ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIGHTNING_ROME_DATA", REPO.parent / "shared" / "data"))
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

GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE tokenizer, from ../shared/data."""
    from lightning_rome.models import load_tokenizer

    return load_tokenizer(GPT2_TOKENIZER)


def tiny_gpt2(vocab_size: int = 50257, n_layer: int = 2, n_embd: int = 32, seed: int = 0):
    """A random tiny GPT-2 (for shape and plumbing tests)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=2,
                     n_positions=128, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_gpt2()
