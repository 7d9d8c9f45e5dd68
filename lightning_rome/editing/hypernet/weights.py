"""Which weights a hypernetwork editor edits, and whether a trained editor fits a model.

An editor (MEND, KE) is trained for particular weights of particular base-model weights: the
checks here refuse a model that lacks an edited weight, has another shape, or (with a
fingerprint) holds other values than the editor was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.weights import canonical_weight, weight_param_name
from lightning_rome.utils.io import tensor_checksum

__all__ = ["EditorMismatchError", "check_editor_fits", "edited_shapes", "edited_weights", "resolve_layers",
           "weights_fingerprint"]


class EditorMismatchError(ValueError):
    """A trained editor does not fit the model: a missing parameter, another shape, or weights
    other than those it was trained on (the fingerprint differs)."""


def resolve_layers(model: nn.Module, layers: Sequence[int] | None, layout: ModelLayout,
                   default_last: int = 3) -> list[int]:
    """The edited layers: ``layers`` checked against the model, or its last ``default_last``.

    Raises:
        IndexError: a layer does not exist (the message gives the model's layer range).
        ValueError: a layer is listed twice.
    """
    n = layout.n_layers(model)
    out = list(range(max(0, n - default_last), n)) if layers is None else list(layers)
    for layer in out:
        layout.check_layer(model, layer)
    if len(set(out)) != len(out):
        raise ValueError(f"layers must be distinct, got {out}")
    return out


def edited_weights(model: nn.Module, layers: Sequence[int], part: str, layout: ModelLayout,
                   ) -> dict[str, tuple[str, tuple[int, int]]]:
    """``{parameter name: (module name, canonical (out, in) shape)}`` of the edited weights."""
    out: dict[str, tuple[str, tuple[int, int]]] = {}
    for layer in layers:
        module_name = layout.name(part, layer)
        module = layout.module(model, part, layer)
        w = canonical_weight(module)  # (out, in); raises TypeError for a non-linear module
        out[weight_param_name(module_name)] = (module_name, (int(w.shape[0]), int(w.shape[1])))
    return out


def edited_shapes(model: nn.Module, layers: Sequence[int] | None, part: str,
                  layout: ModelLayout | None = None) -> dict[str, tuple[int, int]]:
    """``{module name: canonical (out, in) shape}`` of the ``part`` weight of each of ``layers``
    (``None``: the last three), checked against the model.

    Raises:
        IndexError: a layer does not exist.
    """
    layout = layout or get_layout(model)
    weights = edited_weights(model, resolve_layers(model, layers, layout), part, layout)
    return {module_name: shape for module_name, shape in weights.values()}


def weights_fingerprint(model: nn.Module, param_names: Sequence[str]) -> dict[str, str]:
    """SHA-256 (:func:`~lightning_rome.utils.io.tensor_checksum`) of each named weight."""
    return {n: tensor_checksum(model.get_parameter(n)) for n in param_names}


def check_editor_fits(model: nn.Module, shapes: Mapping[str, Sequence[int]],
                      fingerprint: Mapping[str, str] | None, *, trained_on: str | None = None,
                      ) -> None:
    """Raise :class:`EditorMismatchError` unless every edited weight exists with its shape and,
    when a fingerprint is given, holds exactly the bits the editor was trained against."""
    where = f" (trained on {trained_on!r})" if trained_on else ""
    for name, shape in shapes.items():
        try:
            module_name = name.rpartition(".")[0]
            w = canonical_weight(model.get_submodule(module_name))
        except (AttributeError, TypeError) as e:
            raise EditorMismatchError(f"the editor{where} edits {name!r}, which this model does "
                                      f"not have as a linear weight ({e})") from e
        if tuple(w.shape) != tuple(shape):
            raise EditorMismatchError(f"the editor{where} edits {name!r} of shape {tuple(shape)}, "
                                      f"this model's is {tuple(w.shape)}")
    if fingerprint:
        for name, digest in fingerprint.items():
            if tensor_checksum(model.get_parameter(name)) != digest:
                raise EditorMismatchError(
                    f"the weights of {name!r} differ from those the editor{where} was trained on "
                    "(fingerprint mismatch): a hypernetwork editor only fits the model it was "
                    "trained for; pass check_fingerprint=False to use it anyway")
