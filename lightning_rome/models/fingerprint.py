"""Content fingerprints of a model's parameters, for cache keys.

A parameter's SHA-256 (of its dtype, shape and every byte) is computed once and reused while the
parameter is unchanged: the memo is keyed by the tensor object, its storage pointer and its
autograd version counter (which every in-place write bumps, also under ``no_grad`` and
``inference_mode``). Writes through ``.data`` bypass the version counter, so a strided sample of
each tensor is re-hashed on every call as well: a rescaled or replaced tensor is seen; a change
of a few entries through ``.data`` only if the sample covers them.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_rome.models.layout import ModelLayout
from lightning_rome.utils.io import tensor_checksum

__all__ = ["parameters_digest", "tensor_digest", "upstream_digest"]

_SAMPLE = 1 << 12  # entries re-hashed on every call


@dataclass
class _Entry:
    ref: weakref.ref
    state: tuple
    sample: str
    digest: str


_DIGESTS: dict[int, _Entry] = {}


def _full_digest(t: Tensor) -> str:
    return tensor_checksum(t)


def _sample_digest(t: Tensor) -> str:
    flat = t.detach().reshape(-1)
    return tensor_checksum(flat[:: max(1, flat.numel() // _SAMPLE)])


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of ``t``'s dtype, shape and bytes, memoised per tensor version (see the module
    docstring)."""
    state = (t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device))
    sample = _sample_digest(t)
    key = id(t)
    entry = _DIGESTS.get(key)
    if entry is not None and entry.ref() is t and entry.state == state and entry.sample == sample:
        return entry.digest
    digest = _full_digest(t)
    _DIGESTS[key] = _Entry(weakref.ref(t, lambda _, k=key: _DIGESTS.pop(k, None)), state, sample,
                           digest)
    return digest


def parameters_digest(model: nn.Module,
                      keep: Callable[[str], bool] | None = None) -> str:
    """One SHA-256 over the parameters and buffers of ``model`` whose names ``keep`` accepts
    (default: all), by name (tied weights count once, under their first name)."""
    h = hashlib.sha256()
    for name, t in _named_tensors(model):
        if keep is None or keep(name):
            h.update(f"{name}={tensor_digest(t)};".encode())
    return h.hexdigest()


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


def upstream_digest(model: nn.Module, module_name: str,
                    layout: ModelLayout | None = None) -> str:
    """:func:`parameters_digest` of everything that can change ``module_name``'s input: every
    parameter and buffer except the module's own and, with a ``layout``, those of later blocks,
    of the final norm and of the LM head (a head tied to the embedding stays in, under the
    embedding's name). Without a layout only the module's own are left out."""
    own = f"{module_name}."
    blocks = layout.blocks if layout is not None else None
    after = tuple(f"{p}." for p in (layout.final_norm, layout.lm_head)) if layout else ()
    layer = None
    if blocks and module_name.startswith(f"{blocks}."):
        head = module_name[len(blocks) + 1:].split(".", 1)[0]
        layer = int(head) if head.isdigit() else None

    def keep(name: str) -> bool:
        if name.startswith(own) or name.startswith(after):
            return False
        if layer is not None and name.startswith(f"{blocks}."):
            head = name[len(blocks) + 1:].split(".", 1)[0]
            return not (head.isdigit() and int(head) > layer)
        return True

    return parameters_digest(model, keep)
