"""``CausalTraceCallback``: causal traces of chosen prompts at chosen moments of a ``fit``.

Tracing the same facts every few epochs shows where (and when) a model comes to store them, the
way the ROME paper localises facts in GPT-2 XL. The heatmaps go to the Trainer's TensorBoard
logger as images, the peak effects as scalars, and optionally the traces to JSON files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.callbacks._common import refuse_sharded, resolve_tokenizer, scaled_noise
from lightning_rome.callbacks.edit import find_model
from lightning_rome.models import get_layout
from lightning_rome.modules.tracer import CausalTracer, FactRecord, fact_records, prompt_seed
from lightning_rome.tracing.core import DEFAULT_BATCH_TOKENS, parse_spec, trace_all
from lightning_rome.tracing.noise import NoiseLike, resolve_noise
from lightning_rome.tracing.result import KINDS, CausalTrace

__all__ = ["CausalTraceCallback", "CausalTracerModule"]


def _records(prompts: Any) -> list[FactRecord]:
    out = []
    for p in prompts:
        if isinstance(p, tuple) and p and all(isinstance(x, str) for x in p):
            if len(p) not in (2, 3):
                raise ValueError(f"a prompt tuple is (prompt, subject[, answer]), got {p!r}")
            out.append(FactRecord(p[0], p[1], p[2] if len(p) == 3 else None))
        else:
            out.extend(fact_records([p]))
    return out


class CausalTraceCallback(Callback):
    """Trace chosen prompts during ``Trainer.fit`` and log the heatmaps to TensorBoard.

    Tracing runs on global rank zero only, on the LightningModule's Hugging Face model (its
    train/eval flags and the global RNG are left as they were), without gradients.

    Args:
        prompts: what to trace: dicts or objects with ``prompt`` (full text or ``{}``
            template), ``subject`` and optionally ``attribute`` / ``target_true`` (e.g.
            :class:`~lightning_rome.EditRequest`), or ``(prompt, subject[, answer])`` tuples.
        kinds: the traces per prompt, e.g. ``("hidden", "mlp", "attn")`` or
            ``"hidden/sever=mlp"``.
        every_n_epochs: trace after every ``n``-th training epoch (``None`` or 0: never).
        trace_on_fit_start: also trace before training.
        trace_on_fit_end: also trace at the end of ``fit`` (skipped if the last epoch was just
            traced at the same step).
        window, samples, seed, engine, batch_tokens: as in
            :func:`~lightning_rome.tracing.trace_all`.
        noise: the corruption; with the default (Gaussian ``ν = 3σ``), ``σ`` is measured over
            the prompts' subjects at each tracing moment (embeddings change during training).
        answer: ``"greedy"`` traces the model's current prediction; ``"given"`` traces each
            prompt's answer (warning when the model does not predict it yet).
        tokenizer: a tokenizer or its path (default: ``pl_module.tokenizer``).
        model_attr: the attribute of the LightningModule holding the Hugging Face model
            (default: found automatically).
        dirpath: if given, each trace is also saved there as JSON.
        log_images: log the heatmaps (needs matplotlib) and peak scalars to every
            ``TensorBoardLogger`` of the Trainer.
        tag: the TensorBoard tag prefix.

    Attributes:
        history: one entry per (moment, prompt, kind) traced: epoch, step, clean and corrupted
            probabilities and the peak indirect effect. Saved in checkpoints.
        latest: the traces of the last moment, ``{prompt index: {label: CausalTrace}}``.

    Example:
        >>> cb = CausalTraceCallback([("{} lives in", "Arton Kalrin", "Paris")], every_n_epochs=5)
        >>> trainer = L.Trainer(callbacks=[cb], logger=TensorBoardLogger("logs"))
    """

    def __init__(
        self,
        prompts: Sequence[Any],
        kinds: Sequence[str] = KINDS,
        *,
        every_n_epochs: int | None = 1,
        trace_on_fit_start: bool = False,
        trace_on_fit_end: bool = True,
        window: int = 10,
        samples: int = 10,
        noise: NoiseLike = None,
        answer: str = "greedy",
        seed: int = 0,
        engine: str = "auto",
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        model_attr: str | None = None,
        dirpath: str | None = None,
        log_images: bool = True,
        tag: str = "causal_trace",
    ) -> None:
        super().__init__()
        self._records = _records(prompts)
        if not self._records:
            raise MisconfigurationException("CausalTraceCallback needs at least one prompt")
        self._specs = [parse_spec(k) for k in kinds]
        if not self._specs:
            raise MisconfigurationException("CausalTraceCallback needs at least one kind")
        if every_n_epochs is not None and (isinstance(every_n_epochs, bool) or not isinstance(
                every_n_epochs, int) or every_n_epochs < 0):
            raise MisconfigurationException(
                f"every_n_epochs must be None or an integer >= 0, got {every_n_epochs!r}")
        if answer not in ("greedy", "given"):
            raise MisconfigurationException(f"answer must be 'greedy' or 'given', got {answer!r}")
        if answer == "given" and any(r.answer is None for r in self._records):
            raise MisconfigurationException("answer='given' needs an answer for every prompt")
        if log_images:
            from lightning_rome.tracing.plot import _matplotlib

            _matplotlib()  # a clear ImportError now rather than mid-training
        self._every = every_n_epochs or 0
        self._on_start, self._on_end = trace_on_fit_start, trace_on_fit_end
        self._window, self._samples, self._seed = window, samples, seed
        self._noise = resolve_noise(noise)
        self._answer, self._engine, self._batch_tokens = answer, engine, batch_tokens
        self._tokenizer, self._model_attr = tokenizer, model_attr
        self._dirpath = Path(dirpath) if dirpath is not None else None
        self._log_images, self._tag = log_images, tag
        self.history: list[dict[str, Any]] = []
        self.latest: dict[int, dict[str, CausalTrace]] = {}
        self._last_step: int | None = None
        self._warned_no_logger = False

    @property
    @override
    def state_key(self) -> str:
        blob = json.dumps([[r.prompt, r.subject, r.answer] for r in self._records]
                          + [s.label for s in self._specs])
        return self._generate_state_key(prompts=hashlib.sha256(blob.encode()).hexdigest()[:12])

    # ----------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Rank zero traces its replica: sharded parameters would not be whole there.
        refuse_sharded(trainer, "CausalTraceCallback",
                       "tracing needs the full parameters on rank zero")
        # Refuse a window the model cannot hold now, not at the first trace mid-training.
        if stage == "fit" and any(s.kind != "hidden" for s in self._specs):
            model = find_model(pl_module, self._model_attr)
            n_layers = get_layout(model).n_layers(model)
            if not 1 <= self._window <= n_layers:
                raise MisconfigurationException(
                    f"CausalTraceCallback: window={self._window} does not fit this "
                    f"{n_layers}-layer model; pass window between 1 and {n_layers}")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._on_start:
            self._trace(trainer, pl_module, "fit_start")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._every and (trainer.current_epoch + 1) % self._every == 0:
            self._trace(trainer, pl_module, f"epoch={trainer.current_epoch}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._on_end and self._last_step != trainer.global_step:
            self._trace(trainer, pl_module, "fit_end")

    # ----------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = state_dict.get("last_step")

    # ----------------------------------------------------------------------------- work
    def _trace(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        model = find_model(pl_module, self._model_attr)
        tokenizer = resolve_tokenizer(self._tokenizer, pl_module, "CausalTraceCallback")
        if isinstance(self._tokenizer, str | os.PathLike):
            self._tokenizer = tokenizer  # loaded once
        # σ is measured at each moment: the embeddings change during training.
        noise = scaled_noise(self._noise, model, tokenizer, [r.subject for r in self._records])
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if self._log_images and not loggers and not self._warned_no_logger:
            rank_zero_warn("CausalTraceCallback: the Trainer has no TensorBoardLogger; traces "
                           "are kept in `latest` and `history` but not logged")
            self._warned_no_logger = True
        self.latest = {}
        for idx, rec in enumerate(self._records):
            traces = trace_all(
                model, tokenizer, rec.prompt, rec.subject, self._specs, window=self._window,
                samples=self._samples, noise=noise,
                answer=rec.answer if self._answer == "given" else None,
                seed=prompt_seed(self._seed, rec), engine=self._engine,
                batch_tokens=self._batch_tokens)
            self.latest[idx] = traces
            metrics = {}
            for label, t in traces.items():
                token, layer, ie = t.peak()
                self.history.append({
                    "moment": moment, "epoch": trainer.current_epoch,
                    "step": trainer.global_step, "prompt": idx, "kind": label,
                    "answer": t.answer, "high_score": t.high_score, "low_score": t.low_score,
                    "peak_token": token, "peak_layer": layer, "peak_ie": ie})
                metrics[f"{self._tag}/{idx}/{label}/peak_ie"] = ie
                metrics[f"{self._tag}/{idx}/{label}/peak_layer"] = float(layer)
                if self._dirpath is not None:
                    t.save(self._dirpath / moment / f"prompt{idx}-{label.replace('/', '-')}.json")
            metrics[f"{self._tag}/{idx}/total_effect"] = next(iter(traces.values())).total_effect
            if self._log_images and loggers:
                from lightning_rome.tracing.plot import log_figure, plot_traces

                fig = plot_traces(traces)
                for lg in loggers:
                    log_figure(lg, f"{self._tag}/{idx}", fig, step=trainer.global_step)
                    lg.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"CausalTraceCallback: traced {len(self._records)} prompt(s) at {moment}")


#: The former name of :class:`~lightning_rome.tracing.CausalTracer` in configs and code (it was
#: a subclass that took the model by name; ``CausalTracer`` now does that itself).
CausalTracerModule = CausalTracer
