"""``WeightPatch``: what every editor returns, and the only way edits touch a model's weights.

A patch maps parameter names to deltas in the canonical ``[out, in]`` orientation (see
:mod:`lightning_rome.models.weights`): low-rank factors ``left @ right`` (ROME, MEMIT, MEND) or a
dense tensor (FT). Applying and reverting are transactional and exact:

* ``apply`` checks every name, shape and the checksum of the weights the patch was computed
  against *before* it writes anything, so a bad patch leaves the model untouched; a write that
  fails midway (out of memory, say) is rolled back, and the registry of active patches is only
  updated once every weight is written: ``apply`` and ``revert`` are all or nothing.
* A ``torch.compile`` wrapper is resolved to the module it wraps
  (:func:`~lightning_rome.utils.modules.unwrap_model`), so a patch applied through the wrapper
  reverts exactly on the inner module and vice versa.
* The first patch applied to a parameter keeps a copy of that one parameter's original bits.
  Every weight is then ``cast(original + sum of active deltas)``, computed in float32 (or
  float64), so reverting patches in any order restores the original bits exactly.
* A weight changed by something else since (an optimiser step, say) is detected; ``revert``
  then refuses, unless ``force=True``, in which case it subtracts the delta.
* The registry of applied patches and original bits lives on the model (the attribute
  :data:`REGISTRY_ATTR`), not in the process: :func:`registry_state` gives it in a
  checkpoint-safe form and :func:`load_registry_state` re-registers it on a model that holds the
  checkpoint's weights, so that reverting stays bit-exact after a resume (the edit callbacks do
  this through their checkpoint hooks).
* :class:`EditTransaction` applies edits one after another and leaves all applied or none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_rome.models.weights import is_transposed
from lightning_rome.requests import EditRequest
from lightning_rome.utils.io import CorruptFileError, atomic_path, tensor_checksum, weight_digest
from lightning_rome.utils.modules import unwrap_model

__all__ = ["EditTransaction", "LowRankDelta", "PatchMismatchError", "WeightPatch",
           "load_registry_state", "registered_patch", "registry_state"]

FORMAT = "lightning_rome.weight_patch"
FORMAT_VERSION = 1
HEADER_KEY = "lightning_rome"  # safetensors metadata entry holding the JSON header
HEADER_CHECKSUM_KEY = "lightning_rome_sha256"  # and the one holding the header's SHA-256


class PatchMismatchError(RuntimeError):
    """The model's weights are not those the patch was computed against (or were changed since
    the patch was applied)."""


@dataclass
class LowRankDelta:
    """``Δ = left @ right``: ``left`` is ``(out, r)``, ``right`` is ``(r, in)``."""

    left: Tensor
    right: Tensor

    def __post_init__(self) -> None:
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(f"low-rank factors must be (out, r) and (r, in), got "
                             f"{tuple(self.left.shape)} and {tuple(self.right.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.left.to(dtype) @ self.right.to(dtype)  # (out, in)

    def numel(self) -> int:
        """Numbers stored: ``r·(out + in)`` (as ``Tensor.numel`` for a dense delta)."""
        return self.left.numel() + self.right.numel()

    def norm(self) -> float:
        """Frobenius norm without forming the product or an ``r×r`` Gram matrix:
        ``‖LR‖² = Σ_kl (LᵀL)_kl (RRᵀ)_kl``, summed over blocks of at most ``_NORM_BLOCK`` rows
        ``k`` (temporaries ``(_NORM_BLOCK, r)``), in float64."""
        L, R = self.left.detach().double(), self.right.detach().double()  # (m, r), (r, n)
        total = torch.zeros((), dtype=torch.float64, device=L.device)
        for s in range(0, self.rank, _NORM_BLOCK):
            gl = L[:, s:s + _NORM_BLOCK].T @ L  # (b, r)
            gr = R[s:s + _NORM_BLOCK] @ R.T  # (b, r)
            total += (gl * gr).sum()
        return float(total.clamp(min=0).sqrt())

    def to(self, *args: Any, **kwargs: Any) -> LowRankDelta:
        return LowRankDelta(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))


_NORM_BLOCK = 64  # rows of the Gram product summed at a time by LowRankDelta.norm

Delta = Tensor | LowRankDelta


def _dense(d: Delta, dtype: torch.dtype) -> Tensor:
    return d.dense(dtype) if isinstance(d, LowRankDelta) else d.to(dtype)


def _shape(d: Delta) -> tuple[int, ...]:
    return tuple(d.shape)


def _sum_deltas(deltas: list[Delta]) -> Delta:
    """``Σ deltas`` of one parameter, bounded in size: low-rank factors are concatenated while
    the total rank ``r`` keeps ``r·(m + n) ≤ m·n``; beyond that (or with a dense delta) the sum
    is one dense ``(m, n)`` tensor. Dtype: the promotion of the deltas' (float32 at least for
    a dense sum)."""
    if len(deltas) == 1:
        return deltas[0]
    low = [d for d in deltas if isinstance(d, LowRankDelta)]
    dense = [d for d in deltas if not isinstance(d, LowRankDelta)]
    dt = low[0].left.dtype if low else dense[0].dtype
    for d in deltas:
        for t in ((d.left, d.right) if isinstance(d, LowRankDelta) else (d,)):
            dt = torch.promote_types(dt, t.dtype)
    shape = _shape(deltas[0])
    m, n = shape if len(shape) == 2 else (0, 0)
    rank = sum(d.rank for d in low)
    if not dense and rank * (m + n) <= m * n:
        dev = low[0].left.device
        return LowRankDelta(torch.cat([d.left.to(dev, dt) for d in low], 1),  # (m, r)
                            torch.cat([d.right.to(dev, dt) for d in low], 0))  # (r, n)
    ct = torch.promote_types(dt, torch.float32)
    dev = (low[0].left if low else dense[0]).device
    acc = torch.zeros(shape, dtype=ct, device=dev)  # (m, n)
    if low:  # all the factors in one product
        acc += (torch.cat([d.left.to(dev, ct) for d in low], 1)
                @ torch.cat([d.right.to(dev, ct) for d in low], 0))
    for d in dense:
        acc += d.to(dev, ct)
    return acc


@dataclass
class _ParamState:
    """A parameter under patches: its original bits and the patches active on it."""

    original: Tensor
    active: list[WeightPatch] = field(default_factory=list)
    version: int = -1
    checksum: str = ""


REGISTRY_ATTR = "_lightning_rome_patches"  # the model attribute holding its applied patches
REGISTRY_FORMAT = "lightning_rome.patch_registry"


def _registry(model: nn.Module, *, create: bool = False) -> dict[str, _ParamState]:
    """The model's registry of applied patches: parameter name → its original bits and the
    patches active on it. It lives on the model (so it goes where the model goes and dies with
    it); :func:`registry_state` / :func:`load_registry_state` carry it through checkpoints."""
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None:
        reg = {}
        if create:
            model.__dict__[REGISTRY_ATTR] = reg
    return reg


def _canonical_view(model: nn.Module, name: str) -> Tensor:
    """The parameter ``name`` in canonical orientation (transposed for Conv1D weights)."""
    try:
        param = model.get_parameter(name)
    except AttributeError as e:
        raise PatchMismatchError(f"the model has no parameter {name!r}") from e
    module_name, _, leaf = name.rpartition(".")
    if leaf == "weight" and param.ndim == 2:
        module = model.get_submodule(module_name)
        try:
            if is_transposed(module):
                return param.T
        except TypeError:
            pass
    return param


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class WeightPatch:
    """A set of weight deltas with provenance.

    Args:
        deltas: parameter name → canonical-orientation delta (``Tensor`` or ``LowRankDelta``).
        method: the editor that made it (``"rome"``, ``"memit"``, ...).
        hparams: the editor's hyperparameters (JSON-serialisable).
        requests: the edit requests it implements.
        model_name: the model it was computed on.
        checksums: parameter name → :func:`tensor_checksum` of the weight it was computed
            against. ``apply`` verifies them.

    Example:
        >>> patch = rome.edit(model, tok, request)      # a WeightPatch
        >>> patch.apply(model); ...; patch.revert(model)  # bit-exact
        >>> patch.save("edit.safetensors"); WeightPatch.load("edit.safetensors")
    """

    def __init__(
        self,
        deltas: Mapping[str, Delta],
        *,
        method: str = "",
        hparams: Mapping[str, Any] | None = None,
        requests: Iterable[EditRequest] = (),
        model_name: str | None = None,
        checksums: Mapping[str, str] | None = None,
        uid: str | None = None,
    ) -> None:
        self.deltas: dict[str, Delta] = dict(deltas)
        for name, d in self.deltas.items():
            if not isinstance(d, Tensor | LowRankDelta):
                raise TypeError(f"delta for {name!r} must be a Tensor or LowRankDelta")
        self.method = method
        self.hparams = dict(hparams or {})
        self.requests = list(requests)
        self.model_name = model_name
        self.checksums = dict(checksums or {})
        self.uid = uid or uuid.uuid4().hex  # one edit's identity, kept by to() and to_state()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(cls, model: nn.Module, deltas: Mapping[str, Delta], **kwargs: Any,
                   ) -> WeightPatch:
        """A patch whose checksums are taken from ``model``'s current weights."""
        model = unwrap_model(model)
        checksums = {n: weight_digest(model.get_parameter(n)) for n in deltas}
        name = kwargs.pop("model_name", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None)
        return cls(deltas, checksums=checksums, model_name=name, **kwargs)

    @property
    def names(self) -> list[str]:
        return list(self.deltas)

    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The delta of ``name`` as a dense canonical ``[out, in]`` tensor."""
        return _dense(self.deltas[name], dtype)

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each delta."""
        return {n: d.norm() if isinstance(d, LowRankDelta) else float(d.double().norm())
                for n, d in self.deltas.items()}

    def to(self, *args: Any, **kwargs: Any) -> WeightPatch:
        return WeightPatch({n: d.to(*args, **kwargs) for n, d in self.deltas.items()},
                           method=self.method, hparams=self.hparams, requests=self.requests,
                           model_name=self.model_name, checksums=self.checksums, uid=self.uid)

    def to_state(self) -> dict[str, Any]:
        """A checkpoint-safe form: tensors (on the CPU) and a JSON string only, so that it loads
        with ``torch.load(weights_only=True)``; :meth:`from_state` reads it back."""
        return {"header": json.dumps({**self.header(), "uid": self.uid}, default=str),
                "tensors": self._tensors()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WeightPatch:
        """The patch of :meth:`to_state` (same deltas, provenance and ``uid``)."""
        header = json.loads(state["header"])
        return cls(_deltas_from(header, state["tensors"]), method=header.get("method", ""),
                   hparams=header.get("hparams"),
                   requests=[EditRequest.from_dict(r) for r in header.get("requests", [])],
                   model_name=header.get("model_name"), checksums=header.get("checksums"),
                   uid=header.get("uid"))

    def compose(self, *others: WeightPatch) -> WeightPatch:
        """One patch equal to applying ``self`` then each of ``others`` in turn.

        The deltas of one parameter are summed by :func:`_sum_deltas`: low-rank factors
        concatenate while that is smaller than a dense delta (``r·(m + n) ≤ m·n``), and become
        one dense delta beyond, so that composing many edits stays at or below the dense size.
        Composing all at once (``a.compose(b, c, ...)``) concatenates each parameter's factors
        once.
        """
        patches = [self, *others]
        by_name: dict[str, list[Delta]] = {}
        for p in patches:
            for n, d in p.deltas.items():
                if n in by_name and _shape(by_name[n][0]) != _shape(d):
                    raise ValueError(f"cannot compose deltas of {n!r}: shapes "
                                     f"{_shape(by_name[n][0])} and {_shape(d)}")
                by_name.setdefault(n, []).append(d)
        deltas = {n: _sum_deltas(ds) for n, ds in by_name.items()}
        # The composition is applied to the weights ``self`` was computed against: a later
        # patch's checksum of a parameter an earlier one also changes is of the already-edited
        # weight, so it is dropped even when the earlier one recorded none (it would make
        # ``apply`` fail).
        checksums = dict(self.checksums)
        touched = set(self.deltas)
        method = self.method
        for p in others:
            checksums = {**{n: c for n, c in p.checksums.items() if n not in touched},
                         **checksums}
            touched |= set(p.deltas)
            method = method if method == p.method else f"{method}+{p.method}"
        return WeightPatch(deltas, method=method, hparams=self.hparams,
                           requests=[r for p in patches for r in p.requests],
                           model_name=next((p.model_name for p in patches if p.model_name),
                                           None), checksums=checksums)

    # ------------------------------------------------------------------ apply / revert
    def is_applied(self, model: nn.Module) -> bool:
        states = _registry(unwrap_model(model))
        return any(self in s.active for s in states.values())

    def _check_unchanged(self, model: nn.Module, name: str, state: _ParamState) -> bool:
        """True when the weight still holds the bits the patches last wrote.

        The checksum is always compared: ``param._version`` alone misses writes through
        ``param.data`` (``p.data.add_(...)``) and dtype casts by ``module.half()``, which keep
        the version counter unchanged, and that would make a revert silently discard them.
        """
        return weight_digest(model.get_parameter(name)) == state.checksum

    def _rebuild(self, model: nn.Module, name: str, state: _ParamState) -> Tensor:
        """``cast(original + Σ active deltas)`` for one parameter, canonical orientation."""
        orig = state.original.T if _is_conv_t(model, name) else state.original  # (out, in)
        ct = _compute_dtype(orig.dtype)
        acc = orig.to(ct)
        for p in state.active:
            acc = acc + _dense(p.deltas[name], ct).to(acc.device)
        return acc.to(orig.dtype)

    def _validate_deltas(self, model: nn.Module) -> None:
        """Every parameter exists, every delta has its shape and is finite (no write yet)."""
        for name, d in self.deltas.items():
            view = _canonical_view(model, name)
            if tuple(view.shape) != _shape(d):
                raise PatchMismatchError(
                    f"delta for {name!r} has shape {_shape(d)}, the model's weight is "
                    f"{tuple(view.shape)} (canonical [out, in])")
            if not bool(torch.isfinite(_dense(d, torch.float32)).all()):
                raise PatchMismatchError(f"delta for {name!r} contains NaN or inf")

    @torch.no_grad()
    def apply(self, model: nn.Module, *, force: bool = False) -> WeightPatch:
        """Add the deltas to ``model``'s weights in place (all or nothing).

        Args:
            force: apply even if the weights' checksums differ from those recorded, or were
                changed outside their patches since (the changed weights become the new
                baseline that reverting returns to).

        Raises:
            PatchMismatchError: a parameter is missing, a shape differs, a delta is not finite,
                the weights are not those the patch was computed against, or the patch is
                already applied. Nothing is written then.
        """
        model = unwrap_model(model)
        states = _registry(model, create=True)
        if self.is_applied(model):
            raise PatchMismatchError("this patch is already applied to the model")
        # 1. Validate everything before writing anything.
        self._validate_deltas(model)
        changed: dict[str, bool] = {}
        for name in self.deltas:
            current = weight_digest(model.get_parameter(name))
            if not force and name in self.checksums and current != self.checksums[name]:
                raise PatchMismatchError(
                    f"weight {name!r} does not match the checksum the patch was computed "
                    f"against (model {self.model_name!r}); pass force=True to apply anyway")
            changed[name] = name in states and current != states[name].checksum
            if changed[name] and not force:
                raise PatchMismatchError(
                    f"weight {name!r} was changed outside its patches since they were "
                    "applied; pass force=True to apply anyway")
        # 2. Compute every new weight and state (nothing written or registered yet).
        plan: dict[str, tuple[_ParamState | None, Tensor]] = {}
        for name in self.deltas:
            param = model.get_parameter(name)
            state = states.get(name)
            if state is None:
                new_state = _ParamState(original=param.detach().clone(), active=[self])
            elif changed[name]:
                # Forced over an outside change: the current weights become the new baseline.
                # The patches already active stay active (and revertible): the new original is
                # the current weight minus their deltas. (Starting a fresh state here would drop
                # them, and a later revert of one of them would silently keep its delta.)
                new_state = _ParamState(original=_baseline(model, name, state.active),
                                        active=[*state.active, self])
            else:
                new_state = _ParamState(original=state.original, active=[*state.active, self])
            plan[name] = (new_state, self._rebuild(model, name, new_state))
        # 3. Write them all (rolled back on failure), then register.
        _commit(model, states, plan)
        return self

    @torch.no_grad()
    def revert(self, model: nn.Module, *, force: bool = False) -> None:
        """Remove this patch's deltas from ``model``.

        If the patch was applied to this model in this process, the weights become
        ``cast(original + other active deltas)``, and the original bits exactly when no other
        patch is active. A patch loaded from disk onto an already-edited model is reverted by
        subtraction; a warning says so when that does not reproduce the recorded original bits.

        Raises:
            PatchMismatchError: the weights were changed since the patch was applied (by training,
                say), unless ``force=True``, in which case the delta is subtracted; or the patch
                is not applied (the weights still match the checksums it was computed against,
                e.g. after a first revert), unless ``force=True``. Nothing is written then.
        """
        model = unwrap_model(model)
        states = _registry(model)
        if not self.is_applied(model):
            self._revert_by_subtraction(model, force=force)
            return
        changed: dict[str, bool] = {}
        for name in self.deltas:
            if name not in states or self not in states[name].active:  # defensive
                raise PatchMismatchError(f"internal error: the patch is applied but {name!r} "
                                         "does not list it")
            changed[name] = not self._check_unchanged(model, name, states[name])
            if changed[name] and not force:
                raise PatchMismatchError(
                    f"weight {name!r} changed since the patch was applied; refusing to revert "
                    "(pass force=True to subtract the delta from the current weights)")
        plan: dict[str, tuple[_ParamState | None, Tensor]] = {}
        for name in self.deltas:
            state = states[name]
            active = [p for p in state.active if p is not self]
            if changed[name]:
                # Forced: subtract from the current weights, which become the new baseline.
                value = _subtract(model, name, self.deltas[name])  # (out, in)
                new_state = (_ParamState(original=_baseline(model, name, active, value),
                                         active=active) if active else None)
            elif not active:
                orig = state.original
                value, new_state = (orig.T if _is_conv_t(model, name) else orig), None
            else:
                new_state = _ParamState(original=state.original, active=active)
                value = self._rebuild(model, name, new_state)
            plan[name] = (new_state, value)
        _commit(model, states, plan)

    def _revert_by_subtraction(self, model: nn.Module, *, force: bool = False) -> None:
        # Validate everything before any write (a missing parameter, a shape, NaN).
        self._validate_deltas(model)
        current = {n: weight_digest(model.get_parameter(n)) for n in self.deltas}
        if not force and self.checksums and all(
                current.get(n) == c for n, c in self.checksums.items()):
            # The weights are exactly those the patch was computed against: it is not applied
            # (reverting twice, say), and subtracting would corrupt them.
            raise PatchMismatchError(
                "this patch is not applied to the model (its weights still match the checksums "
                "the patch was computed against); pass force=True to subtract its deltas anyway")
        _commit(model, None, {n: (None, _subtract(model, n, d)) for n, d in self.deltas.items()})
        for name in self.deltas:
            param = model.get_parameter(name)
            if name in self.checksums and weight_digest(param) != self.checksums[name]:
                warnings.warn(
                    f"patch reverted on {name!r} by subtracting its delta (it was not applied in "
                    "this process); the weights are not bit-identical to the original",
                    stacklevel=3)

    # ------------------------------------------------------------------ serialisation
    def header(self) -> dict[str, Any]:
        entries = {}
        for n, d in self.deltas.items():
            entries[n] = {"kind": "low_rank" if isinstance(d, LowRankDelta) else "dense",
                          "shape": list(_shape(d))}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "hparams": self.hparams,
            "requests": [r.to_dict() for r in self.requests],
            "model_name": self.model_name,
            "checksums": self.checksums,
            "entries": entries,
        }

    def _tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for n, d in self.deltas.items():
            if isinstance(d, LowRankDelta):
                out[f"{n}::left"] = d.left.detach().contiguous().cpu()
                out[f"{n}::right"] = d.right.detach().contiguous().cpu()
            else:
                out[f"{n}::dense"] = d.detach().contiguous().cpu()
        # safetensors refuses tensors that share memory (one delta object used for two
        # parameters, say): give every repeated storage its own copy.
        seen: set[int] = set()
        for k, t in out.items():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                out[k] = t.clone()
            seen.add(ptr)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the patch as safetensors with a JSON header, atomically.

        The header carries the SHA-256 of every tensor, and the header text its own SHA-256 (in
        a second metadata entry), so that :meth:`load` detects a change to any byte.
        """
        tensors = self._tensors()
        header = self.header()
        header["tensor_checksums"] = {k: tensor_checksum(t) for k, t in tensors.items()}
        text = json.dumps(header, default=_json_default, sort_keys=True)
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={HEADER_KEY: text,
                                                   HEADER_CHECKSUM_KEY: _sha256(text)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu",
             ) -> WeightPatch:
        """Read and validate a patch file. Nothing is unpickled.

        Raises:
            CorruptFileError: the file is truncated, not a patch, of an unknown format version,
                its header fails its checksum, or its tensors do not match the header.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"patch file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:
            raise CorruptFileError(f"{path} is not a readable safetensors patch file: {e}") from e
        try:
            header = json.loads(meta[HEADER_KEY])
            if not isinstance(header, dict):
                raise TypeError(type(header).__name__)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{path} has no valid lightning_rome header") from e
        if header.get("format") != FORMAT:
            raise CorruptFileError(f"{path} is not a lightning_rome weight patch")
        if header.get("format_version") != FORMAT_VERSION:
            raise CorruptFileError(f"{path} has patch format version "
                                   f"{header.get('format_version')!r}; this version reads "
                                   f"{FORMAT_VERSION}")
        # Without this, a flipped byte inside a string or number of the header (the method, a
        # hyperparameter, a request) would load silently as a different patch.
        if meta.get(HEADER_CHECKSUM_KEY) != _sha256(meta[HEADER_KEY]):
            raise CorruptFileError(f"{path}: the patch header fails its checksum")
        try:
            return cls._from_header(header, tensors)
        except CorruptFileError as e:
            raise CorruptFileError(f"{path}: {e}") from e
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a malformed header
            raise CorruptFileError(f"{path}: malformed patch header ({type(e).__name__}: {e})"
                                   ) from e

    @classmethod
    def _from_header(cls, header: dict[str, Any], tensors: dict[str, Tensor]) -> WeightPatch:
        expected = header.get("tensor_checksums", {})
        if set(expected) != set(tensors):
            raise CorruptFileError(f"tensors {sorted(tensors)} do not match the header's "
                                   f"{sorted(expected)}")
        for k, t in tensors.items():
            if tensor_checksum(t) != expected[k]:
                raise CorruptFileError(f"tensor {k!r} fails its checksum")
        return cls(_deltas_from(header, tensors), method=header.get("method", ""), hparams=header.get("hparams"),
                   requests=[EditRequest.from_dict(r) for r in header.get("requests", [])],
                   model_name=header.get("model_name"), checksums=header.get("checksums"))

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}: {'rank ' + str(d.rank) if isinstance(d, LowRankDelta) else 'dense'}"
            for n, d in self.deltas.items())
        return f"WeightPatch(method={self.method!r}, {len(self.requests)} request(s), {parts})"


