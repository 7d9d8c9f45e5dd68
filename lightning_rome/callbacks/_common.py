"""What the callbacks (and the evaluator module) share: the tokenizer they work with, the refusal
of sharded strategies, the noise scale of a trace, and text for the Trainer's loggers."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.tracing.noise import GaussianNoise, UniformNoise, subject_embedding_std

__all__ = ["SHARDED_STRATEGIES", "log_text", "refuse_sharded", "resolve_tokenizer",
           "scaled_noise"]

#: Strategies that shard parameters across ranks: an edit, a revert or a checksum needs every
#: parameter whole on each rank, so these are refused.
SHARDED_STRATEGIES: tuple[type, ...] = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def refuse_sharded(trainer: pl.Trainer, owner: str,
                   reason: str = "edits need the full parameters on each rank") -> None:
    """Raise when the Trainer's strategy shards the parameters (FSDP, DeepSpeed, model
    parallelism), subclasses included.

    Raises:
        MisconfigurationException: naming ``owner``, the strategy and ``reason``.
    """
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise MisconfigurationException(
            f"{owner} does not support sharded strategies ({type(strategy).__name__}): "
            f"{reason}; use DDP or a single device")


def resolve_tokenizer(given: str | os.PathLike[str] | PreTrainedTokenizerBase | None,
                      pl_module: pl.LightningModule, owner: str) -> PreTrainedTokenizerBase:
    """The tokenizer a callback works with: ``given`` (a tokenizer, or the path or hub name of
    one, loaded here), else ``pl_module.tokenizer``.

    Callers keep the loaded tokenizer when ``given`` was a path, so it is loaded once.

    Raises:
        MisconfigurationException: neither gives one.
    """
    tok = given if given is not None else getattr(pl_module, "tokenizer", None)
    if isinstance(tok, str | os.PathLike):
        from lightning_rome.models import load_tokenizer

        tok = load_tokenizer(tok)
    if tok is None:
        raise MisconfigurationException(
            f"{owner} needs a tokenizer: pass tokenizer= or give the LightningModule a "
            "`tokenizer` attribute")
    return tok


def scaled_noise(noise: Any, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 subjects: Sequence[str]) -> Any:
    """``noise`` with its scale fixed for the model as it is now: a Gaussian or uniform noise
    without ``nu`` gets ``nu = k·σ``, ``σ`` the standard deviation of the embeddings of
    ``subjects`` (the noise's own ``subjects`` when it has them), as ROME sets it; any other
    noise is returned as it is."""
    if isinstance(noise, GaussianNoise | UniformNoise) and noise.nu is None:
        over = list(noise.subjects or subjects)
        return type(noise)(nu=noise.k * subject_embedding_std(model, tokenizer, over), k=noise.k)
    return noise


def log_text(loggers: Iterable[Any], tag: str, text: str, step: int) -> int:
    """Write ``text`` (Markdown: TensorBoard renders it) to every logger that takes text (an
    ``experiment`` with ``add_text``, as TensorBoard's has). Returns how many took it."""
    n = 0
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_text", None)):
            experiment.add_text(tag, text, global_step=step)
            n += 1
    return n
