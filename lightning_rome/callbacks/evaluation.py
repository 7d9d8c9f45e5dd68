"""``EditEvaluation``: evaluate a fixed set of edit cases periodically during ``fit``."""

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

from lightning_rome.callbacks.edit import find_model
from lightning_rome.modules.evaluator import (
    Record,
    compute_results,
    dataset_kind,
    editor_name,
    evaluate_cases,
    evaluate_sequential,
    make_metrics,
    resolve_editor,
)
from lightning_rome.records import EditCase
from lightning_rome.requests import EditRequest

__all__ = ["EditEvaluation", "load_cases"]

When = Literal["validation_epoch_end", "train_epoch_end"]


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


class EditEvaluation(Callback):
    """Evaluate a fixed set of edit cases every few epochs of a ``fit`` and log the metrics.

    It runs the evaluator's per-case code (:func:`~lightning_rome.modules.evaluator.evaluate_cases`
    or, with ``mode="sequential"``, :func:`~lightning_rome.modules.evaluator.evaluate_sequential`)
    on the model being trained, and logs ``{prefix}post/ES``, ``{prefix}post/NS``, ... (zsRE:
    ``{prefix}post/efficacy``, ...) and ``{prefix}pre/...`` with ``baseline``.

    * With ``editor=None`` it measures the model as it is: after edits made earlier (by
      :class:`~lightning_rome.callbacks.ROMECallback`, say), this shows how they survive further
      training.
    * With an editor it measures what editing the current model would do (each case is edited,
      scored and reverted).

    The weights are left bit-identical (every patch is reverted exactly) and the model's
    train/eval mode is restored. Under DDP the cases are split across ranks and the metrics
    synchronised; there, use an editor that does not backpropagate into the model's parameters
    (ROME, MEMIT: they freeze them) or none, since gradients reaching DDP-wrapped parameters
    outside a training step upset DDP's reducer (FT does). The results of every evaluation are
    kept in :attr:`history` (and in checkpoints).

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
        baseline: also log the unedited (``pre/``) metrics (default: when there is an editor).
        generation, generation_kwargs: generate text for GE.
        score_batch_size, seed, on_error, verify_revert: as for
            :func:`~lightning_rome.modules.evaluator.evaluate_cases`.
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
        editor: Any = None,
        hparams: Any = None,
        *,
        every_n_epochs: int = 1,
        when: When = "validation_epoch_end",
        at_fit_start: bool = False,
        mode: Literal["independent", "sequential"] = "independent",
        dataset: Literal["counterfact", "zsre"] = "counterfact",
        limit: int | None = None,
        baseline: bool | None = None,
        generation: bool = False,
        generation_kwargs: dict[str, Any] | None = None,
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
        if mode not in ("independent", "sequential"):
            raise MisconfigurationException(f"mode must be 'independent' or 'sequential', got "
                                            f"{mode!r}")
        if on_error not in ("raise", "skip"):
            raise MisconfigurationException(f"on_error must be 'raise' or 'skip', got "
                                            f"{on_error!r}")
        self._cases = load_cases(cases, dataset=dataset, limit=limit)
        kinds = {dataset_kind(c) for c in self._cases}
        if len(kinds) > 1:
            raise ValueError("EditEvaluation cases mix zsRE and COUNTERFACT cases")
        self._kind = kinds.pop()
        self._editor = resolve_editor(editor, hparams)
        self._every = every_n_epochs
        self._when = when
        self._at_fit_start = at_fit_start
        self._mode = mode
        self._baseline = (self._editor is not None) if baseline is None else baseline
        self._generation = generation
        self._generation_kwargs = dict(generation_kwargs or {})
        self._score_batch_size = score_batch_size
        self._seed = seed
        self._on_error = on_error
        self._verify = verify_revert
        self._model_attr = model_attr
        self._tokenizer = tokenizer
        self._prefix = prefix
        self.history: list[dict[str, Any]] = []
        self.last_records: list[Record] = []

    @property
    def cases(self) -> list[EditCase]:
        return list(self._cases)

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
        name = type(trainer.strategy).__name__.lower()
        if "fsdp" in name or "deepspeed" in name:
            raise MisconfigurationException(
                f"EditEvaluation does not support sharded strategies ({name}): edits need the "
                "full parameters on each rank; use DDP or a single device")
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
        tok = self._tokenizer if self._tokenizer is not None else getattr(
            pl_module, "tokenizer", None)
        if isinstance(tok, str | os.PathLike):
            from lightning_rome.models import load_tokenizer

            tok = self._tokenizer = load_tokenizer(tok)
        if tok is None:
            raise MisconfigurationException(
                "EditEvaluation needs a tokenizer: pass tokenizer= or give the LightningModule "
                "a `tokenizer` attribute")
        return tok

    def _metrics(self, device: torch.device) -> dict[str, MetricCollection]:
        out = {"post": make_metrics(self._kind, "post/", generation=self._generation)}
        if self._baseline:
            out["pre"] = make_metrics(self._kind, "pre/", generation=self._generation)
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
        mine = self._cases[rank::world] if self._mode == "independent" else (
            self._cases if rank == 0 else [])
        metrics = self._metrics(pl_module.device)
        run = evaluate_sequential if self._mode == "sequential" else evaluate_cases
        with torch.inference_mode(False), torch.no_grad():  # eval mode inside, then restored
            records = run(model, tok, mine, self._editor, baseline=self._baseline,
                          generation=self._generation, generation_kwargs=self._generation_kwargs,
                          score_batch_size=self._score_batch_size, seed=self._seed,
                          on_error=self._on_error, verify_revert=self._verify,
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
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                             "results": {k: dict(v) for k, v in results.items()}})
        return values

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": json.dumps(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(json.loads(state_dict.get("history", "[]")))