class EditTransaction:
    """Apply patches one after another and leave the model holding all of them or none.

    Inside ``with EditTransaction(model) as tx:``, each :meth:`apply` writes one patch onto the
    model as the previous ones left it (so the next edit can be computed on the edited model).
    On leaving the block:

    * after an exception in the block (or in :meth:`commit`), every applied patch is reverted in
      reverse order, bit-exactly, and the exception propagates;
    * after a normal exit without :meth:`commit`, they are reverted too (the edits were only
      needed in turn; :meth:`composed` gives their patch, unapplied);
    * after :meth:`commit` they stay applied: as the one composed patch (the default, so that
      one ``revert`` undoes them all) or as the separate patches (``compose=False``).

    The patches' own ``apply`` is all or nothing, so a patch that fails to apply writes nothing
    and the transaction reverts only what it applied.

    Example:
        >>> with EditTransaction(model) as tx:
        ...     for r in requests:
        ...         tx.apply(editor.edit_one(model, tok, r))  # each on the model edited so far
        ...     total = tx.composed()
        ...     if keep:
        ...         tx.commit()  # total stays applied; without commit the model is restored
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model)
        self.patches: list[WeightPatch] = []
        self._total: WeightPatch | None = None
        self._open = self._used = self._committed = False

    def __enter__(self) -> EditTransaction:
        if self._used:
            raise RuntimeError("an EditTransaction is used once")
        self._open = self._used = True
        return self

    def _check_open(self, what: str) -> None:
        if not self._open:
            raise RuntimeError(f"EditTransaction.{what} outside its `with` block")

    def apply(self, patch: WeightPatch) -> WeightPatch:
        """Apply ``patch`` to the model (all or nothing) and make it part of the transaction."""
        self._check_open("apply")
        if not isinstance(patch, WeightPatch):
            raise TypeError(f"an edit returned {type(patch).__name__}, expected a WeightPatch")
        patch.apply(self.model)
        self.patches.append(patch)
        self._total = None
        return patch

    def composed(self, *, requests: Iterable[EditRequest] | None = None) -> WeightPatch:
        """The patches applied so far as one patch (the patch itself when there is one),
        with ``requests`` as its requests when given. Repeated calls return the same object
        until another patch is applied."""
        if not self.patches:
            raise ValueError("the transaction applied no patch")
        if self._total is None:
            first, *rest = self.patches
            self._total = first.compose(*rest) if rest else first
        if requests is not None:
            self._total.requests = list(requests)
        return self._total

    def commit(self, *, compose: bool = True) -> None:
        """Leave the patches applied when the block ends: as the one :meth:`composed` patch
        (re-registered bit-exactly: the separate patches are reverted, then it is applied) or,
        with ``compose=False``, as they are."""
        self._check_open("commit")
        if compose and len(self.patches) > 1:
            total = self.composed()
            self._rollback()
            total.apply(self.model)  # a failure here leaves the model as it started
            self.patches = [total]
        self._committed = True

    def _rollback(self) -> list[BaseException]:
        errors: list[BaseException] = []
        while self.patches:
            p = self.patches.pop()
            try:
                p.revert(self.model)
            except BaseException as e:  # keep reverting the others
                errors.append(e)
        return errors

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> bool:
        self._open = False
        if self._committed and exc is None:
            return False
        self._committed = False
        errors = self._rollback()
        if errors:
            if exc is None:
                raise errors[0]
            exc.add_note(f"EditTransaction: reverting the applied edits also failed: "
                         f"{type(errors[0]).__name__}: {errors[0]}")
        return False


def _deltas_from(header: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Delta]:
    """The deltas of a patch header's ``entries`` from its named tensors."""
    deltas: dict[str, Delta] = {}
    for n, entry in header["entries"].items():
        if entry["kind"] == "low_rank":
            d: Delta = LowRankDelta(tensors[f"{n}::left"], tensors[f"{n}::right"])
        elif entry["kind"] == "dense":
            d = tensors[f"{n}::dense"]
        else:
            raise CorruptFileError(f"unknown delta kind {entry['kind']!r}")
        if list(_shape(d)) != list(entry["shape"]):
            raise CorruptFileError(f"delta {n!r} has shape {_shape(d)}, header says "
                                   f"{entry['shape']}")
        deltas[n] = d
    return deltas


