"""Helpers for the causal tracing tests: small random models whose outputs depend visibly on
their inputs (a larger initialisation than the default makes the probabilities peaked)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

PROMPT = "The {} is located in the city of"
SUBJECT = "Space Needle"


def peaked_gpt2(n_layer: int = 4, n_embd: int = 32, seed: int = 0,
                attn: str | None = None) -> GPT2LMHeadModel:
    """A random GPT-2 (full GPT-2 vocabulary) with initializer_range 0.3."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50257, n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=64,
                     initializer_range=0.3, bos_token_id=50256, eos_token_id=50256)
    if attn is not None:
        cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg).eval()


def peaked_llama(n_layer: int = 3, seed: int = 0, attn: str | None = None) -> LlamaForCausalLM:
    """A random Llama (grouped-query attention, rotary positions) with the GPT-2 vocabulary."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50257, num_hidden_layers=n_layer, hidden_size=32,
                      intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      initializer_range=0.3, max_position_embeddings=64, bos_token_id=50256,
                      eos_token_id=50256)
    if attn is not None:
        cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def peaked_gptj(n_layer: int = 3, seed: int = 0, attn: str | None = None):
    """A random GPT-J (parallel attention and MLP, partial rotary positions), GPT-2 vocabulary."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    cfg = GPTJConfig(vocab_size=50257, n_layer=n_layer, n_embd=32, n_head=4, rotary_dim=4,
                     n_positions=64, initializer_range=0.3, bos_token_id=50256,
                     eos_token_id=50256)
    if attn is not None:
        cfg._attn_implementation = attn
    return GPTJForCausalLM(cfg).eval()


def peaked_neox(n_layer: int = 3, seed: int = 0, attn: str | None = None):
    """A random GPT-NeoX (parallel residual, partial rotary positions), GPT-2 vocabulary."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=50257, num_hidden_layers=n_layer, hidden_size=32,
                        intermediate_size=64, num_attention_heads=2, initializer_range=0.3,
                        max_position_embeddings=64, bos_token_id=50256, eos_token_id=50256)
    if attn is not None:
        cfg._attn_implementation = attn
    return GPTNeoXForCausalLM(cfg).eval()


def peaked_model(family: str, attn: str | None = None):
    """One of the peaked random models above by family name: gpt2, gptj, neox or llama."""
    makers = {"gpt2": lambda: peaked_gpt2(n_layer=4, attn=attn),
              "gptj": lambda: peaked_gptj(attn=attn), "neox": lambda: peaked_neox(attn=attn),
              "llama": lambda: peaked_llama(n_layer=3, attn=attn)}
    return makers[family]()
