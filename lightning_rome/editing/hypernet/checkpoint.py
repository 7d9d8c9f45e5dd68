"""The editor entry of ``MENDModule``/``KEModule`` checkpoints, and reading it back.

A Lightning checkpoint of a hypernetwork module holds the editor's network (``network.*``), its
hyperparameters and, under :data:`CHECKPOINT_KEY`, what it was trained for: the base model's
name, the edited parameters, their shapes and the SHA-256 of their weights. The base model's own
weights are not in it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rome.editing.hypernet.weights import weights_fingerprint
from lightning_rome.models.weights import weight_param_name

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "editor_metadata", "model_name_of",
           "read_editor_checkpoint"]

#: The key under which the editor checkpoints keep the base model's name, the edited parameters,
#: their shapes and the fingerprint (SHA-256) of their weights.
CHECKPOINT_KEY = "lightning_rome_editor"
CHECKPOINT_FORMAT = "lightning_rome.hypernetwork_editor"


def read_editor_checkpoint(path: str | os.PathLike[str], method: str,
                           ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """The saved hyperparameters, the network's state dict and the editor metadata of a
    Lightning checkpoint written by ``MENDModule``/``KEModule``, read with
    ``torch.load(weights_only=True)`` (nothing is unpickled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"editor checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a lightning_rome hypernetwork-editor checkpoint (no "
                         f"{CHECKPOINT_KEY!r} entry)")
    if meta.get("method") != method:
        raise ValueError(f"{path} holds a {meta.get('method')!r} editor, not {method!r}")
    state = {k.removeprefix("network."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("network.")}
    return dict(ckpt.get("hyper_parameters", {})), state, meta


def editor_metadata(model: nn.Module, network: nn.Module, method: str,
                    model_name: str | None) -> dict[str, Any]:
    """What a checkpoint records about the base model an editor was trained for."""
    names = [weight_param_name(n) for n in network.module_names]
    return {
        "format": CHECKPOINT_FORMAT,
        "method": method,
        "model_name": model_name,
        "module_names": list(network.module_names),
        "shapes": {p: list(network.shapes[m]) for p, m in zip(names, network.module_names)},
        "fingerprint": weights_fingerprint(model, names),
    }


def model_name_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None
