"""``EditEvaluation``: evaluate a fixed set of edit cases periodically during ``fit``.

A thin shell over the Trainer-free core (:mod:`lightning_rome.evaluation`): the cases are run
with :func:`~lightning_rome.evaluation.evaluate` on the model being trained, under one
:class:`~lightning_rome.evaluation.EvalOptions`; the callback chooses when, splits the cases
across ranks and logs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.callbacks._common import log_text, refuse_sharded, resolve_tokenizer
from lightning_rome.callbacks.edit import find_model
from lightning_rome.editing import Editor
from lightning_rome.evaluation import (
    EvalOptions,
    Record,
    compute_results,
    dataset_kind,
    editor_name,
    evaluate,
    generation_table,
    resolve_editor,
)
from lightning_rome.patches import WeightPatch
from lightning_rome.records import EditCase
from lightning_rome.requests import EditRequest

__all__ = ["EditEvaluation", "load_cases"]

When = Literal["validation_epoch_end", "train_epoch_end"]
Phase = Literal["auto", "pre", "post"]


def load_cases(cases: Any, *, dataset: Literal["counterfact", "zsre"] = "counterfact",
               limit: int | None = None) -> list[EditCase]:
    """Edit cases from :class:`EditCase` objects, requests (objects or dicts; each becomes a
    case with only its rewrite prompt, for ES/EM), or the path of a COUNTERFACT or zsRE file
    (read by the matching DataModule, so all its formats and checks apply).

    Raises:
        ValueError: no cases.
        TypeError: something else.
    """
    if isinstance(cases, str | os.PathLike):
        from lightning_rome.data import CounterFactDataModule, ZsREDataModule

        dm_cls = ZsREDataModule if dataset == "zsre" else CounterFactDataModule
        dm = dm_cls(Path(cases), limit=limit)
        dm.setup("test")
        out = list(dm.test_dataset.records)  # type: ignore[union-attr]
    else:
        out = []
        for c in cases:
            if isinstance(c, EditCase):
                out.append(c)
            elif isinstance(c, EditRequest | dict):
                req = c if isinstance(c, EditRequest) else EditRequest.from_dict(c)
                out.append(EditCase(req))
            else:
                raise TypeError(f"a case must be an EditCase, an EditRequest or a dict, got "
                                f"{type(c).__name__}")
        out = out[:limit] if limit is not None else out
    if not out:
        raise ValueError("EditEvaluation needs at least one case")
    return out


def _no_validation_loop(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """Why a ``fit`` will run no validation epoch (``None``: it will run them)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("validation_step", pl_module):
        return f"{type(pl_module).__name__} has no validation_step"
    if trainer.limit_val_batches == 0:
        return "limit_val_batches=0"
    # Lightning's own check (`_DataConnector`): val dataloaders passed to fit, or a module /
    # DataModule that defines val_dataloader.
    source = getattr(getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None),
                     "_data_source", None)
    if source is not None and not source.is_defined():
        return "no val_dataloader"
    return None


def _edits_applied(trainer: pl.Trainer, me: Callback) -> bool:
    """Whether another callback of this Trainer holds an edit on the model now: an edit
    callback (:class:`~lightning_rome.callbacks.EditCallback` and its kind) whose patch is
    applied."""
    return any(cb is not me and getattr(cb, "applied", False) is True
               and isinstance(getattr(cb, "patch", None), WeightPatch)
               for cb in trainer.callbacks)


