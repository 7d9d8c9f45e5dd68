"""One context manager that records or replaces module inputs and outputs by name.

Nothing else in the package registers hooks by hand. Hooks are always removed on exit, also when
the body raises.

Do not read edited activations from ``output_hidden_states``: transformers 5 captures them with
forward hooks of its own, installed on a model's first such call, which then run *before* hooks
added later, so they show pre-edit values. Record them with ``retain_output`` instead.

Example:
    >>> with module_hooks(model, ["transformer.h.3"], retain_output=True) as rec:
    ...     model(input_ids)
    >>> h3 = rec["transformer.h.3"].output          # (B, T, d)

With ``stop=True`` the pass ends as soon as every hooked module has given what was asked (its
input, or its output when outputs are retained or edited): the blocks above and the LM head are
not run, and ``model(...)`` returns ``None``::

    >>> with module_hooks(model, ["transformer.h.3.mlp.c_proj"], retain_input=True,
    ...                   stop=True) as rec:
    ...     model(input_ids)                        # None: stopped before c_proj runs
    >>> k = rec["transformer.h.3.mlp.c_proj"].input  # (B, T, d_ff)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EditFn", "ModuleRecord", "first_tensor", "module_hooks", "replace_positions"]

EditFn = Callable[[Tensor, str], Tensor]
"""An edit function takes the module's tensor (the first element if it returns a tuple) and the
module's name, and returns its replacement."""


class _StopForward(Exception):
    """Raised from a hook to cut a ``module_hooks(..., stop=True)`` pass; the wrapped
    ``model.forward`` catches it. Seeing it means the model was called some other way."""

    def __init__(self) -> None:
        super().__init__("the forward pass was cut by module_hooks(stop=True); call the model "
                         "given to module_hooks, inside its context")


@dataclass
class ModuleRecord:
    """What was recorded at one module during the last forward pass."""

    input: Tensor | None = None
    output: Tensor | None = None


