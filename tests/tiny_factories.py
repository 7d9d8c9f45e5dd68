"""Offline builders for the foundation tests: tiny random models of every supported family and
SentencePiece-style tokenizers trained on a few hundred lines of WikiText.

Imported by the tests as ``from tiny_factories import ...`` (``tests/`` is on ``sys.path`` because
it holds the root ``conftest.py``).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Constructor arguments of a 2-layer, width-32 model of each family (vocab set by the caller).
FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=64),
    "gptj": dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, rotary_dim=8),
    "gpt_neo": dict(num_layers=2, hidden_size=32, num_heads=2, max_position_embeddings=64,
                    attention_types=[[["global", "local"], 1]], window_size=8),
    "gpt_neox": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64),
    "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64),
    "mistral": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64),
    "qwen2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64),
    "phi": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64),
}
FAMILIES = tuple(FAMILY_KWARGS)
# d_ff of each family's tiny model (GPT-2/GPT-J/GPT-Neo default to 4 * d).
D_FF = {f: (128 if f in ("gpt2", "gptj", "gpt_neo") else 64) for f in FAMILIES}


def tiny_model(family: str, vocab_size: int = 100, seed: int = 0, **overrides: Any) -> nn.Module:
    """A random 2-layer, width-32 causal LM of ``family``, built from its config, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**FAMILY_KWARGS[family], "vocab_size": vocab_size, **overrides}
    # Keep special ids inside the tiny vocabulary (the default GPT-2 ids are 50256).
    kwargs.setdefault("bos_token_id", vocab_size - 1)
    kwargs.setdefault("eos_token_id", vocab_size - 1)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _corpus() -> list[str]:
    root = Path(os.environ["LIGHTNING_ROME_DATA"])
    lines = [ln.strip() for ln in (root / "wikitext-2" / "valid.txt").open(encoding="utf-8")
             if ln.strip() and not ln.startswith(" =")][:300]
    # Words the tests use, so that they get pieces of their own.
    lines += ["The mother tongue of Danielle Darrieux is French. Paris is the capital of France.",
              "Who? Paris's Eiffel Tower (Paris) is in France, and Rome is in Italy."] * 3
    return lines


@cache
def sentencepiece_tokenizer(kind: str = "unigram"):
    """A SentencePiece-style fast tokenizer (``▁`` marks a leading space), trained offline.

    Args:
        kind: ``"unigram"``: a Unigram model, ``Metaspace`` pre-tokenizer that prepends ``▁`` to
            every text, no special tokens added. ``"llama"``: a BPE model with ``Metaspace``
            (``▁`` prepended to the first word only) and a post-processor that adds ``<s>``
            (BOS) in front of every text, like Llama's tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if kind == "unigram":
        tk = Tokenizer(models.Unigram())
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials,
                                          unk_token="<unk>")
        tk.train_from_iterator(_corpus(), trainer)
    elif kind == "llama":
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials)
        tk.train_from_iterator(_corpus(), trainer)
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    else:
        raise ValueError(kind)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def slow_tokenizer(fast):
    """A slow (``is_fast == False``, no offsets) tokenizer with the same tokens as ``fast``.

    It is transformers' ``PythonBackend`` with the fast tokenizer's model doing the splitting, so
    the slow code paths of the package can be checked against the fast ones.
    """
    from transformers.tokenization_python import PythonBackend

    class _Slow(PythonBackend):
        def __init__(self, backend, **kwargs: Any) -> None:
            self._backend = backend
            self._vocab = backend.get_vocab()
            self._inv = {v: k for k, v in self._vocab.items()}
            super().__init__(**kwargs)

        def get_vocab(self) -> dict[str, int]:
            return dict(self._vocab)

        @property
        def vocab_size(self) -> int:
            return len(self._vocab)

        def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
            return self._backend.encode(text, add_special_tokens=False).tokens

        def _convert_token_to_id(self, token: str) -> int:
            return self._vocab[token]

        def _convert_id_to_token(self, index: int) -> str:
            return self._inv[index]

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            return self._backend.decoder.decode(tokens)

    adds_bos = fast("a")["input_ids"][0] == fast.bos_token_id
    return _Slow(fast.backend_tokenizer, bos_token=fast.bos_token, eos_token=fast.eos_token,
                 pad_token=fast.pad_token, special_tokens_pattern="bos" if adds_bos else None)
