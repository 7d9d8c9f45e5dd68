"""Shared test helpers (import as ``from testutils import ...``; never import ``conftest``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIGHTNING_ROME_DATA", REPO.parent / "shared" / "data"))
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"


def tiny_gpt2(vocab_size: int = 50257, n_layer: int = 2, n_embd: int = 32, seed: int = 0):
    """A random tiny GPT-2 (for shape and plumbing tests)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=2,
                     n_positions=128, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(cfg).eval()
