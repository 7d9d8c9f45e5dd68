"""On-disk cache of second-moment statistics: keys, safetensors files, validation, checkpoints.

A statistics file is a safetensors file holding ``mom2_sum`` ``(d, d)`` and ``k_sum`` ``(d,)``,
with JSON metadata: the cache key it was computed for, the token count, the number of texts
read, whether it is complete or a checkpoint of an unfinished run, and a SHA-256 checksum of
every tensor; the metadata has a SHA-256 checksum of its own. Files are written atomically and
checked when read; a file that fails a check raises
:class:`~lightning_rome.utils.io.CorruptFileError`.

What goes into a key (and why):
    - the model: ``config._name_or_path``, a hash of its config (architecture), the dtype of the
      module's weight, and the SHA-256 of every parameter and buffer upstream of the module
      (embeddings, earlier blocks, and the module's own block except the module itself; see
      :func:`lightning_rome.models.fingerprint.upstream_digest`), hashed once per parameter
      version. Two checkpoints under the same name therefore get different keys, and so does a
      model whose earlier layers were changed (also by an edit: the keys ``k`` change with
      them); rewriting the module's own weight (ROME at the same layer) keeps its statistics;
    - the tokenizer: its class, vocabulary size and the ids of a probe sentence;
    - the module name, the corpus identity, ``n_samples``/``n_tokens``, ``seq_len`` and the
      accumulation dtype. Batch sizes are left out: they change only the rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.stats.moments import SecondMoment
from lightning_rome.utils.io import CorruptFileError, atomic_path, cache_dir, tensor_checksum

__all__ = [
    "FORMAT",
    "CacheWriteError",
    "load_second_moments",
    "model_fingerprint",
    "partial_path",
    "save_second_moments",
    "stats_key",
    "stats_path",
    "tokenizer_fingerprint",
    "write_safetensors",
]

FORMAT = "lightning_rome.second_moment"
VERSION = 1
HEADER_CHECKSUM_KEY = "lightning_rome_sha256"  # the metadata entry holding the header's SHA-256
_PROBE = "The Eiffel Tower is located in Paris. Ünïcödé 東京 1234 <|endoftext|>"
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "torch_dtype", "dtype",
                    "_attn_implementation", "_attn_implementation_internal", "use_cache")


class CacheWriteError(OSError):
    """A cache file could not be written (a full disk, no permission, ...). One line, naming the
    file and the cause; ``errno`` is the underlying error's, when known."""


_WARNED_WRITE: set[str] = set()  # files whose write error was already reported


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, Tensor],
                      metadata: dict[str, str], *, what: str,
                      on_error: Literal["warn", "raise"] = "warn") -> bool:
    """Write a safetensors file atomically. A write error (``OSError``, or the
    ``SafetensorError`` that safetensors raises for one) is reported once per file as a warning
    (``on_error="warn"``; returns ``False``: the caller goes on with its result uncached) or
    raised as a one-line :class:`CacheWriteError` (``"raise"``). Returns ``True`` on success.

    Args:
        what: what the file holds, for the message (e.g. ``"statistics"``).
    """
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return True
    except (OSError, SafetensorError) as err:
        code = getattr(err, "errno", None)
        if code is None:
            found = re.search(r"code: (\d+)", str(err))
            code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code and not isinstance(err, OSError) else _one_line(err)
        message = f"could not write the {what} file {path}: {reason}"
        if on_error == "raise":
            raise CacheWriteError(code, message) if code else CacheWriteError(message) from err
        if str(path) not in _WARNED_WRITE:
            _WARNED_WRITE.add(str(path))
            warnings.warn(f"{message}; the result is used but not cached", stacklevel=3)
        return False