def registry_state(model: nn.Module) -> dict[str, Any] | None:
    """The model's applied patches and the original bits under them, checkpoint-safe (tensors
    on the CPU and JSON strings: loads with ``torch.load(weights_only=True)``), or ``None``
    when no patch is applied. Save it beside the model's ``state_dict``; after loading both,
    :func:`load_registry_state` makes every patch revert bit-exactly again."""
    reg = _registry(unwrap_model(model))
    if not reg:
        return None
    patches: dict[str, WeightPatch] = {}
    for st in reg.values():
        for p in st.active:
            patches.setdefault(p.uid, p)
    return {
        "format": REGISTRY_FORMAT,
        "patches": [p.to_state() for p in patches.values()],
        "params": {name: {"original": st.original.detach().cpu().contiguous(),
                          "active": json.dumps([p.uid for p in st.active]),
                          "checksum": st.checksum} for name, st in reg.items()},
    }


def load_registry_state(model: nn.Module, state: Mapping[str, Any]) -> dict[str, WeightPatch]:
    """Register on ``model`` the patches of :func:`registry_state`, as applied, with their
    original bits, so that reverting them is bit-exact (call it once the model holds the
    checkpoint's weights). The weights are not written. A weight changed since the state was
    taken is detected at revert time, as for a patch applied in this process.

    Loading the same state twice is a no-op (the patches already registered are returned).

    Returns:
        ``uid`` → the registered patch object (revert that object, or one with its ``uid``
        through :func:`registered_patch`).

    Raises:
        PatchMismatchError: the state is not a registry, names a parameter the model lacks,
            or an original whose shape or dtype differs from the parameter's. Nothing is
            registered then.
    """
    model = unwrap_model(model)
    if state.get("format") != REGISTRY_FORMAT:
        raise PatchMismatchError("not a lightning_rome patch registry state")
    reg = _registry(model)
    current = {p.uid: p for st in reg.values() for p in st.active}
    params = {n: (e, json.loads(e["active"])) for n, e in state["params"].items()}
    if reg and set(reg) == set(params) and all(
            [p.uid for p in reg[n].active] == uids for n, (_, uids) in params.items()):
        return current  # already registered
    patches = {}
    for ps in state["patches"]:
        p = WeightPatch.from_state(ps)
        patches[p.uid] = p
    new: dict[str, _ParamState] = {}
    for name, (entry, uids) in params.items():
        try:
            param = model.get_parameter(name)
        except AttributeError as e:
            raise PatchMismatchError(f"the registry patches {name!r}, which the model does "
                                     "not have") from e
        orig = entry["original"]
        if tuple(orig.shape) != tuple(param.shape) or orig.dtype != param.dtype:
            raise PatchMismatchError(
                f"the registry's original of {name!r} is {orig.dtype} {tuple(orig.shape)}, the "
                f"model's weight is {param.dtype} {tuple(param.shape)}")
        missing = [u for u in uids if u not in patches]
        if missing:
            raise PatchMismatchError(f"the registry lists patches {missing} it does not hold")
        active = [patches[u] for u in uids]  # deltas stay on the CPU until used
        new[name] = _ParamState(original=orig.to(param.device).clone(), active=active,
                                version=param._version, checksum=entry["checksum"])
    reg = _registry(model, create=True)
    reg.clear()
    reg.update(new)
    return patches


