"""One place that sees through module wrappers."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs, or ``model`` itself.

    A compiled wrapper shares its parameters with the module it wraps (``_orig_mod``) but is
    another object, so the per-model state of patches, and the hooks and forward passes of the
    editors, must all go to the inner module: applying a patch through the wrapper and
    reverting it on the inner module (or the other way round) is then exact. Nested wrappers are
    unwrapped to the innermost module.
    """
    seen = 0
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
        seen += 1
        if seen > 16:  # a module whose _orig_mod points back at itself
            raise ValueError("cannot unwrap the model: its _orig_mod chain does not end")
    return model
