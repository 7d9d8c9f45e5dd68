"""``CausalTracer``: causal tracing of a dataset of facts with ``Trainer.predict`` or ``test``.

Each rank traces its shard of the prompts; at the end of the epoch the per-prompt class effects
are gathered from every rank, de-duplicated (samplers pad shards by repeating prompts), and
averaged into one :class:`~lightning_rome.tracing.aggregate.TraceAggregate` per kind, identical
on every rank.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.tracing.aggregate import (
    LAST_SUBJECT,
    TraceAggregate,
    aggregate_effects,
    class_effects,
)
from lightning_rome.tracing.core import DEFAULT_BATCH_TOKENS, parse_spec, trace_all
from lightning_rome.tracing.noise import (
    GaussianNoise,
    NoiseLike,
    SubjectReplacement,
    UniformNoise,
    resolve_noise,
    subject_embedding_std,
)
from lightning_rome.tracing.result import KINDS, CausalTrace

__all__ = ["CausalTracer", "FactRecord", "fact_records", "prompt_seed"]

_PROMPT_KEYS = ("prompt", "template")
_ANSWER_KEYS = ("attribute", "target_true", "answer", "object")
_ID_KEYS = ("known_id", "case_id")


@dataclass(frozen=True)
class FactRecord:
    """A prompt to trace: ``prompt`` (full text or template), ``subject``, an optional
    expected ``answer``, and the record's id (``known_id`` / ``case_id``) if it has one."""

    prompt: str
    subject: str
    answer: str | None = None
    record_id: int | str | None = None


def _field(record: Any, keys: Sequence[str]) -> Any:
    for k in keys:
        v = record.get(k) if isinstance(record, Mapping) else getattr(record, k, None)
        if v is not None:
            return v
    return None


def _one(record: Any) -> FactRecord:
    prompt, subject = _field(record, _PROMPT_KEYS), _field(record, ("subject",))
    answer = _field(record, _ANSWER_KEYS)
    if isinstance(answer, Mapping):  # ROME's {"str": ..., "id": ...}
        answer = answer.get("str")
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise ValueError(f"a fact record needs string 'prompt' and 'subject' fields, got "
                         f"{record!r}")
    rid = _field(record, _ID_KEYS)
    if hasattr(rid, "item"):  # a collated tensor element
        rid = rid.item()
    return FactRecord(prompt, subject, answer if isinstance(answer, str) else None,
                      rid if isinstance(rid, int | str) and not isinstance(rid, bool) else None)


def fact_records(batch: Any) -> list[FactRecord]:
    """The records of a batch: a list (or any iterable, e.g. ``RecordBatch``) of dicts/objects,
    one dict/object, or a collated dict of lists (what ``DataLoader``'s default collate makes of
    dicts)."""
    if isinstance(batch, Mapping):
        prompt = _field(batch, _PROMPT_KEYS)
        if isinstance(prompt, list | tuple):  # collated: {"prompt": [...], "subject": [...]}
            n = len(prompt)
            cols = {k: v for k, v in batch.items()
                    if isinstance(v, list | tuple | Tensor) and len(v) == n}
            return [_one({k: v[i] for k, v in cols.items()}) for i in range(n)]
        return [_one(batch)]
    if isinstance(batch, Iterable) and not isinstance(batch, str | bytes):  # lists, RecordBatch
        return [_one(r) for r in batch]
    return [_one(batch)]


def prompt_seed(seed: int, record: FactRecord) -> int:
    """A per-prompt seed that does not depend on the rank, batch or order."""
    h = zlib.crc32(f"{record.prompt}\0{record.subject}".encode())
    return (int(seed) * 1_000_003 + h) % (2 ** 63 - 1)


def _key(record: FactRecord) -> int:
    """Identifies a record across ranks, to drop the repeats a padding sampler adds: its id
    if it has one, else its text."""
    if record.record_id is not None:
        return zlib.crc32(f"id\0{record.record_id}".encode())
    return zlib.crc32(f"{record.prompt}\0{record.subject}\0{record.answer}".encode())