def registered_patch(model: nn.Module, uid: str) -> WeightPatch | None:
    """The patch with ``uid`` applied to ``model`` (``None`` if there is none)."""
    for st in _registry(unwrap_model(model)).values():
        for p in st.active:
            if p.uid == uid:
                return p
    return None


def _is_conv_t(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return False
    try:
        return is_transposed(model.get_submodule(module_name))
    except TypeError:
        return False


def _baseline(model: nn.Module, name: str, active: list[WeightPatch],
              current: Tensor | None = None) -> Tensor:
    """The current weight (or ``current``, canonical) minus the deltas of ``active``, in the
    parameter's own orientation and dtype: the original a forced operation starts from."""
    param = model.get_parameter(name)
    ct = _compute_dtype(param.dtype)
    base = (_canonical_view(model, name) if current is None else current).to(ct)  # (out, in)
    for p in active:
        base = base - _dense(p.deltas[name], ct).to(base.device)
    base = base.to(param.dtype)
    return (base.T if _is_conv_t(model, name) else base).clone()


def _subtract(model: nn.Module, name: str, delta: Delta) -> Tensor:
    """``cast(current - delta)`` in canonical orientation, computed in float32/float64."""
    param = model.get_parameter(name)
    view = _canonical_view(model, name)  # (out, in)
    ct = _compute_dtype(param.dtype)
    return (view.to(ct) - _dense(delta, ct).to(view.device)).to(param.dtype)


def _commit(model: nn.Module, states: dict[str, _ParamState] | None,
            plan: Mapping[str, tuple[_ParamState | None, Tensor]]) -> None:
    """Write every parameter's new canonical value, all or nothing, then update the registry.

    Each weight's current bits are kept until every write has succeeded; if one write raises
    (out of memory, an interrupt), the weights already written get their bits back and the
    registry is left as it was, so that it still matches the weights. A ``None`` state removes
    the parameter from the registry (no patch is active on it any more).
    """
    backups: dict[str, Tensor] = {}
    try:
        for name, (_, value) in plan.items():
            param = model.get_parameter(name)
            backups[name] = param.detach().clone()
            _canonical_view(model, name).copy_(value)
    except BaseException:
        for name, old in backups.items():
            model.get_parameter(name).copy_(old)
        raise
    if states is None:
        return
    for name, (state, _) in plan.items():
        if state is None:
            states.pop(name, None)
            continue
        param = model.get_parameter(name)
        state.version = param._version
        state.checksum = weight_digest(param)
        states[name] = state


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__} in a patch header")