class EditEvaluation(Callback):
    """Evaluate a fixed set of edit cases every few epochs of a ``fit`` and log the metrics.

    It runs the evaluation core (:func:`~lightning_rome.evaluation.evaluate`: each case on its
    own or, with ``mode="sequential"``, all edited one after another) on the model being
    trained, and logs ``{prefix}{phase}/ES``, ``.../NS``, ... (zsRE: ``.../efficacy``, ...).
    The names say what was measured:

    * With an editor it measures what editing the current model would do (each case is edited,
      scored and reverted): ``post/...``, and the model before the edit as ``pre/...`` with
      ``baseline`` (the default).
    * With ``editor=None`` it measures the model as it is, once, under the name of what that
      model is (``phase``): ``post/...`` while it holds edits made elsewhere, ``pre/...``
      while it holds none. By default (``phase="auto"``) that is read off the Trainer at each
      evaluation: ``post`` while an edit callback of the same Trainer
      (:class:`~lightning_rome.callbacks.ROMECallback`, :class:`~lightning_rome.callbacks.MEMITCallback`,
      :class:`~lightning_rome.callbacks.EditorCallback`, ...) has its edit applied, so after
      ``ROMECallback(apply_on="fit_start")`` this shows how the edit survives further training;
      ``pre`` otherwise (an evaluation that runs before the edit callback applies its edit, or
      after it reverted it, is named ``pre``). Edits applied some other way (a patch applied by
      hand before ``fit``) are not seen: pass ``phase="post"``.

    The weights are left bit-identical (every patch is reverted exactly) and the model's
    train/eval mode is restored. Under DDP the cases are split across ranks and the metrics
    synchronised; there, use an editor that does not backpropagate into the model's parameters
    (ROME, MEMIT: they freeze them) or none, since gradients reaching DDP-wrapped parameters
    outside a training step upset DDP's reducer (FT does). The results of every evaluation are
    kept in :attr:`history` (and in checkpoints). With ``generation``, the first
    ``generation_samples`` cases' generations (prompt, text before and after the edit) go to
    the Trainer's TensorBoard loggers as a text table, ``{prefix}generations``.

    Args:
        cases: :class:`~lightning_rome.data.EditCase` objects, :class:`EditRequest` objects or
            dicts, or the path of a COUNTERFACT/zsRE file (see :func:`load_cases`).
        editor: ``None``, a method name or an editor object (as for
            :class:`~lightning_rome.modules.EditEvaluator`).
        hparams: the method's hyperparameters, with a method name.
        every_n_epochs: evaluate after every n-th epoch.
        when: ``"validation_epoch_end"`` (default; not during the sanity check) or
            ``"train_epoch_end"``. A ``fit`` with no validation loop (no ``validation_step``,
            no val dataloader, or ``limit_val_batches=0``) is refused at setup with the
            default, which would never run there.
        at_fit_start: also evaluate once when ``fit`` starts (logged at step 0).
        mode: ``"independent"`` or ``"sequential"`` (all cases edited one after another).
        dataset: for a file path, ``"counterfact"`` or ``"zsre"``.
        limit: use only the first ``limit`` cases.
        baseline: also log the unedited (``pre/``) metrics (default: when there is an editor;
            refused with ``editor=None``, whose one measurement is named by ``phase``).
        phase: with ``editor=None``, the name of the measured model: ``"auto"`` (default, see
            above), ``"pre"`` or ``"post"``. With an editor only ``"auto"``.
        generation, generation_kwargs: generate text for GE (and the logged samples).
        generation_samples: how many cases' generations to log as text (``0``: none).
        score_batch_size, seed, on_error, verify_revert: as in
            :class:`~lightning_rome.evaluation.EvalOptions`.
        model_attr: the LightningModule attribute holding the HF model (auto-detected).
        tokenizer: a tokenizer or its path (default: ``pl_module.tokenizer``).
        prefix: prepended to the logged names.

    Example:
        >>> trainer = L.Trainer(callbacks=[
        ...     ROMECallback(requests, hparams="gpt2-xl"),
        ...     EditEvaluation([EditCase(r) for r in requests], every_n_epochs=1)])
    """

    def __init__(
        self,
        cases: Any,
        editor: Editor | str | None = None,
        hparams: Any = None,
        *,
        every_n_epochs: int = 1,
        when: When = "validation_epoch_end",
        at_fit_start: bool = False,
        mode: Literal["independent", "sequential"] = "independent",
        dataset: Literal["counterfact", "zsre"] = "counterfact",
        limit: int | None = None,
        baseline: bool | None = None,
        phase: Phase = "auto",
        generation: bool = False,
        generation_kwargs: dict[str, Any] | None = None,
        generation_samples: int = 5,
        score_batch_size: int | None = None,
        seed: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
        verify_revert: bool = False,
        model_attr: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        prefix: str = "edit_eval/",
    ) -> None:
        if every_n_epochs < 1:
            raise MisconfigurationException(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if when not in ("validation_epoch_end", "train_epoch_end"):
            raise MisconfigurationException(
                f"when must be 'validation_epoch_end' or 'train_epoch_end', got {when!r}")
        if phase not in ("auto", "pre", "post"):
            raise MisconfigurationException(f"phase must be 'auto', 'pre' or 'post', got "
                                            f"{phase!r}")
        if isinstance(generation_samples, bool) or not isinstance(generation_samples, int) or \
                generation_samples < 0:
            raise MisconfigurationException(f"generation_samples must be an integer >= 0, got "
                                            f"{generation_samples!r}")
        self._editor = resolve_editor(editor, hparams)
        if self._editor is not None and phase != "auto":
            raise MisconfigurationException(
                f"phase={phase!r} names the measured model with editor=None; with an editor the "
                "metrics are post/ (the edit it makes) and pre/ (baseline)")
        if self._editor is None and baseline:
            raise MisconfigurationException(
                "baseline=True needs an editor: with editor=None the model is measured once, "
                "under the name phase= gives it (pre/ or post/)")
        try:
            self._options = EvalOptions(
                mode=mode, baseline=(self._editor is not None) if baseline is None else baseline,
                generation=generation, generation_kwargs=generation_kwargs or {},
                score_batch_size=score_batch_size, seed=seed, on_error=on_error,
                verify_revert=verify_revert)
        except (TypeError, ValueError) as e:
            raise MisconfigurationException(str(e)) from e
        self._cases = load_cases(cases, dataset=dataset, limit=limit)
        kinds = {dataset_kind(c) for c in self._cases}
        if len(kinds) > 1:
            raise ValueError("EditEvaluation cases mix zsRE and COUNTERFACT cases")
        self._kind = kinds.pop()
        self._every = every_n_epochs
        self._when = when
        self._at_fit_start = at_fit_start
        self._phase = phase
        self._samples = generation_samples
        self._model_attr = model_attr
        self._tokenizer = tokenizer
        self._prefix = prefix
        self.history: list[dict[str, Any]] = []
        self.last_records: list[Record] = []

    @property
    def cases(self) -> list[EditCase]:
        return list(self._cases)

    @property
    def options(self) -> EvalOptions:
        """The evaluation's options (mode, baseline, generation, seed, ...)."""
        return self._options

    @property
    @override
    def state_key(self) -> str:
        blob = json.dumps([c.to_dict() for c in self._cases], sort_keys=True, default=str)
        digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
        return self._generate_state_key(prefix=self._prefix, editor=editor_name(self._editor),
                                        cases=digest)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded(trainer, "EditEvaluation")
        if stage == "fit" and self._when == "validation_epoch_end":
            why = _no_validation_loop(trainer, pl_module)
            if why:
                raise MisconfigurationException(
                    f"EditEvaluation(when='validation_epoch_end') would never run: this fit has "
                    f"no validation loop ({why}); pass when='train_epoch_end' or add validation")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._at_fit_start:
            self.evaluate(trainer, pl_module, log=False)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self._when == "validation_epoch_end" and not trainer.sanity_checking
                and trainer.state.fn == "fit" and self._due(trainer)):
            self.evaluate(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._when == "train_epoch_end" and self._due(trainer):
            self.evaluate(trainer, pl_module)

    def _due(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self._every == 0

    # ------------------------------------------------------------------ evaluation
    def _get_tokenizer(self, pl_module: pl.LightningModule) -> PreTrainedTokenizerBase:
        tok = resolve_tokenizer(self._tokenizer, pl_module, "EditEvaluation")
        if isinstance(self._tokenizer, str | os.PathLike):
            self._tokenizer = tok  # loaded once
        return tok

    def measured_phase(self, trainer: pl.Trainer) -> str:
        """The name the model measured now gets with ``editor=None``: ``phase`` when given,
        else ``"post"`` while an edit callback of ``trainer`` has its edit applied, ``"pre"``
        otherwise. (With an editor: ``"post"``.)"""
        if self._editor is not None:
            return "post"
        if self._phase != "auto":
            return self._phase
        return "post" if _edits_applied(trainer, self) else "pre"

    def _metrics(self, device: torch.device, phase: str) -> dict[str, MetricCollection]:
        from lightning_rome.modules.evaluator import make_metrics

        gen = self._options.generation
        out = {"post": make_metrics(self._kind, f"{phase}/", generation=gen)}
        if self._options.baseline:
            out["pre"] = make_metrics(self._kind, "pre/", generation=gen)
        for m in out.values():
            m.to(device)
        return out

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *,
                 log: bool = True) -> dict[str, float]:
        """Evaluate this rank's share of the cases now, synchronise and log the metrics.

        Call it on every rank (it is collective under DDP).

        Args:
            log: log through ``pl_module.log`` (in hooks that allow it); otherwise straight to
                the Trainer's logger (rank zero).

        Returns:
            ``{name: mean}`` as logged (without the prefix).
        """
        model: nn.Module = find_model(pl_module, self._model_attr)
        tok = self._get_tokenizer(pl_module)
        world, rank = max(1, trainer.world_size), trainer.global_rank
        mine = self._cases[rank::world] if self._options.mode == "independent" else (
            self._cases if rank == 0 else [])
        phase = self.measured_phase(trainer)
        metrics = self._metrics(pl_module.device, phase)
        with torch.inference_mode(False), torch.no_grad():  # eval mode inside, then restored
            records = evaluate(model, tok, mine, self._editor, options=self._options,
                               metrics=metrics) if mine else []
        self.last_records = records
        results: dict[str, Any] = {}
        for collection in metrics.values():
            results.update(compute_results(collection))  # collective under DDP
        values = {k: float(v["mean"]) for k, v in results.items()}
        if not values:
            rank_zero_warn("EditEvaluation: no metric could be computed from the cases")
        named = {f"{self._prefix}{k}": v for k, v in values.items()}
        if log:
            for k, v in named.items():
                pl_module.log(k, v, sync_dist=False, on_step=False, on_epoch=True)
        elif trainer.logger is not None and trainer.is_global_zero and named:
            trainer.logger.log_metrics(named, step=trainer.global_step)
        if trainer.is_global_zero and self._samples and self._options.generation:
            columns = ((("pre", "before"), ("post", "after")) if self._editor is not None else
                       (("post", "edited" if phase == "post" else "unedited"),))
            table = generation_table(records, self._samples, phases=columns)
            if table:
                log_text(trainer.loggers, f"{self._prefix}generations", table,
                         trainer.global_step)
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                             "phase": phase,
                             "results": {k: dict(v) for k, v in results.items()}})
        return values

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": json.dumps(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(json.loads(state_dict.get("history", "[]")))