def _sha(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def model_fingerprint(model: nn.Module, module_name: str) -> dict[str, str]:
    """The part of a statistics key that identifies the model (see the module docstring)."""
    from lightning_rome.models.fingerprint import upstream_digest
    from lightning_rome.models.layout import ModelLayout, UnknownModelFamilyError, get_layout

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG}
        name = str(getattr(config, "_name_or_path", "") or "")
    else:
        cfg, name = {"class": type(model).__name__}, ""
    module = model.get_submodule(module_name)
    param = next(module.parameters(), None)
    try:
        layout: ModelLayout | None = get_layout(model)
    except UnknownModelFamilyError:
        layout = None
    return {
        "name": name,
        "class": type(model).__name__,
        "config": _sha(json.dumps(cfg, sort_keys=True, default=str)),
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else "none",
        "weights": upstream_digest(model, module_name, layout)[:32],
    }


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Class, vocabulary size and the ids of a probe sentence, hashed."""
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return _sha(f"{type(tokenizer).__name__}|{len(tokenizer)}|{list(ids)}")


def stats_key(model: nn.Module, tokenizer: PreTrainedTokenizerBase, module_name: str, *,
              corpus_id: str, n_samples: int | None, n_tokens: int | None, seq_len: int,
              dtype: torch.dtype) -> dict[str, Any]:
    """The full cache key of one module's statistics, a JSON-serialisable dict."""
    return {
        "kind": "mom2",
        "version": VERSION,
        "model": model_fingerprint(model, module_name),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "module": module_name,
        "corpus": corpus_id,
        "n_samples": n_samples,
        "n_tokens": n_tokens,
        "seq_len": int(seq_len),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def key_hash(key: dict[str, Any]) -> str:
    return _sha(json.dumps(key, sort_keys=True), 20)


def stats_root(cache: bool | str | os.PathLike[str] | None) -> Path:
    """The statistics folder: ``cache_dir("stats")`` for ``True``/``None``, else ``cache``."""
    if cache is True or cache is None:
        return cache_dir("stats")
    if cache is False:
        raise ValueError("caching is disabled")
    return Path(cache)


def stats_path(root: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    """``root/<model name>/<module>-<sample>-<dtype>-<hash>.safetensors``."""
    if key["n_samples"] is not None:
        size = f"n{key['n_samples']}"
    elif key["n_tokens"] is not None:
        size = f"t{key['n_tokens']}"
    else:
        size = "all"
    name = f"{_slug(key['module'])}-{size}-{key['dtype']}-{key_hash(key)}.safetensors"
    return Path(root) / _slug(key["model"]["name"]) / name


def partial_path(root: str | os.PathLike[str], keys: list[dict[str, Any]]) -> Path:
    """The checkpoint file of an unfinished pass over the modules with these keys."""
    joint = _sha(json.dumps(keys, sort_keys=True), 20)
    return Path(root) / _slug(keys[0]["model"]["name"]) / f"partial-{joint}.safetensors"


def save_second_moments(path: str | os.PathLike[str], moments: list[SecondMoment],
                        keys: list[dict[str, Any]] | None = None, *, complete: bool = True,
                        on_error: Literal["warn", "raise"] = "warn") -> bool:
    """Write statistics atomically (one module, or several for a checkpoint).

    A write error (e.g. a full disk) warns once per file and returns ``False``, so that
    statistics already computed are used uncached; ``on_error="raise"`` raises a one-line
    :class:`CacheWriteError` instead (see :func:`write_safetensors`).

    Args:
        path: the file.
        moments: the statistics; all must have the same ``count`` and ``n_texts`` when more
            than one is saved (they come from one pass).
        keys: the cache key of each (stored and checked on load).
        complete: ``False`` marks a checkpoint of an unfinished pass.
    """
    keys = keys if keys is not None else [m.meta.get("key", {}) for m in moments]
    if len(keys) != len(moments):
        raise ValueError(f"{len(moments)} statistics but {len(keys)} keys")
    tensors: dict[str, Tensor] = {}
    for i, m in enumerate(moments):
        tensors[f"{i}.mom2_sum"] = m.mom2_sum.detach().cpu().contiguous()  # (d, d)
        if m.k_sum is not None:
            tensors[f"{i}.k_sum"] = m.k_sum.detach().cpu().contiguous()  # (d,)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "complete": complete,
        "entries": [
            {"key": k, "count": m.count, "n_texts": m.n_texts, "has_k_sum": m.k_sum is not None,
             "meta": {mk: mv for mk, mv in m.meta.items() if mk != "key"}}
            for k, m in zip(keys, moments)
        ],
        "checksums": {name: tensor_checksum(t) for name, t in tensors.items()},
    }
    text = json.dumps(header)
    what = "statistics" if complete else "statistics checkpoint"
    names = ", ".join(str(k.get("module", "?")) for k in keys if isinstance(k, dict))
    return write_safetensors(path, tensors, {"lightning_rome": text,
                                             HEADER_CHECKSUM_KEY: _sha(text, 64)},
                             what=f"{what} ({names})" if names else what, on_error=on_error)


def load_second_moments(path: str | os.PathLike[str],
                        expected_keys: list[dict[str, Any]] | None = None, *,
                        complete: bool | None = True) -> list[SecondMoment]:
    """Read and validate a statistics file written by :func:`save_second_moments`.

    Checks: the file parses, has the expected format, keys and completeness, every tensor has
    its recorded checksum, is square/float and finite, counts are consistent.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: any check fails (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no statistics file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # truncated or garbled
        raise CorruptFileError(f"statistics file {path} cannot be read: {err}") from err
    text, digest = metadata.get("lightning_rome"), metadata.get(HEADER_CHECKSUM_KEY)
    # The header (counts, keys, tensor checksums) has a checksum of its own. A file without one
    # (damaged, or written by an earlier version) is invalid, and a cache recomputes it.
    if text is None or digest is None or _sha(text, 64) != digest:
        raise CorruptFileError(f"statistics file {path}: its header is missing or fails its "
                               "checksum")
    try:
        header = json.loads(metadata["lightning_rome"])
        entries = header["entries"]
        checksums = header["checksums"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"statistics file {path} has no valid metadata: {err}") from err
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CorruptFileError(f"{path} is not a version-{VERSION} {FORMAT} file")
    if complete is not None and bool(header.get("complete")) != complete:
        raise CorruptFileError(f"{path}: expected a {'complete' if complete else 'partial'} file")
    if set(checksums) != set(tensors):
        raise CorruptFileError(f"{path}: tensors {sorted(tensors)} do not match the recorded "
                               f"{sorted(checksums)}")
    for name, t in tensors.items():
        if tensor_checksum(t) != checksums[name]:
            raise CorruptFileError(f"{path}: checksum mismatch for tensor {name!r}")
    if expected_keys is not None:
        found = [e.get("key") for e in entries]
        if found != expected_keys:
            raise CorruptFileError(f"{path} holds statistics for other keys than expected")
    out = []
    for i, e in enumerate(entries):
        mom2_sum, k_sum = tensors.get(f"{i}.mom2_sum"), tensors.get(f"{i}.k_sum")
        if mom2_sum is None or mom2_sum.ndim != 2 or mom2_sum.shape[0] != mom2_sum.shape[1]:
            raise CorruptFileError(f"{path}: entry {i} has no square mom2_sum")
        if not mom2_sum.is_floating_point() or (k_sum is not None and (
                k_sum.dtype != mom2_sum.dtype or tuple(k_sum.shape) != (mom2_sum.shape[0],))):
            raise CorruptFileError(f"{path}: entry {i} has inconsistent shapes or dtypes")
        if e.get("has_k_sum") != (k_sum is not None):
            raise CorruptFileError(f"{path}: entry {i} is missing its k_sum")
        expected_dtype = e["key"].get("dtype") if isinstance(e.get("key"), dict) else None
        if expected_dtype and str(mom2_sum.dtype).removeprefix("torch.") != expected_dtype:
            raise CorruptFileError(f"{path}: entry {i} is {mom2_sum.dtype}, key says "
                                   f"{expected_dtype}")
        if not torch.isfinite(mom2_sum).all() or (k_sum is not None and
                                                  not torch.isfinite(k_sum).all()):
            raise CorruptFileError(f"{path}: entry {i} has non-finite values")
        count, n_texts = e.get("count"), e.get("n_texts")
        if not isinstance(count, int) or not isinstance(n_texts, int) or count < 0 or (
                header["complete"] and count == 0):
            raise CorruptFileError(f"{path}: entry {i} has an invalid token count {count!r}")
        diag_min = float(mom2_sum.diagonal().min()) if mom2_sum.numel() else 0.0
        if diag_min < -1e-6 * max(1.0, math.fabs(float(mom2_sum.diagonal().max()))):
            raise CorruptFileError(f"{path}: entry {i} has a negative diagonal (not Σ k kᵀ)")
        meta = dict(e.get("meta") or {})
        meta["key"] = e["key"]
        out.append(SecondMoment(mom2_sum, count, k_sum, n_texts, meta))
    return out
