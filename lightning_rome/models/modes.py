"""The one routine that runs modules in eval mode and gives each its own mode back.

Editors, tracing, statistics and evaluation use :func:`eval_mode`; ``module.train(flag)`` would
set every submodule to one flag, losing a mixed mode (e.g. a frozen, eval-mode encoder inside a
training model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn

__all__ = ["eval_mode", "in_eval_mode"]


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put every submodule of ``modules`` in eval mode (no dropout) for the body and restore each
    submodule's own ``training`` flag afterwards, also when the body raises.

    Example:
        >>> model.train(); model.transformer.h[0].eval()
        >>> with eval_mode(model):
        ...     patch = editor.edit(model, tok, request)
        >>> model.transformer.h[0].training, model.training
        (False, True)
    """
    flags = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for m, was in flags:
            m.training = was


F = TypeVar("F", bound=Callable[..., Any])


def in_eval_mode(fn: F) -> F:
    """Decorator: run ``fn`` under :func:`eval_mode` of its first ``nn.Module`` argument (the
    model; ``self`` is skipped unless it is a module too, and a ``model=`` keyword counts)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            model = next((a for a in args if isinstance(a, nn.Module)), None)
        if model is None:
            return fn(*args, **kwargs)
        with eval_mode(model):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
