"""Loading models and tokenizers by name or path, through ``from_pretrained``."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lightning_rome.models.layout import get_layout

__all__ = ["load_model", "load_tokenizer", "prepare_tokenizer", "resolve_dtype", "resolve_model"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` → ``torch.bfloat16`` (``None`` stays)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (EOS when it has none) for batched scoring. The package pads
    explicitly on the side it needs, so ``padding_side`` is left as the tokenizer has it.

    A GPT-2-style tokenizer saved without its special-token map gets ``<|endoftext|>`` back as
    its BOS and EOS token."""
    if tokenizer.eos_token is None and "<|endoftext|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|endoftext|>"
        if tokenizer.bos_token is None:
            tokenizer.bos_token = "<|endoftext|>"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike[str], **kwargs: Any,
                   ) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` followed by :func:`prepare_tokenizer`."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(name_or_path), **kwargs))


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    layout: Any = None,
    **kwargs: Any,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer with ``from_pretrained``.

    Works with hub names (``"gpt2-xl"``, ``"EleutherAI/gpt-j-6b"``) when online, and with local
    folders (``save_pretrained`` output) offline; set ``HF_HUB_OFFLINE=1`` to be sure nothing is
    fetched.

    Args:
        name_or_path: a hub name or a local folder.
        dtype: ``torch.float32``, ``"bf16"``, ... (default: the checkpoint's).
        device: where to put the model (default: CPU).
        tokenizer: a different tokenizer name or folder (default: the model's).
        layout: an override passed to :func:`get_layout`; the family is checked here so that an
            unsupported model fails at load time with a clear error.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    get_layout(model, layout)
    tok = load_tokenizer(tokenizer or name_or_path)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's embedding has only "
                         f"{model.get_input_embeddings().num_embeddings}: mismatched tokenizer")
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tok


def resolve_model(model: nn.Module | str | os.PathLike[str],
                  tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
                  **kwargs: Any) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Accept a model object or a name/path (as LightningModules built from YAML configs get),
    and a tokenizer object, a name/path, or ``None`` (the model's own, for a name/path)."""
    if isinstance(model, str | os.PathLike):
        loaded, tok = load_model(model, tokenizer=tokenizer if isinstance(
            tokenizer, str | os.PathLike) else None, **kwargs)
        return loaded, tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else tok
    if tokenizer is None:
        raise ValueError("a tokenizer is required when the model is given as an object")
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer)
    return model, prepare_tokenizer(tokenizer)
