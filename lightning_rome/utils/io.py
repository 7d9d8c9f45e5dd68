"""Atomic writes, checksums and the cache directory."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "CorruptFileError",
    "atomic_path",
    "atomic_write_json",
    "cache_dir",
    "tensor_checksum",
    "weight_digest",
]


class CorruptFileError(ValueError):
    """A cache or results file is truncated, corrupt, or not in the expected format."""


def cache_dir(*parts: str) -> Path:
    """``$LIGHTNING_ROME_CACHE`` or ``~/.cache/lightning_rome``, joined with ``parts``."""
    root = os.environ.get("LIGHTNING_ROME_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lightning_rome")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` atomically,
    on error it is deleted, so readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def tensor_checksum(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (bit-exact identity)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        # A memoryview hashes the bytes in place (``tobytes()`` would copy the whole tensor).
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# ``weight_digest``: per tensor object, (dtype, shape, device, fingerprint) → its SHA-256.
_DIGESTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_FP_CHUNK = 1 << 22  # elements per step of the fingerprint (bounds its int64 temporaries)
_M1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64 (odd)
_M2 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64 (odd)
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_fingerprint(t: Tensor) -> int:
    """A 64-bit fingerprint of every element's bits, computed where ``t`` lives (only the
    8-byte result leaves an accelerator). Each element's bits are mixed with its index
    (``h = ((w ⊕ k_i)·M₂) ⊕ ((w ⊕ k_i)·M₂ ≫ 29)``, ``k_i = (i+1)·M₁``, wrapping int64
    arithmetic) and the mixes are summed mod 2⁶⁴, so the value does not depend on the device
    or the order of the sum. A change of one element always changes it; other changes leave
    it equal with a chance of about 2⁻⁶⁴ (it is not a cryptographic hash)."""
    flat = t.detach().reshape(-1)
    w = flat.view(_INT_OF_SIZE[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for s in range(0, w.numel(), _FP_CHUNK):
        v = w[s:s + _FP_CHUNK].to(torch.int64)  # (c,)
        k = torch.arange(s + 1, s + 1 + v.numel(), dtype=torch.int64, device=v.device) * _M1
        h = (v ^ k) * _M2
        total += (h ^ (h >> 29)).sum()
    return int(total)


def weight_digest(t: Tensor, *, on_device: bool | None = None) -> str:
    """:func:`tensor_checksum` of a tensor that changes in place (a model's weight), with the
    SHA-256 computed once per version of its bits.

    What is hashed when:

    * On an accelerator (``on_device``, the default for non-CPU tensors), every call computes
      :func:`tensor_fingerprint` on the device; the SHA-256 (the tensor copied to the CPU and
      hashed there) is computed only when the fingerprint, dtype, shape or device differ from
      those of the last SHA-256 of this tensor object, and reused otherwise. Every write is
      seen, including writes through ``.data`` and dtype casts, which leave ``_version``
      unchanged (so the version counter alone is not used).
    * On the CPU the SHA-256 is computed at every call: the bytes must be read in full either
      way, and the SHA-256 is faster there than the fingerprint (1600×6400 float32, one
      thread: 0.16 s against 0.71 s).
    """
    if on_device is None:
        on_device = t.device.type not in ("cpu", "meta")
    if not on_device or not t.numel() or t.element_size() not in _INT_OF_SIZE:
        return tensor_checksum(t)
    key = (t.dtype, tuple(t.shape), str(t.device), tensor_fingerprint(t))
    hit = _DIGESTS.get(t)
    if hit is not None and hit[0] == key:
        return hit[1]
    digest = tensor_checksum(t)
    _DIGESTS[t] = (key, digest)
    return digest
