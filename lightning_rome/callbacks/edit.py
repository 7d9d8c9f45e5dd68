"""Edit callbacks: apply closed-form edits (ROME, MEMIT, ...) at chosen moments of a Trainer run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.callbacks._common import refuse_sharded, resolve_tokenizer
from lightning_rome.editing import Editor
from lightning_rome.patches import (
    EditTransaction,
    PatchMismatchError,
    WeightPatch,
    load_registry_state,
    registry_state,
)
from lightning_rome.requests import EditRequest, as_requests
from lightning_rome.scoring import candidate_probs
from lightning_rome.utils.io import weight_digest
from lightning_rome.utils.modules import unwrap_model

__all__ = ["EditorCallback", "MEMITCallback", "ROMECallback", "find_model", "load_requests"]

REGISTRY_KEY = "lightning_rome_patches"  # the checkpoint entry holding the model's patch registry
ApplyOn = Literal["setup", "fit_start", "train_end", "validation_start", "test_start",
                  "predict_start"]
_APPLY_ON = ("setup", "fit_start", "train_end", "validation_start", "test_start",
             "predict_start")
# The hook that ends the stage in which each moment falls (where a revert happens). Every
# validation loop, the sanity check included, is a stage of its own: the edit is applied at its
# start and reverted at its end, so training never runs on it.
_REVERT_ON = {"setup": "teardown", "fit_start": "fit_end", "train_end": "fit_end",
              "validation_start": "validation_end", "test_start": "test_end",
              "predict_start": "predict_end"}


def load_requests(requests: Any) -> list[EditRequest]:
    """Requests from objects, dicts, or a JSON / YAML file holding a list of them."""
    if isinstance(requests, str | os.PathLike):
        path = Path(requests)
        if not path.is_file():
            raise FileNotFoundError(f"requests file not found: {path}")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return as_requests(data)
    return as_requests(requests)


def find_model(pl_module: nn.Module, attr: str | None = None) -> nn.Module:
    """The Hugging Face causal LM inside a LightningModule: ``pl_module.<attr>`` if given, the
    module itself if it is one, else its first attribute among ``model``, ``lm``, ``net``,
    ``backbone`` that has a ``config.model_type``. A ``torch.compile`` wrapper is resolved to
    the module it wraps."""
    if attr:
        return unwrap_model(pl_module.get_submodule(attr))
    if hasattr(getattr(pl_module, "config", None), "model_type"):
        return unwrap_model(pl_module)
    for name in ("model", "lm", "net", "backbone"):
        sub = getattr(pl_module, name, None)
        if isinstance(sub, nn.Module) and hasattr(getattr(sub, "config", None), "model_type"):
            return unwrap_model(sub)
    raise MisconfigurationException(
        f"cannot find a Hugging Face causal LM in {type(pl_module).__name__}: pass model_attr= "
        "naming the attribute that holds it")


def _matches(model: nn.Module, patch: WeightPatch) -> bool:
    """Whether ``model``'s weights are those ``patch`` was computed against (by checksum)."""
    if not patch.checksums or set(patch.checksums) != set(patch.deltas):
        return False
    try:
        return all(weight_digest(model.get_parameter(n)) == c
                   for n, c in patch.checksums.items())
    except AttributeError:
        return False


