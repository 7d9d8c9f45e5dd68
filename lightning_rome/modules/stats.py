"""Second-moment statistics as a Lightning job: one corpus shard per rank, sums all-reduced.

Example (2 GPUs)::

    moments = compute_second_moments_distributed(
        model, tok, [17], corpus="wikitext", n_samples=100_000,
        accelerator="gpu", devices=2, strategy="ddp")
    C = moments["transformer.h.17.mlp.c_proj"].mom2

With the cache on (the default), rank 0 saves the result under the same key that
:func:`~lightning_rome.stats.get_second_moment` uses, so a later ROME edit finds it there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.corpora import TextCorpus, as_corpus
from lightning_rome.stats.cache import (
    load_second_moments,
    save_second_moments,
    stats_key,
    stats_path,
    stats_root,
)
from lightning_rome.stats.collect import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_PASS_COST,
    _hooks,
    _load_one,
    _pad,
    _pad_id,
    accumulate_batch,
    batch_rows,
    default_seq_len,
    iter_token_rows,
    key_dim,
    pass_cost,
    resolve_modules,
)
from lightning_rome.stats.moments import SecondMoment

__all__ = ["SecondMomentModule", "compute_second_moments_distributed"]


class _ShardBatches(IterableDataset):
    """Padded batches of this rank's texts: ``input_ids`` and ``attention_mask`` ``(B, T)`` and
    ``n_texts`` (texts read, including any that gave no tokens)."""

    def __init__(self, corpus: TextCorpus, tokenizer: PreTrainedTokenizerBase, *, seq_len: int,
                 n_samples: int | None, n_tokens: int | None, batch_size: int | None,
                 batch_tokens: int | None, rank: int, world_size: int,
                 cost: float = DEFAULT_PASS_COST) -> None:
        self.corpus, self.tokenizer, self.seq_len = corpus, tokenizer, seq_len
        self.n_samples, self.n_tokens = n_samples, n_tokens
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.rank, self.world_size = rank, world_size
        self.cost = cost  # what a pass costs, against padding (stats.collect.pass_cost)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = iter_token_rows(self.corpus, self.tokenizer, seq_len=self.seq_len,
                               n_samples=self.n_samples, n_tokens=self.n_tokens, rank=self.rank,
                               world_size=self.world_size)
        pad_id = _pad_id(self.tokenizer)
        for batch in batch_rows(rows, batch_size=self.batch_size,
                                batch_tokens=self.batch_tokens, cost=self.cost):
            real = [ids for _, ids in batch if ids]
            if real:
                ids, mask = _pad(real, pad_id, torch.device("cpu"))  # (B, T), (B, T)
            else:
                ids = mask = torch.zeros((0, 0), dtype=torch.long)
            yield {"input_ids": ids, "attention_mask": mask, "n_texts": len(batch)}


class SecondMomentModule(L.LightningModule):
    """Collects ``Σ k kᵀ`` of module inputs with ``Trainer.predict``, sharded across ranks.

    Rank ``r`` of ``W`` reads the corpus texts ``i`` with ``i % W == r`` among the first
    ``n_samples`` (its own :meth:`~lightning_rome.corpora.TextCorpus.shard`); at the end of
    the epoch the float64 sums and counts are all-reduced, so every rank holds the statistics
    of the whole sample in :attr:`results`, equal to a one-process run up to float64 rounding.
    Rank 0 then saves them to the statistics cache (and/or ``output_path``).

    ``predict`` runs under ``torch.inference_mode``, so the tensors in :attr:`results` are
    inference tensors: use ``result.clone()`` (as :func:`compute_second_moments_distributed`
    does) before modifying them in place.

    Tokens per second of every rank are logged (``stats/tokens_per_sec/rank{r}`` in the logger
    and in ``trainer.callback_metrics``) and kept in :attr:`tokens_per_sec` and in each
    result's ``meta["tokens_per_sec_per_rank"]``.

    Args:
        model: the language model.
        tokenizer: its tokenizer.
        layers: block indices or module names.
        corpus: anything :func:`~lightning_rome.corpora.as_corpus` accepts (it must be
            picklable for ``ddp_spawn``: a path, a name, a dataset or a list).
        n_samples: texts to read in total (over all ranks); fewer samples give a cheaper,
            noisier estimate of the same ``C``.
        n_tokens: a global token budget.
        seq_len: truncate texts to this many tokens (default: the model's context).
        batch_size: at most this many texts per forward pass on each rank (``None``: no
            limit).
        batch_tokens: at most this many padded tokens per forward pass; each rank sorts its
            texts by length (in windows) before cutting them into batches, as
            :func:`~lightning_rome.stats.get_second_moments` does.
        dtype: accumulation dtype (float64 or float32).
        part: the layout part for integer layers.
        layout: a layout override.
        cache: ``True`` (default folder), a folder, or ``False``.
        output_path: also save all results to this file (what
            :func:`compute_second_moments_distributed` reads back after ``ddp_spawn``).
        stop_early: run each forward pass only up to the last hooked module.
        data_dir: the local data folder for named corpora.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        layers: Sequence[int | str] | int | str,
        *,
        corpus: Any = "wikitext",
        n_samples: int | None = 100_000,
        n_tokens: int | None = None,
        seq_len: int | None = None,
        batch_size: int | None = None,
        batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
        dtype: torch.dtype = torch.float64,
        part: str = "mlp_out",
        layout: Any = None,
        cache: bool | str | os.PathLike[str] = True,
        output_path: str | os.PathLike[str] | None = None,
        stop_early: bool = True,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"accumulate in torch.float64 or torch.float32, not {dtype}")
        self.model = model
        self.tokenizer = tokenizer
        self.module_names = resolve_modules(model, layers, part=part, layout=layout)
        self.corpus = as_corpus(corpus, data_dir=data_dir)
        self.n_samples, self.n_tokens = n_samples, n_tokens
        self.seq_len = int(seq_len or default_seq_len(model))
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.acc_dtype = dtype
        self.cache = cache
        self.output_path = None if output_path is None else str(output_path)
        self.stop_early = stop_early
        self.results: dict[str, SecondMoment] = {}
        self.tokens_per_sec: list[float] = []
        self._moments: dict[str, SecondMoment] = {}
        self._tokens = 0
        self._n_texts = 0
        self._t0 = 0.0

    @override
    def predict_dataloader(self) -> DataLoader:
        rank, world = (0, 1) if self._trainer is None else (self.global_rank,
                                                            self.trainer.world_size)
        data = _ShardBatches(self.corpus, self.tokenizer, seq_len=self.seq_len,
                             n_samples=self.n_samples, n_tokens=self.n_tokens,
                             batch_size=self.batch_size, batch_tokens=self.batch_tokens,
                             rank=rank, world_size=world,
                             cost=pass_cost(self.model, self.batch_tokens))
        return DataLoader(data, batch_size=None)

    @override
    def on_predict_epoch_start(self) -> None:
        self._moments = {n: SecondMoment.zeros(key_dim(self.model, n), self.acc_dtype,
                                               self.device, module=n)
                         for n in self.module_names}
        self._tokens, self._n_texts = 0, 0
        self._t0 = time.perf_counter()

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, int]:
        """Accumulate one batch; returns its numbers of tokens and texts."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T), (B, T)
        tokens = 0
        if input_ids.numel():
            with _hooks(self.model, self.module_names, self.stop_early) as records:
                tokens = accumulate_batch(self.model, records, self._moments, input_ids, mask)
        self._tokens += tokens
        self._n_texts += int(batch["n_texts"])
        return {"tokens": tokens, "texts": int(batch["n_texts"])}

    def _reduce(self, t: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    @override
    def on_predict_epoch_end(self) -> None:
        elapsed = time.perf_counter() - self._t0
        local_tps = self._tokens / elapsed if elapsed > 0 else 0.0
        for m in self._moments.values():
            m.mom2_sum = self._reduce(m.mom2_sum)  # (d, d), summed over ranks
            if m.k_sum is not None:
                m.k_sum = self._reduce(m.k_sum)  # (d,)
        totals = self._reduce(torch.tensor([self._tokens, self._n_texts], dtype=torch.float64,
                                           device=self.device))  # (2,), exact below 2**53
        count, n_texts = int(totals[0].item()), int(totals[1].item())
        tps = self.all_gather(torch.tensor(local_tps, dtype=torch.float64, device=self.device))
        self.tokens_per_sec = [float(v) for v in tps.reshape(-1).tolist()]
        metrics = {f"stats/tokens_per_sec/rank{r}": v for r, v in enumerate(self.tokens_per_sec)}
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=0)
        rank_zero_info(f"second moments: {count} tokens from {n_texts} texts; tokens/s per rank "
                       f"{[round(v) for v in self.tokens_per_sec]}")
        if count == 0:
            raise ValueError(f"the statistics corpus ({self.corpus.description}) is empty: it "
                             f"gave no tokens from {n_texts} texts")
        if self.n_samples is not None and n_texts < self.n_samples:
            warnings.warn(f"the {self.corpus.description} has only {n_texts} texts, fewer than "
                          f"n_samples={self.n_samples}; using them all", stacklevel=2)
        self.results = {}
        for n, m in self._moments.items():
            meta = dict(m.meta, module=n, seq_len=self.seq_len, corpus=self.corpus.description,
                        dtype=str(self.acc_dtype).removeprefix("torch."),
                        n_samples=self.n_samples, n_tokens=self.n_tokens,
                        world_size=self.trainer.world_size,
                        tokens_per_sec_per_rank=self.tokens_per_sec)
            self.results[n] = SecondMoment(m.mom2_sum.cpu(), count,
                                           None if m.k_sum is None else m.k_sum.cpu(),
                                           n_texts, meta)
        if self.global_rank == 0:
            self._save()
        self.trainer.strategy.barrier("second_moments_saved")

    def cache_keys(self) -> dict[str, dict[str, Any]] | None:
        """The cache key of each module (``None`` when caching is off or impossible)."""
        if self.cache is False or self.corpus.identity is None:
            return None
        return {n: stats_key(self.model, self.tokenizer, n, corpus_id=self.corpus.identity,
                             n_samples=self.n_samples, n_tokens=self.n_tokens,
                             seq_len=self.seq_len, dtype=self.acc_dtype)
                for n in self.module_names}

    def _save(self) -> None:
        keys = self.cache_keys()
        if keys is None and self.cache is not False:
            warnings.warn(f"the {self.corpus.description} has no identity: the statistics are "
                          "not cached", stacklevel=2)
        results = [self.results[n] for n in self.module_names]
        if keys is not None:
            root = stats_root(self.cache)
            for n, m in self.results.items():
                m.meta["key"] = keys[n]
                save_second_moments(stats_path(root, keys[n]), [m], [keys[n]])
        if self.output_path is not None:
            save_second_moments(self.output_path, results,
                                [keys[n] if keys else {"module": n} for n in self.module_names],
                                on_error="raise")  # the file asked for: an error


def compute_second_moments_distributed(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int | str] | int | str,
    *,
    trainer: L.Trainer | None = None,
    corpus: Any = "wikitext",
    n_samples: int | None = 100_000,
    n_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    dtype: torch.dtype = torch.float64,
    part: str = "mlp_out",
    layout: Any = None,
    cache: bool | str | os.PathLike[str] = True,
    recompute: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    **trainer_kwargs: Any,
) -> dict[str, SecondMoment]:
    """Second moments of several modules, computed with ``Trainer.predict`` over all ranks.

    Cached statistics (same keys as :func:`~lightning_rome.stats.get_second_moments`) are
    returned without running anything unless ``recompute``. Otherwise a
    :class:`SecondMomentModule` runs on ``trainer`` (default: a new ``Trainer(logger=False,
    **trainer_kwargs)``, e.g. ``accelerator="gpu", devices=8, strategy="ddp"``), and the
    all-reduced results are returned, also in the main process of ``ddp_spawn``.

    Returns:
        ``{module name: SecondMoment}`` on the CPU; ``meta["tokens_per_sec_per_rank"]`` holds
        the throughput of each rank.
    """
    names = resolve_modules(model, layers, part=part, layout=layout)
    corpus_obj = as_corpus(corpus, data_dir=data_dir)
    module_kwargs = dict(corpus=corpus_obj, n_samples=n_samples, n_tokens=n_tokens,
                         seq_len=seq_len, batch_size=batch_size, batch_tokens=batch_tokens,
                         dtype=dtype, cache=cache)
    out_dir = Path(tempfile.mkdtemp(prefix="lightning_rome_stats_"))
    try:
        module = SecondMomentModule(model, tokenizer, names,
                                    output_path=out_dir / "moments.safetensors",
                                    **module_kwargs)  # type: ignore[arg-type]
        keys = module.cache_keys()
        if keys is not None and not recompute:
            root = stats_root(cache)
            found = {n: _load_one(stats_path(root, keys[n]), keys[n], True, key_dim(model, n))
                     for n in names}
            if all(m is not None for m in found.values()):
                return found  # type: ignore[return-value]
        if trainer is None:
            defaults: dict[str, Any] = dict(logger=False, enable_checkpointing=False,
                                            enable_model_summary=False)
            trainer = L.Trainer(**{**defaults, **trainer_kwargs})
        trainer.predict(module, return_predictions=False)
        if module.results:  # this process took part (single device, or ddp via subprocesses)
            return {n: module.results[n].clone() for n in names}
        loaded = load_second_moments(out_dir / "moments.safetensors", complete=True)
        return dict(zip(names, loaded))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