class CausalTracer(L.LightningModule):
    """Causal traces of known facts, averaged over the dataset, under ``Trainer.predict`` or
    ``Trainer.test`` (one or many devices).

    Batches are fact records with ``prompt`` (the full text or a ``{}`` template), ``subject``
    and, optionally, ``attribute``: dicts or objects, one at a time or as lists, or the dict of
    lists that the default collate makes of dicts. ``KnownFactsDataModule`` works as is, and so
    does a plain ``DataLoader`` over a list of dicts.

    Args:
        model: the Hugging Face causal LM to trace, or its hub name or local folder (loaded
            with :func:`~lightning_rome.models.load_model`, so that a YAML config can say
            ``class_path: CausalTracer`` and ``model: gpt2-xl``).
        tokenizer: its tokenizer, or a tokenizer name or folder (default: the model's own,
            which is only available when the model is given by name or folder).
        kinds: the traces per prompt (see :func:`~lightning_rome.tracing.trace_all`).
        window: layers restored together for ``mlp``/``attn``.
        samples: noise samples per prompt.
        noise: the corruption. With the default (``None``: Gaussian, ``ν = 3σ``), ``σ`` is
            measured once at the start over ``noise_subjects`` or, if not given, over every
            subject of the dataloader's dataset, so all ranks use the same ``ν``.
        noise_subjects: the subjects to measure ``σ`` over.
        answer: ``"greedy"`` traces the model's own prediction (the paper's choice);
            ``"attribute"`` traces each record's ``attribute`` (warning when the model does not
            predict it).
        seed: the base seed; each prompt's noise is seeded by :func:`prompt_seed`.
        engine, batch_tokens: see :func:`~lightning_rome.tracing.trace_all`.
        keep_traces: keep this rank's traces in :attr:`traces` (``predict_step`` returns them
            anyway).
        save_dir: rank 0 writes ``aggregate-<kind>.json`` here at the end of each epoch.
        dtype: the dtype to load a model given by name in (``"float32"``, ``"bf16"``, ...;
            default: the checkpoint's); ignored for a model object.

    After an epoch, :attr:`aggregates` maps each trace label to its
    :class:`TraceAggregate` and :attr:`suggested_layer` is the MLP peak at the last subject
    token (``None`` without an MLP trace). ``Trainer.test`` also logs ``trace/<label>/ate``,
    ``trace/<label>/peak_aie`` and ``trace/<label>/peak_layer``.

    Example:
        >>> tracer = CausalTracer(model, tok, kinds=("hidden", "mlp", "attn"))
        >>> L.Trainer(devices=2, strategy="ddp").test(tracer, datamodule=KnownFactsDataModule())
        >>> tracer.suggested_layer
    """

    def __init__(
        self,
        model: nn.Module | str,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        kinds: Sequence[str] = KINDS,
        *,
        window: int = 10,
        samples: int = 10,
        noise: NoiseLike = None,
        noise_subjects: Sequence[str] | None = None,
        answer: Literal["greedy", "attribute"] = "greedy",
        seed: int = 0,
        engine: str = "auto",
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        keep_traces: bool = True,
        save_dir: str | None = None,
        dtype: str | None = None,
    ) -> None:
        from lightning_rome.models.loading import resolve_model

        super().__init__()
        if answer not in ("greedy", "attribute"):
            raise ValueError(f"answer must be 'greedy' or 'attribute', got {answer!r}")
        self.specs = [parse_spec(k) for k in kinds]  # checked before a model is loaded
        if not self.specs:
            raise ValueError("kinds is empty")
        load_kwargs = {"dtype": dtype} if isinstance(model, str | PathLike) and dtype else {}
        self.model, self.tokenizer = resolve_model(model, tokenizer, **load_kwargs)
        self.labels = [s.label for s in self.specs]
        self.window, self.samples, self.seed = window, samples, seed
        self.noise = resolve_noise(noise)
        self.noise_subjects = list(noise_subjects) if noise_subjects is not None else None
        self.answer, self.engine, self.batch_tokens = answer, engine, batch_tokens
        self.keep_traces = keep_traces
        self.save_dir = save_dir
        self.traces: list[dict[str, CausalTrace]] = []
        self.aggregates: dict[str, TraceAggregate] = {}
        self.suggested_layer: int | None = None
        self._rows: list[tuple[int, Tensor, float, float]] = []
        self._resolved_noise: Any = None

    # --------------------------------------------------------------------------- noise
    @staticmethod
    def _dataset_subjects(dataloaders: Any) -> list[str]:
        """Every subject of the dataloaders' (unsharded) datasets."""
        loaders = dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]
        subjects: list[str] = []
        for dl in loaders:
            dataset = getattr(dl, "dataset", None)
            try:
                if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
                    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[index]
                else:
                    items = list(dataset)  # type: ignore[call-overload]
                subjects += [_one(x).subject for x in items]
            except (TypeError, ValueError, KeyError, IndexError):
                continue
        return subjects

    def _resolve_noise(self, dataloaders: Any) -> None:
        noise = self.noise
        if isinstance(noise, SubjectReplacement) or not isinstance(
                noise, GaussianNoise | UniformNoise) or noise.nu is not None:
            self._resolved_noise = noise
            return
        subjects = list(noise.subjects or self.noise_subjects or
                        self._dataset_subjects(dataloaders))
        if not subjects:
            raise MisconfigurationException(
                "CausalTracer could not read the subjects of the dataset to measure the noise "
                "scale; pass noise_subjects=[...] or a noise with a fixed nu")
        sigma = subject_embedding_std(self.model, self.tokenizer, subjects)
        self._resolved_noise = type(noise)(nu=noise.k * sigma, k=noise.k)
        rank_zero_info(f"causal tracing noise: {noise.kind}, ν = {noise.k} × σ = "
                       f"{noise.k * sigma:.4g} (σ over {len(set(subjects))} subjects)")

    # --------------------------------------------------------------------------- steps
    def _trace_batch(self, batch: Any) -> list[dict[str, CausalTrace]]:
        out = []
        for rec in fact_records(batch):
            answer = rec.answer if self.answer == "attribute" else None
            if self.answer == "attribute" and answer is None:
                raise ValueError(f"answer='attribute' but the record has no attribute: {rec}")
            traces = trace_all(
                self.model, self.tokenizer, rec.prompt, rec.subject, self.specs,
                window=self.window, samples=self.samples, noise=self._resolved_noise,
                answer=answer, seed=prompt_seed(self.seed, rec), engine=self.engine,
                batch_tokens=self.batch_tokens)
            effects = torch.stack([class_effects(traces[lab]) for lab in self.labels])  # (K, 6, L)
            first = traces[self.labels[0]]
            self._rows.append((_key(rec), effects, first.high_score, first.low_score))
            if self.keep_traces:
                self.traces.append(traces)
            out.append(traces)
        return out

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0,
                     ) -> list[dict[str, CausalTrace]]:
        return self._trace_batch(batch)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._trace_batch(batch)

    def _start(self, dataloaders: Any) -> None:
        self._rows, self.traces, self.aggregates = [], [], {}
        self._resolve_noise(dataloaders)

    @override
    def on_predict_epoch_start(self) -> None:
        self._start(self.trainer.predict_dataloaders)

    @override
    def on_test_epoch_start(self) -> None:
        self._start(self.trainer.test_dataloaders)

    # --------------------------------------------------------------------------- epoch end
    def _gather(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every rank's rows: keys ``(N,)``, effects ``(N, K, 6, L)``, high, low ``(N,)``."""
        K, n_layers = len(self.labels), self._n_layers()
        n = len(self._rows)
        keys = torch.tensor([r[0] for r in self._rows], dtype=torch.long)
        effects = (torch.stack([r[1] for r in self._rows]) if n else
                   torch.empty((0, K, 6, n_layers), dtype=torch.float64))
        high = torch.tensor([r[2] for r in self._rows], dtype=torch.float64)
        low = torch.tensor([r[3] for r in self._rows], dtype=torch.float64)
        if self.trainer.world_size <= 1:
            return keys, effects, high, low
        device = self.device
        counts = self.all_gather(torch.tensor([n], device=device)).view(-1).cpu()  # (W,)
        m = int(counts.max())

        def gather(t: Tensor) -> Tensor:
            pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            g = self.all_gather(torch.cat([t, pad]).to(device)).cpu()  # (W, m, ...)
            return torch.cat([g[w, :int(counts[w])] for w in range(g.shape[0])])

        return gather(keys), gather(effects), gather(high), gather(low)

    def _n_layers(self) -> int:
        from lightning_rome.models import get_layout

        return get_layout(self.model).n_layers(self.model)

    def _finish(self, log: bool) -> None:
        keys, effects, high, low = self._gather()
        if keys.numel() == 0:
            rank_zero_info("CausalTracer: no prompts were traced")
            return
        seen: dict[int, int] = {}
        for idx, k in enumerate(keys.tolist()):
            seen.setdefault(k, idx)
        keep = torch.tensor(sorted(seen.values()))
        effects, high, low = effects[keep], high[keep], low[keep]
        for k, spec in enumerate(self.specs):
            self.aggregates[spec.label] = aggregate_effects(
                effects[:, k], high, low, kind=spec.kind, window=self.window, sever=spec.sever)
        if "mlp" in self.aggregates:
            self.suggested_layer = self.aggregates["mlp"].best_layer("last subject token")
        for label, agg in self.aggregates.items():
            aie = agg.aie[LAST_SUBJECT]
            peak = int(torch.nan_to_num(aie, nan=-math.inf).argmax())
            rank_zero_info(f"causal tracing [{label}] over {agg.n_prompts} prompts: ATE "
                           f"{agg.ate:.4g}, AIE at the last subject token peaks at layer {peak} "
                           f"({float(aie[peak]):.4g})")
            if log:
                self.log_dict({f"trace/{label}/ate": agg.ate,
                               f"trace/{label}/peak_aie": float(aie[peak]),
                               f"trace/{label}/peak_layer": float(peak)}, sync_dist=False)
        if self.save_dir is not None and self.trainer.is_global_zero:
            for label, agg in self.aggregates.items():
                agg.save(Path(self.save_dir) / f"aggregate-{label.replace('/', '-')}.json")

    @override
    def on_predict_epoch_end(self) -> None:
        self._finish(log=False)

    @override
    def on_test_epoch_end(self) -> None:
        self._finish(log=True)