def _all_gather_objects(trainer: pl.Trainer, obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-element list without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or trainer.world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class EditorCallback(Callback):
    """Apply the patch of any editor (ROME, MEMIT, FT, FT+L, KN, AlphaEdit, a trained MEND or
    KE, ...) to the model at a chosen moment of a Trainer run.

    Under DDP the patch is computed on rank 0 and
    broadcast, so every rank ends with identical weights (checked by comparing checksums); an
    error on any rank (computing the edit on rank 0, finding the model or tokenizer or applying
    the patch on any) is raised on every rank, and no rank keeps the edit. Sharded strategies
    (FSDP, DeepSpeed) are refused.

    Args:
        requests: :class:`EditRequest` objects, dicts, or a path to a JSON/YAML list.
        editor: an object with ``edit(model, tokenizer, requests) -> WeightPatch`` (for example
            ``FT({"layers": [1]})`` or ``MEND.from_checkpoint(...)``), or a method name
            for :func:`~lightning_rome.editing.get_editor` (``"ft"``, ``"ft-l"``, ``"kn"``,
            ``"alphaedit"``). An editor with ``state_dict``/``load_state_dict`` (AlphaEdit's
            preserved keys) has its state saved in checkpoints and restored from them.
        hparams: hyperparameters when ``editor`` is a name.
        apply_on: ``setup``, ``fit_start`` (default), ``train_end``, ``validation_start``
            (every validation loop, the sanity check included), ``test_start`` or
            ``predict_start``.
        revert: undo the edit when that stage ends (``teardown``, ``fit_end``,
            ``validation_end``, ``test_end``, ``predict_end``) and when the run is interrupted
            (an exception or ``KeyboardInterrupt``, through ``on_exception``), so no step outside
            the stage sees the edit. With ``validation_start`` the edit is applied again at every
            validation (the patch is reused while the weights it was computed on are
            unchanged). If training changed the weights meanwhile, the delta is subtracted
            (with a warning).
        save_patch: save the patch as safetensors beside the checkpoints (``True``) or at a path.
        model_attr: the attribute of the LightningModule that holds the HF model (auto-detected).
        tokenizer: a tokenizer or its path (default: ``pl_module.tokenizer``).
        log_efficacy: log the delta norms and each request's efficacy to the Trainer's logger.
    """

    def __init__(
        self,
        requests: Any,
        editor: Editor | str,
        hparams: Any = None,
        *,
        apply_on: ApplyOn = "fit_start",
        revert: bool = False,
        save_patch: bool | str = False,
        model_attr: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        log_efficacy: bool = True,
    ) -> None:
        if apply_on not in _APPLY_ON:
            raise MisconfigurationException(f"apply_on must be one of {_APPLY_ON}, got "
                                            f"{apply_on!r}")
        self._requests = load_requests(requests)
        if isinstance(editor, str):
            from lightning_rome.editing import get_editor

            self.method = editor.lower()
            editor = get_editor(editor, hparams)
        else:
            if hparams is not None:
                raise MisconfigurationException(
                    "hparams go with an editor given by name; this editor object already has "
                    "its own")
            self.method = getattr(editor, "method", type(editor).__name__.lower())
        if not callable(getattr(editor, "edit", None)):
            raise MisconfigurationException(
                f"editor {editor!r} has no edit(model, tokenizer, requests) method")
        self._editor = editor
        self._apply_on = apply_on
        self._revert = revert
        self._save_patch = save_patch
        self._model_attr = model_attr
        self._tokenizer = tokenizer
        self._log_efficacy = log_efficacy
        self.patch: WeightPatch | None = None
        self.applied = False
        self._restored_applied = False
        self._restored: dict[str, WeightPatch] = {}

    # ------------------------------------------------------------------ configuration
    @property
    def editor(self) -> Editor:
        """The editor whose patch the callback applies."""
        return self._editor

    def _edit(self, model: nn.Module, tok: PreTrainedTokenizerBase) -> WeightPatch:
        """The patch of the callback's requests, computed on ``model`` (left unchanged)."""
        return self._editor.edit(model, tok, self._requests)

    @property
    def requests(self) -> list[EditRequest]:
        return list(self._requests)

    @property
    @override
    def state_key(self) -> str:
        blob = json.dumps([r.to_dict() for r in self._requests], sort_keys=True, default=str)
        digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
        return self._generate_state_key(method=self.method, requests=digest,
                                        apply_on=self._apply_on)

    def _get_tokenizer(self, pl_module: pl.LightningModule) -> PreTrainedTokenizerBase:
        tok = resolve_tokenizer(self._tokenizer, pl_module, type(self).__name__)
        if isinstance(self._tokenizer, str | os.PathLike):
            self._tokenizer = tok  # loaded once
        return tok

    # ------------------------------------------------------------------ apply / revert
    def _check_strategy(self, trainer: pl.Trainer) -> None:
        refuse_sharded(trainer, type(self).__name__)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the patch (rank 0), share it and apply it on every rank, all or nothing.

        Under DDP every rank first reports whether its part succeeded (finding the model and
        tokenizer; on rank 0, the edit itself), and again after applying the patch; if any rank
        failed, every rank raises the same error and no rank keeps the edit (a rank that applied
        it reverts it), instead of the others waiting forever in a collective.
        """
        if self.applied:
            return
        self._check_strategy(trainer)
        distributed = trainer.world_size > 1
        model: nn.Module | None = None
        tok: PreTrainedTokenizerBase | None = None
        patch: WeightPatch | None = None
        error: str | None = None
        reuse = False
        try:
            model = find_model(pl_module, self._model_attr)
            tok = self._get_tokenizer(pl_module)
            # A patch computed earlier in this run (applied and reverted, say at every
            # validation) is applied again while the weights are those it was computed on.
            reuse = self.patch is not None and _matches(model, self.patch)
        except Exception as e:
            if not distributed:
                raise
            error = f"{type(e).__name__}: {e}"
        if distributed:  # every rank takes the same branch (a collective on every rank)
            reuse = trainer.strategy.reduce_boolean_decision(reuse and error is None, all=True)
        if reuse:
            patch = self.patch
        elif trainer.is_global_zero and error is None:
            try:
                assert model is not None and tok is not None
                patch = self._edit(model, tok)
            except Exception as e:
                if not distributed:
                    raise
                error = f"{type(e).__name__}: {e}"
        if distributed and not reuse:
            self._raise_if_any_failed(trainer, error)
            state = trainer.strategy.broadcast(
                patch.to_state() if patch is not None else None, src=0)
            patch = WeightPatch.from_state(state)
        assert patch is not None and model is not None and tok is not None
        # Applied on every rank or on none: a rank whose apply failed fails them all.
        with EditTransaction(model) as tx:
            try:
                patch = tx.apply(patch.to(next(model.parameters()).device))
            except Exception as e:
                if not distributed:
                    raise
                error = f"{type(e).__name__}: {e}"
            if distributed:
                self._raise_if_any_failed(trainer, error)
            tx.commit()
        self.patch, self.applied = patch, True
        if distributed:
            self._check_identical(trainer, model, patch)
        if not reuse:
            self._after_apply(trainer, pl_module, model, tok, patch)

    def _raise_if_any_failed(self, trainer: pl.Trainer, error: str | None) -> None:
        """Gather every rank's error (``None``: success); raise the first one on all ranks."""
        errors = _all_gather_objects(trainer, error)
        for rank, e in enumerate(errors):
            if e is not None:
                raise RuntimeError(f"{type(self).__name__} failed on rank {rank}: {e}")

    def _check_identical(self, trainer: pl.Trainer, model: nn.Module, patch: WeightPatch) -> None:
        mine = hashlib.sha256("".join(
            weight_digest(model.get_parameter(n)) for n in patch.names).encode()).hexdigest()
        theirs = trainer.strategy.broadcast(mine, src=0)
        ok = trainer.strategy.reduce_boolean_decision(mine == theirs, all=True)
        if not ok:
            raise RuntimeError(f"{type(self).__name__}: edited weights differ across ranks")

    def _after_apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module,
                     tok: PreTrainedTokenizerBase, patch: WeightPatch) -> None:
        metrics: dict[str, float] = {}
        for n, v in patch.norms().items():
            metrics[f"{self.method}/delta_norm/{n}"] = v
        if self._log_efficacy:
            reqs = [r for r in self._requests if r.target_true is not None]
            if reqs:
                with torch.no_grad():
                    p_new = candidate_probs(model, tok, [r.text for r in reqs],
                                            [r.target_new for r in reqs])
                    p_true = candidate_probs(model, tok, [r.text for r in reqs],
                                             [r.target_true for r in reqs])  # type: ignore
                wins = (p_new > p_true).float()
                for r, w in zip(reqs, wins.tolist()):
                    key = r.case_id if r.case_id is not None else r.subject
                    metrics[f"{self.method}/efficacy/{key}"] = w
                metrics[f"{self.method}/efficacy_mean"] = float(wins.mean())
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self.last_metrics = metrics
        if self._save_patch and trainer.is_global_zero:
            path = self._patch_path(trainer)
            patch.save(path)
            rank_zero_info(f"{type(self).__name__}: saved the patch to {path}")

    def _patch_path(self, trainer: pl.Trainer) -> Path:
        if isinstance(self._save_patch, str):
            return Path(self._save_patch)
        ckpt = trainer.checkpoint_callback
        root = getattr(ckpt, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
        return Path(root) / f"{self.method}-{self.state_key.split('requests=')[-1][:10]}.safetensors"

    def _undo(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.applied and self._revert and self.patch is not None):
            return
        model = find_model(pl_module, self._model_attr)
        try:
            self.patch.revert(model)
        except PatchMismatchError:
            rank_zero_warn(f"{type(self).__name__}: the weights changed since the edit was "
                           "applied (training?); reverting by subtracting the delta")
            self.patch.revert(model, force=True)
        self.applied = False

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_strategy(trainer)
        if self._apply_on == "setup":
            self._apply(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._apply_on == "fit_start":
            self._apply(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._apply_on == "train_end":
            self._apply(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._apply_on == "validation_start":
            self._apply(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._apply_on == "test_start":
            self._apply(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _REVERT_ON[self._apply_on] == "fit_end":
            self._undo(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._apply_on == "predict_start":
            self._apply(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The sanity check too: the edit applied for it must not leak into training.
        if _REVERT_ON[self._apply_on] == "validation_end":
            self._undo(trainer, pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _REVERT_ON[self._apply_on] == "predict_end":
            self._undo(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """An interrupted run (an exception, ``KeyboardInterrupt``) ends the stage too: with
        ``revert=True`` the edit is undone, and a failure to undo it is reported as a warning
        so that it does not hide the exception that stopped the run."""
        if not (self.applied and self._revert):
            return
        try:
            self._undo(trainer, pl_module)
        except Exception as e:
            rank_zero_warn(f"{type(self).__name__}: could not revert the edit after the run was "
                           f"interrupted ({type(e).__name__}: {e}); the model still holds it")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _REVERT_ON[self._apply_on] == "test_end":
            self._undo(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _REVERT_ON[self._apply_on] == "teardown":
            self._undo(trainer, pl_module)

    # ------------------------------------------------------------------ checkpointing
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """The model's applied patches and their original bits go into the checkpoint (one entry
        however many edit callbacks there are), so that a resumed run reverts bit-exactly."""
        state = registry_state(find_model(pl_module, self._model_attr))
        if state is not None:
            checkpoint[REGISTRY_KEY] = state

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Called once the model holds the checkpoint's weights: re-register their patches."""
        state = checkpoint.get(REGISTRY_KEY)
        if state is not None:
            self._restored = load_registry_state(find_model(pl_module, self._model_attr), state)

    def _stateful_editor(self) -> bool:
        """Editors with a state of their own (AlphaEdit's preserved keys) save it in checkpoints;
        networks (``nn.Module`` editors) are left to their own checkpoints."""
        return callable(getattr(self._editor, "state_dict", None)) and callable(
            getattr(self._editor, "load_state_dict", None)) and not isinstance(self._editor,
                                                                               nn.Module)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {
            "applied": self.applied,
            "requests": json.dumps([r.to_dict() for r in self._requests], default=str),
            "patch": self.patch.to_state() if self.patch is not None else None,
        }
        if self._stateful_editor():
            state["editor_state"] = self._editor.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [EditRequest.from_dict(r) for r in json.loads(state_dict["requests"])]
        if saved != self._requests:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint's requests differ from this "
                           "callback's; keeping the checkpoint's edit state")
        self.patch = WeightPatch.from_state(state_dict["patch"]) if state_dict["patch"] else None
        if self.patch is not None and self.patch.uid in self._restored:
            # The same edit, registered on the model by on_load_checkpoint: reverting that
            # object is bit-exact.
            self.patch = self._restored[self.patch.uid]
        # The checkpoint's weights already hold the edit: do not apply it again.
        self.applied = bool(state_dict["applied"])
        self._restored_applied = self.applied
        if self._stateful_editor() and state_dict.get("editor_state") is not None:
            self._editor.load_state_dict(state_dict["editor_state"])


class ROMECallback(EditorCallback):
    """Apply ROME edits inside a Trainer run.

    Args:
        requests: the edits (objects, dicts, or a JSON/YAML path).
        hparams: :class:`~lightning_rome.editing.ROMEHyperParams`, a dict, a preset name such as
            ``"gpt2-xl"``, or a YAML path.
        second_moment: optional ``(model, tokenizer, module_name) -> C`` (default: cached
            statistics over ``hparams.mom2_dataset``).
        **kwargs: see :class:`EditorCallback` (``apply_on``, ``revert``, ``save_patch``, ...).

    Example:
        >>> trainer = L.Trainer(callbacks=[ROMECallback(
        ...     [EditRequest("{} is located in the city of", "Eiffel Tower", "Rome")],
        ...     hparams="gpt2-xl")])
    """

    def __init__(self, requests: Any, hparams: Any = None, *, second_moment: Any = None,
                 **kwargs: Any) -> None:
        from lightning_rome.editing.rome import ROME

        super().__init__(requests, ROME(hparams, second_moment=second_moment), **kwargs)


class MEMITCallback(EditorCallback):
    """Apply a MEMIT batch edit inside a Trainer run (same options and guarantees as
    :class:`ROMECallback`).

    Args:
        requests: the edits (objects, dicts, or a JSON/YAML path); all are written at once.
        hparams: :class:`~lightning_rome.editing.MEMITHyperParams`, a dict, a preset name
            (``"gpt2-xl"``, ``"gpt-j-6b"``) or a YAML path.
        chunk_size: edit a long list in consecutive chunks of this many requests (``None``: one
            batch; see :meth:`~lightning_rome.editing.MEMIT.edit`).
        second_moment: optional ``(model, tokenizer, module_name) -> C``.
        **kwargs: see :class:`EditorCallback`.
    """

    def __init__(self, requests: Any, hparams: Any = None, *, chunk_size: int | None = None,
                 second_moment: Any = None, **kwargs: Any) -> None:
        from lightning_rome.editing.memit import MEMIT, check_chunk_size

        try:
            check_chunk_size(chunk_size)
        except ValueError as e:
            raise MisconfigurationException(str(e)) from e
        super().__init__(requests, MEMIT(hparams, second_moment=second_moment), **kwargs)
        self._chunk_size = chunk_size

    def _edit(self, model: nn.Module, tok: PreTrainedTokenizerBase) -> WeightPatch:
        return self._editor.edit(model, tok, self._requests, chunk_size=self._chunk_size)