def first_tensor(value: Any) -> Tensor:
    """The main tensor of a module's output (blocks and attention return tuples)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"cannot find a tensor in a module output of type {type(value).__name__}")


def _replace_first(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    return type(value)((new, *value[1:])) if isinstance(value, tuple) else [new, *value[1:]]


def _keep(t: Tensor, detach: bool, clone: bool) -> Tensor:
    if detach:
        t = t.detach()
    return t.clone() if clone else t


def _resolve(fn: EditFn | Mapping[str, EditFn] | None, name: str) -> EditFn | None:
    if fn is None:
        return None
    if isinstance(fn, Mapping):
        return fn.get(name)
    return fn


@contextmanager
def module_hooks(
    model: nn.Module,
    names: Iterable[str],
    *,
    retain_input: bool = False,
    retain_output: bool = False,
    edit_input: EditFn | Mapping[str, EditFn] | None = None,
    edit_output: EditFn | Mapping[str, EditFn] | None = None,
    detach: bool = True,
    clone: bool = False,
    stop: bool = False,
) -> Iterator[dict[str, ModuleRecord]]:
    """Record and/or replace the inputs and outputs of the named modules.

    Args:
        model: the model whose submodules are hooked.
        names: module names, as in ``model.named_modules()`` (or a single name).
        retain_input: keep each module's first positional input in ``record[name].input``.
        retain_output: keep each module's (first) output in ``record[name].output``.
        edit_input: a function (or one per name) that replaces the module's first input.
        edit_output: a function (or one per name) that replaces the module's (first) output.
        detach: detach recorded tensors from the graph (set False to backprop through them).
        clone: copy recorded tensors (needed when a later in-place op would change them).
        stop: end each pass once every named module has been reached: right after its input
            hook when only its input is recorded or edited, after it has run when its output is
            wanted. ``model(...)`` (the ``model`` given here) then returns ``None``. Each call
            of the model is a new pass.

    Yields:
        A dict from module name to :class:`ModuleRecord`, filled in by each forward pass (the
        latest pass wins). Recorded inputs are taken *after* ``edit_input`` and recorded outputs
        *after* ``edit_output``.

    Raises:
        AttributeError: a name is not a submodule of ``model`` (nothing is hooked then).
        ValueError: a mapping of edit functions names a module not in ``names`` (it would
            silently never run), or ``stop`` with nothing to record or edit.
    """
    if isinstance(names, str):  # one name, not an iterable of its characters
        names = [names]
    names = list(dict.fromkeys(names))
    modules = {n: model.get_submodule(n) for n in names}  # raises before any hook is added
    for what, fn in (("edit_input", edit_input), ("edit_output", edit_output)):
        if isinstance(fn, Mapping) and set(fn) - set(names):
            raise ValueError(f"{what} has functions for modules that are not hooked: "
                             f"{sorted(set(fn) - set(names))}; add them to names")
    records = {n: ModuleRecord() for n in names}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    # stop: the modules whose output is wanted stop the pass after running, the others before
    after = {n for n in names if retain_output or _resolve(edit_output, n) is not None}
    before = {n for n in names if n not in after
              and (retain_input or _resolve(edit_input, n) is not None)}
    if stop and not after | before:
        raise ValueError("stop=True needs something to record or edit")
    reached: set[str] = set()  # the modules reached in the current pass

    def reach(name: str) -> None:
        reached.add(name)
        if len(reached) == len(after | before):
            raise _StopForward

    def pre_hook(name: str) -> Callable[..., Any]:
        fn = _resolve(edit_input, name)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                x, rest, key = args[0], args[1:], None
            elif not kwargs:
                raise TypeError(f"module {name!r} was called without inputs to record or edit")
            else:  # some blocks take hidden_states as a keyword argument
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                x, rest = kwargs[key], ()
            if fn is not None:
                x = fn(x, name)
            if retain_input:
                records[name].input = _keep(x, detach, clone)
            if stop and name in before:
                reach(name)
            if fn is None:
                return None
            if key is None:
                return (x, *rest), kwargs
            return args, {**kwargs, key: x}

        return hook

    def post_hook(name: str) -> Callable[..., Any]:
        fn = _resolve(edit_output, name)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if fn is not None:
                output = _replace_first(output, fn(first_tensor(output), name))
            if retain_output:
                records[name].output = _keep(first_tensor(output), detach, clone)
            if stop:
                reach(name)
            return output if fn is not None else None

        return hook

    own_forward = "forward" in vars(model)  # an instance attribute (e.g. set by accelerate)
    saved_forward = vars(model).get("forward")
    try:
        for n, m in modules.items():
            if retain_input or _resolve(edit_input, n) is not None:
                handles.append(m.register_forward_pre_hook(pre_hook(n), with_kwargs=True))
            if retain_output or _resolve(edit_output, n) is not None:
                handles.append(m.register_forward_hook(post_hook(n)))
        if stop:
            inner = model.forward

            def forward(*args: Any, **kwargs: Any) -> Any:
                reached.clear()
                try:
                    return inner(*args, **kwargs)
                except _StopForward:
                    return None
                finally:
                    reached.clear()

            model.forward = forward  # type: ignore[method-assign]
        yield records
    finally:
        for h in handles:
            h.remove()
        if stop:
            if own_forward:
                model.forward = saved_forward  # type: ignore[method-assign]
            else:
                vars(model).pop("forward", None)


def replace_positions(positions: Tensor | list[int] | int, values: Tensor,
                      batch: Tensor | list[int] | None = None) -> EditFn:
    """An edit function that writes ``values`` at token ``positions`` of each sequence.

    Args:
        positions: one token index per row of ``batch`` (or a single index for all rows).
        values: ``(d,)`` for one vector everywhere, or ``(n, d)`` one per row.
        batch: the batch rows to edit (default: every row, in order).

    The result is differentiable with respect to ``values``.
    """

    def fn(x: Tensor, name: str) -> Tensor:  # x: (B, T, d)
        rows = torch.arange(x.shape[0], device=x.device) if batch is None else torch.as_tensor(
            batch, device=x.device)
        pos = torch.as_tensor(positions, device=x.device).expand(rows.shape[0])
        v = values.to(dtype=x.dtype, device=x.device).expand(rows.shape[0], x.shape[-1])
        x = x.clone()
        x[rows, pos] = v  # (n, d) written at (row, pos)
        return x

    return fn
