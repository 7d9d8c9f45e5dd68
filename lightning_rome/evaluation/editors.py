"""Who is evaluated: the editor from what the user passed, its name and fingerprint, and the
checksum of a model's weights (what results files are keyed by)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_rome.evaluation.options import Kind
from lightning_rome.records import EditCase
from lightning_rome.utils.io import tensor_checksum
from lightning_rome.utils.modules import unwrap_model

if TYPE_CHECKING:
    from lightning_rome.editing import Editor

__all__ = ["case_fingerprint", "dataset_kind", "editor_fingerprint", "editor_hparams",
           "editor_name", "model_checksum", "resolve_editor"]


def resolve_editor(editor: Editor | str | None, hparams: Any = None) -> Editor | None:
    """An editor object from what the user passed.

    Args:
        editor: ``None`` (or ``"none"``) for the unedited baseline; a method name
            (``"rome"``, ``"memit"``, ``"ft"``, ``"ft-l"``, ``"kn"``, ... as
            :func:`lightning_rome.editing.get_editor` knows them); or any object with
            ``edit(model, tokenizer, requests) -> WeightPatch``.
        hparams: the method's hyperparameters (only with a method name).

    Raises:
        ValueError: an unknown method name, or ``hparams`` given with an editor object.
        TypeError: an object without an ``edit`` method.
    """
    if editor is None or (isinstance(editor, str) and editor.lower() in ("none", "baseline")):
        if hparams is not None:
            raise ValueError("hparams were given but no editor (editor=None evaluates the "
                             "unedited model)")
        return None
    if isinstance(editor, str):
        from lightning_rome.editing import get_editor

        return get_editor(editor, hparams)
    if not callable(getattr(editor, "edit", None)):
        raise TypeError(f"editor must be None, a method name or an object with "
                        f"edit(model, tokenizer, requests) -> WeightPatch; got "
                        f"{type(editor).__name__}")
    if hparams is not None:
        raise ValueError(f"hparams are only used with a method name; the editor object "
                         f"{type(editor).__name__} brings its own")
    return editor


def editor_name(editor: Editor | None) -> str:
    """A short name for results and tables: ``"none"``, the editor's ``method`` attribute, or
    its class name in lower case."""
    if editor is None:
        return "none"
    name = getattr(editor, "method", None)
    return name if isinstance(name, str) and name else type(editor).__name__.lower()


def editor_hparams(editor: Editor | None) -> Any:
    """The editor's hyperparameters as a dict (``to_dict()`` of a dataclass), or ``None``."""
    hp = getattr(editor, "hparams", None)
    if hp is None:
        return None
    if callable(getattr(hp, "to_dict", None)):
        return hp.to_dict()
    return hp


def _public_settings(obj: Any, depth: int = 0) -> dict[str, Any]:
    """What identifies an editor object beyond its class: its hyperparameters, its simple public
    attributes, the SHA-256 of the weights of any module it holds (a trained MEND/KE network),
    the qualified names of the functions it was given (``second_moment``), and the same for
    any editor it wraps (one level deep)."""
    out: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}",
                           "method": editor_name(obj)}
    hp = editor_hparams(obj)
    if hp is not None:
        out["hparams"] = hp
    try:
        attrs = dict(vars(obj))
    except TypeError:  # __slots__
        attrs = {}
    weights: dict[str, str] = {}
    if isinstance(obj, nn.Module):
        weights["self"] = model_checksum(obj)
    for k, v in sorted(attrs.items()):
        if k.startswith("_") or k == "hparams":
            continue
        if isinstance(v, bool | int | float | str) or v is None:
            out.setdefault("settings", {})[k] = v
        elif k == "fingerprint" and isinstance(v, Mapping):
            out["fingerprint"] = dict(v)
        elif isinstance(v, nn.Module):
            weights[k] = model_checksum(v)
        elif isinstance(v, torch.Tensor):
            weights[k] = tensor_checksum(v)
        elif callable(getattr(v, "edit", None)) and depth == 0:
            out.setdefault("wraps", {})[k] = _public_settings(v, depth + 1)
        elif callable(v) and not isinstance(v, type):
            out.setdefault("functions", {})[k] = (f"{getattr(v, '__module__', '?')}."
                                                  f"{getattr(v, '__qualname__', type(v).__name__)}")
    if weights:
        out["weights_sha256"] = weights
    return out


def editor_fingerprint(editor: Editor | None) -> dict[str, Any] | None:
    """A JSON-serialisable identity of an editor (``None`` for the unedited baseline): its class,
    method and hyperparameters, its simple public settings, the SHA-256 of any network it holds
    (MEND, KE) and the names of the functions it was given. Two editors with the same
    fingerprint produce the same patches on the same model; results files are keyed by it."""
    if editor is None:
        return None
    return json.loads(json.dumps(_public_settings(editor), sort_keys=True, default=str))


def case_fingerprint(case: EditCase) -> str:
    """SHA-256 of everything a case's record is computed from: the request, every prompt and
    answer, the ids and the source dataset (canonical JSON of :meth:`EditCase.to_dict`)."""
    body = {**case.to_dict(), "source": case.source}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dataset_kind(case: EditCase) -> Kind:
    """``"zsre"`` for zsRE cases, ``"counterfact"`` for the others."""
    return "zsre" if case.source == "zsre" else "counterfact"


def model_checksum(model: nn.Module) -> str:
    """SHA-256 over the bits of every parameter and buffer of ``model`` (in name order); a
    ``torch.compile`` wrapper has the checksum of the module it wraps."""
    model = unwrap_model(model)
    h = hashlib.sha256()
    for name, t in sorted([*model.named_parameters(), *model.named_buffers()],
                          key=lambda x: x[0]):
        h.update(f"{name}={tensor_checksum(t)};".encode())
    return h.hexdigest()

