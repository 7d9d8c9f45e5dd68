"""Editors: each returns a :class:`~lightning_rome.patches.WeightPatch`.

Every editor has ``edit(model, tokenizer, requests) -> WeightPatch`` and leaves the model as it
found it (apply the patch to keep the edit).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.editing.alphaedit import AlphaEdit, AlphaEditHyperParams
from lightning_rome.editing.ft import FT, FTL, FTHyperParams
from lightning_rome.editing.hparams import HyperParams, list_presets
from lightning_rome.editing.hypernet import (
    KE,
    MEND,
    EditorMismatchError,
    KEHyperParams,
    KENetwork,
    MENDHyperParams,
    MENDNetwork,
)
from lightning_rome.editing.kn import KN, KNHyperParams
from lightning_rome.editing.memit import MEMIT, MEMITHyperParams, memit_edit
from lightning_rome.editing.rome import ROME, ROMEHyperParams, rome_edit
from lightning_rome.patches import WeightPatch

__all__ = [
    "FT",
    "FTL",
    "KE",
    "KN",
    "MEMIT",
    "MEND",
    "ROME",
    "AlphaEdit",
    "AlphaEditHyperParams",
    "Editor",
    "EditorMismatchError",
    "FTHyperParams",
    "HyperParams",
    "KEHyperParams",
    "KENetwork",
    "KNHyperParams",
    "MEMITHyperParams",
    "MENDHyperParams",
    "MENDNetwork",
    "ROMEHyperParams",
    "get_editor",
    "list_presets",
    "memit_edit",
    "rome_edit",
]


@runtime_checkable
class Editor(Protocol):
    """Anything that turns requests into a weight patch without changing the model."""

    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Any,
             ) -> WeightPatch: ...


_EDITORS: dict[str, str] = {
    "rome": "lightning_rome.editing.rome:ROME",
    "memit": "lightning_rome.editing.memit:MEMIT",
    "alphaedit": "lightning_rome.editing.alphaedit:AlphaEdit",
    "ft": "lightning_rome.editing.ft:FT",
    "ft-l": "lightning_rome.editing.ft:FTL",
    "ft+l": "lightning_rome.editing.ft:FTL",
    "kn": "lightning_rome.editing.kn:KN",
}


def get_editor(method: str, hparams: Any = None, **kwargs: Any) -> Editor:
    """An editor by name: ``rome``, ``memit``, ``alphaedit``, ``ft``, ``ft-l``, ``kn``. MEND and KE need a
    trained network: use ``MEND.from_checkpoint`` / ``KE.from_checkpoint``."""
    import importlib

    key = method.lower()
    if key in ("mend", "ke"):
        cls, module = ("MEND", "MENDModule") if key == "mend" else ("KE", "KEModule")
        raise ValueError(f"{cls} edits with a trained network, which a name alone does not give: "
                         f"load one with {cls}.from_checkpoint(path, model) (a checkpoint of "
                         f"lightning_rome.modules.{module}, trained with Trainer.fit)")
    if key not in _EDITORS:
        raise ValueError(f"unknown editing method {method!r}; known: {sorted(set(_EDITORS))}")
    mod, _, cls = _EDITORS[key].partition(":")
    return getattr(importlib.import_module(mod), cls)(hparams, **kwargs)
