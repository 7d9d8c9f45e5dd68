"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025).

MEMIT's update ``ΔW = R Kᵀ (λC + KKᵀ)⁻¹`` only *discourages* changes on the preserved keys
``K₀`` (those behind ``C = E[k kᵀ]``). AlphaEdit removes them: each update is projected onto the
null space of ``C``, the span ``Û`` of the eigenvectors of ``C`` whose eigenvalues fall below a
threshold, with the projector ``P = Û Ûᵀ``, so that ``ΔW K₀ ≈ 0`` up to the small energy that
the preserved keys have in that span (``‖P K₀‖² = n Σ_{σ_i < τ} σ_i``). The keys ``K_p`` of the
edits already made join the constraint, so that later edits do not overwrite earlier ones. Per
layer l of R (spread over the layers as in MEMIT; paper, eq. 15 with the published code's
weight on the identity)::

    ΔW_l = R_l K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹           solved in float64

with ``K₁`` the keys of the batch, ``R_l`` MEMIT's residual still missing at layer l, and
``α = l2_weight``. ``ΔW_l = ΔW_l P``: the update lies in the null space (it is the minimiser of
``‖Δ P K₁ − R‖² + ‖Δ P K_p‖² + α ‖Δ P‖²``).

The eigendecomposition of ``C`` is computed once per layer and cached beside the statistics
(same key, validated on read, written atomically); the projector for any threshold comes from
it. The editor keeps ``K_p`` (read on the edited model after each batch, as the published
code does), saves it with :meth:`AlphaEdit.state_dict` and forgets it with
:meth:`AlphaEdit.reset_preserved_keys`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.editing.context import MEMIT_START_WORDS, TemplateAverage
from lightning_rome.editing.hparams import POSITIVE, HyperParams, Num
from lightning_rome.editing.memit import MEMIT, MEMITHyperParams
from lightning_rome.models.checks import check_requests
from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.modes import eval_mode
from lightning_rome.models.precision import check_update_representable
from lightning_rome.models.weights import weight_param_name
from lightning_rome.patches import EditTransaction, LowRankDelta, WeightPatch
from lightning_rome.requests import as_requests, check_batch
from lightning_rome.tokens import FactToken, subject_span
from lightning_rome.utils.io import CorruptFileError, atomic_path, tensor_checksum
from lightning_rome.utils.modules import unwrap_model

__all__ = [
    "AlphaEdit",
    "AlphaEditHyperParams",
    "alphaedit_edit",
    "alphaedit_update",
    "mom2_eigh",
    "null_space_projector",
]

EIGH_FORMAT = "lightning_rome.mom2_eigh"
EIGH_VERSION = 1
STATE_FORMAT = "lightning_rome.alphaedit_state"
STATE_VERSION = 1


@dataclasses.dataclass
class AlphaEditHyperParams(HyperParams):
    """AlphaEdit's hyperparameters. Defaults are the published GPT-2 XL settings.

    Attributes:
        layers: the edited layer range R (ascending), as in MEMIT.
        nullspace_threshold: τ; the eigenvectors of ``C`` with eigenvalue below τ span the null
            space the updates are projected on (published: 2e-2 for every model).
        l2_weight: α, the weight of ``‖Δ P‖²`` (the identity in the inverse; published: 10).
        preserve_edits: add each batch's keys to ``K_p`` (the paper's sequential setting).
        fact_token, v_*, clamp_norm_factor, kl_factor, early_stop_loss: the value (z)
            optimisation, as in MEMIT (on the residual of ``layers[-1]``).
        v_loss_layer: kept for parity with the published configs (the loss reads the logits).
        mom2_dataset, mom2_n_samples, mom2_dtype: the statistics for ``C``.
        context_template_lengths, context_template_starts, context_templates, key_average,
            seed: the key-averaging templates, as in MEMIT (published: the bare prompt and one
            group of five 10-token texts from MEMIT's start words).
        z_batch_size, key_batch_size, z_cache: as in MEMIT.
    """

    METHOD = "alphaedit"
    RANGES: ClassVar[Mapping[str, Num]] = {
        **{k: v for k, v in MEMITHyperParams.RANGES.items() if k != "mom2_update_weight"},
        "nullspace_threshold": POSITIVE, "l2_weight": POSITIVE,
    }

    layers: list[int] = dataclasses.field(default_factory=lambda: [13, 14, 15, 16, 17])
    nullspace_threshold: float = 2e-2
    l2_weight: float = 10.0
    preserve_edits: bool = True
    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    v_mode: Literal["add", "replace"] = "add"
    mom2_dataset: str = "wikitext"
    mom2_n_samples: int = 100_000
    mom2_dtype: str = "float32"
    context_template_lengths: list[list[int]] = dataclasses.field(
        default_factory=lambda: [[10, 5]])
    context_template_starts: list[str] | None = dataclasses.field(
        default_factory=lambda: list(MEMIT_START_WORDS))
    context_templates: list[str] | list[list[str]] | None = None
    key_average: TemplateAverage = "groups"
    seed: int = 0
    z_batch_size: int | None = 64
    key_batch_size: int = 256
    z_cache: bool | str = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be a non-empty ascending list, got {self.layers}")
        if not self.nullspace_threshold > 0:
            raise ValueError(f"nullspace_threshold must be positive, got "
                             f"{self.nullspace_threshold}")
        if not self.l2_weight > 0:
            raise ValueError(f"l2_weight must be positive (it keeps the inverse defined), got "
                             f"{self.l2_weight}")

    def memit_hparams(self) -> MEMITHyperParams:
        """The MEMIT settings that AlphaEdit shares (z optimisation, keys, templates)."""
        names = {f.name for f in dataclasses.fields(MEMITHyperParams)}
        return MEMITHyperParams.from_dict({k: v for k, v in self.to_dict().items() if k in names})


# ---------------------------------------------------------------------------------- the math
def null_space_projector(eigenvalues: Tensor, eigenvectors: Tensor, threshold: float) -> Tensor:
    """``P = Û Ûᵀ``, ``Û`` the eigenvectors whose eigenvalue is below ``threshold``.

    Args:
        eigenvalues: ``(d,)`` of ``C``.
        eigenvectors: ``(d, d)``, one per column.
        threshold: τ.

    Returns:
        ``(d, d)`` float64, symmetric and idempotent, of rank ``#{σ_i < τ}``.
    """
    U = eigenvectors.double()[:, eigenvalues < threshold]  # (d, r)
    return U @ U.T  # (d, d)


def alphaedit_update(K: Tensor, R: Tensor, P: Tensor, G: Tensor | None, l2_weight: float,
                     ) -> LowRankDelta:
    """``ΔW = R Kᵀ P (G P + K Kᵀ P + α I)⁻¹`` as a low-rank delta, solved in float64.

    Args:
        K: ``(d_in, u)`` keys of the batch.
        R: ``(d_out, u)`` residuals to write.
        P: ``(d_in, d_in)`` the null-space projector.
        G: ``(d_in, d_in)`` ``K_p K_pᵀ``, the Gram matrix of the earlier edits' keys (``None``:
            none yet).
        l2_weight: α.

    Returns:
        ``LowRankDelta(R (d_out, u), Bᵀ (u, d_in))`` with ``B = (P (G + KKᵀ) + α I)⁻¹ P K``
        (the transpose of the inverse above, as ``P`` and ``G`` are symmetric).
    """
    K64, R64, P64 = K.double(), R.double(), P.double().to(K.device)
    S = K64 @ K64.T  # (d_in, d_in)
    if G is not None:
        S = S + G.double().to(K.device)
    M_t = P64 @ S + l2_weight * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    B = torch.linalg.solve(M_t, P64 @ K64)  # (d_in, u)
    return LowRankDelta(R64.float(), B.T.float())  # (d_out, u), (u, d_in)


# ---------------------------------------------------------------------- cached eigensystem
def _eigh_path(stats_file: Path) -> Path:
    return stats_file.with_name(stats_file.stem + "-eigh.safetensors")


def _save_eigh(path: Path, key: dict[str, Any], evals: Tensor, evecs: Tensor) -> None:
    tensors = {"eigenvalues": evals.contiguous(), "eigenvectors": evecs.contiguous()}
    header = json.dumps({"format": EIGH_FORMAT, "version": EIGH_VERSION, "key": key,
                         "checksums": {n: tensor_checksum(t) for n, t in tensors.items()}},
                        sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"lightning_rome": header})


def _load_eigh(path: Path, key: dict[str, Any], d: int) -> tuple[Tensor, Tensor]:
    """Read and check a cached eigensystem: format, key, checksums, shapes, finiteness, order.

    Raises:
        CorruptFileError: any check fails.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        header = json.loads(meta["lightning_rome"])
    except Exception as err:
        raise CorruptFileError(f"{path} cannot be read: {err}") from err
    if header.get("format") != EIGH_FORMAT or header.get("version") != EIGH_VERSION:
        raise CorruptFileError(f"{path} is not a version-{EIGH_VERSION} {EIGH_FORMAT} file")
    if header.get("key") != json.loads(json.dumps(key, sort_keys=True)):
        raise CorruptFileError(f"{path} holds the eigensystem of other statistics")
    if set(tensors) != {"eigenvalues", "eigenvectors"} or set(header.get("checksums", {})) != set(
            tensors):
        raise CorruptFileError(f"{path}: unexpected tensors {sorted(tensors)}")
    for n, t in tensors.items():
        if tensor_checksum(t) != header["checksums"][n]:
            raise CorruptFileError(f"{path}: checksum mismatch for {n!r}")
    evals, evecs = tensors["eigenvalues"], tensors["eigenvectors"]
    if tuple(evals.shape) != (d,) or tuple(evecs.shape) != (d, d):
        raise CorruptFileError(f"{path}: shapes {tuple(evals.shape)}, {tuple(evecs.shape)}; "
                               f"expected ({d},), ({d}, {d})")
    if not (bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all())):
        raise CorruptFileError(f"{path}: non-finite values")
    if d > 1 and bool((evals[1:] < evals[:-1]).any()):
        raise CorruptFileError(f"{path}: eigenvalues are not in ascending order")
    return evals, evecs


def _eigh(C: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(C.double())  # (d,), (d, d), ascending
    return evals.contiguous(), evecs.contiguous()


def mom2_eigh(model: nn.Module, tokenizer: PreTrainedTokenizerBase, module_name: str, *,
              corpus: Any = "wikitext", n_samples: int | None = 100_000,
              dtype: torch.dtype = torch.float32,
              cache: bool | str | os.PathLike[str] = True) -> tuple[Tensor, Tensor]:
    """The eigensystem of ``C = E[k kᵀ]`` of ``module_name``'s input, cached with ``C``.

    ``C`` comes from :func:`lightning_rome.stats.get_second_moment` (cached there); its
    eigendecomposition is stored beside the statistics file, under the same key, written
    atomically and validated when read (a corrupt file is recomputed with a warning). A corpus
    without an identity is not cached.

    Returns:
        eigenvalues ``(d,)`` ascending and eigenvectors ``(d, d)`` (columns), float64, CPU.
    """
    from lightning_rome.corpora import as_corpus
    from lightning_rome.stats import get_second_moment, stats_key, stats_path
    from lightning_rome.stats.cache import stats_root
    from lightning_rome.stats.collect import default_seq_len, key_dim

    source = as_corpus(corpus)
    path = key = None
    if cache is not False and source.identity is not None:
        key = stats_key(model, tokenizer, module_name, corpus_id=source.identity,
                        n_samples=n_samples, n_tokens=None, seq_len=default_seq_len(model),
                        dtype=dtype)
        path = _eigh_path(stats_path(stats_root(cache), key))
        if path.is_file():
            try:
                return _load_eigh(path, key, key_dim(model, module_name))
            except CorruptFileError as err:
                warnings.warn(f"ignoring the invalid eigensystem file {path} ({err}); "
                              "recomputing it", stacklevel=2)
    C = get_second_moment(model, tokenizer, module_name, corpus=source, n_samples=n_samples,
                          dtype=dtype, cache=cache).mom2  # (d, d)
    evals, evecs = _eigh(C)
    if path is not None and key is not None:
        _save_eigh(path, key, evals, evecs)
    return evals, evecs


# ---------------------------------------------------------------------------------- editor
class AlphaEdit:
    """The AlphaEdit editor (sequential, null-space constrained MEMIT).

    Args:
        hparams: :class:`AlphaEditHyperParams`, a dict, a preset name (``"gpt2-xl"``,
            ``"gpt-j-6b"``, ``"llama3-8b"``, ``"fact-model"``) or a YAML path.
        second_moment: ``(model, tokenizer, module_name) -> C`` (default: cached statistics
            over ``hparams.mom2_dataset``, or ``corpus``); its eigensystem is then kept in
            memory only.
        corpus: a statistics corpus to use instead of ``hparams.mom2_dataset`` (anything
            :func:`lightning_rome.corpora.as_corpus` accepts, e.g. a list of texts).
        layout: a layout override.

    The editor remembers the keys of every batch it edits (``K_p``): it assumes that the
    patches it returns are applied, in order, to the model it is called with (the sequential
    setting). A batch whose patch was reverted by the next call (the edited weights are back to
    their state before it, as in an independent evaluation) is forgotten; call
    :meth:`reset_preserved_keys` to forget them all, or pass ``remember=False`` to :meth:`edit`.

    Example:
        >>> ae = AlphaEdit("gpt2-xl")
        >>> for batch in batches:                       # sequential editing
        ...     ae.edit(model, tok, batch, apply=True)
    """

    method = "alphaedit"

    def __init__(self, hparams: AlphaEditHyperParams | dict[str, Any] | str | None = None, *,
                 second_moment: Any = None, corpus: Any = None,
                 layout: ModelLayout | dict[str, Any] | str | None = None) -> None:
        self.hparams = AlphaEditHyperParams.resolve(hparams)
        self.second_moment = second_moment
        self.corpus = corpus
        self.layout_override = layout
        self._memit: MEMIT | None = None
        self._P: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Tensor]] = (
            weakref.WeakKeyDictionary())
        self._keys_p: dict[str, Tensor] = {}  # module name -> (d_in, n_p) float32, CPU
        self._gram: dict[str, Tensor] = {}  # module name -> K_p K_pᵀ (d_in, d_in) float64
        self._model_id: dict[str, Any] | None = None
        # One entry per remembered batch: its size and the edited weights' checksums before and
        # after it, to notice a batch that was reverted.
        self._history: list[dict[str, Any]] = []
        self.n_preserved_edits = 0
        self.last_stats: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_P"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._P = weakref.WeakKeyDictionary()

    def _shared_memit(self) -> MEMIT:
        """The MEMIT whose z optimisation and key reading AlphaEdit shares (rebuilt when
        ``self.hparams`` was replaced)."""
        hp = self.hparams.memit_hparams()
        if self._memit is None or self._memit.hparams != hp:
            self._memit = MEMIT(hp, layout=self.layout_override)
        return self._memit

    # ------------------------------------------------------------------ preserved keys
    def reset_preserved_keys(self) -> None:
        """Forget the keys of the earlier edits (``K_p = ∅``)."""
        self._keys_p, self._gram, self._model_id, self._history = {}, {}, None, []
        self.n_preserved_edits = 0

    def _forget_last(self) -> None:
        n = self._history.pop()["n"]
        self.n_preserved_edits -= n
        if not self._history:
            self.reset_preserved_keys()
            return
        for name, k in self._keys_p.items():
            self._keys_p[name] = k[:, :-n].contiguous()
            k64 = self._keys_p[name].double()
            self._gram[name] = k64 @ k64.T

    @staticmethod
    def _weights(model: nn.Module, names: list[str]) -> dict[str, str]:
        return {n: tensor_checksum(model.get_parameter(weight_param_name(n))) for n in names}

    def _sync(self, model: nn.Module, names: list[str]) -> None:
        """Drop the keys of remembered batches whose patches were reverted since (the edited
        weights are back to what they were before the batch), so that ``K_p`` holds the edits
        the model still carries (an independent evaluation reverts every edit)."""
        current = self._weights(model, names) if self._history else {}
        while self._history and current != self._history[-1]["post"]:
            if current == self._history[-1]["pre"]:
                self._forget_last()
                continue
            warnings.warn(
                "AlphaEdit: the edited layers hold neither the weights its last edit left nor "
                "those before it (another edit, or training?); keeping the preserved keys K_p "
                "(call reset_preserved_keys() to drop them)", stacklevel=3)
            self._history[-1]["post"] = current
            break

    @property
    def preserved_keys(self) -> dict[str, Tensor]:
        """``K_p`` per edited module, ``(d_in, n_p)`` (a copy)."""
        return {n: k.clone() for n, k in self._keys_p.items()}

    def _identity(self, model: nn.Module, names: list[str]) -> dict[str, Any]:
        from lightning_rome.stats import model_fingerprint

        # The fingerprint leaves out the edited W_out weights: it names the model being edited.
        return {"modules": names, "model": model_fingerprint(model, names[0])}

    def _check_model(self, model: nn.Module, names: list[str]) -> None:
        if self._model_id is not None and self._model_id != self._identity(model, names):
            raise ValueError(
                "AlphaEdit's preserved keys (K_p) were recorded on another model or other "
                "layers; call reset_preserved_keys() before editing this one")

    def state_dict(self) -> dict[str, Any]:
        """``K_p`` and what it belongs to: tensors and JSON strings only (safe for
        ``torch.load(weights_only=True)`` and for safetensors)."""
        return {
            "header": json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION,
                                  "hparams": self.hparams.to_dict(), "model": self._model_id,
                                  "n_edits": self.n_preserved_edits, "history": self._history,
                                  "modules": list(self._keys_p)}, sort_keys=True),
            "keys": {n: k.contiguous() for n, k in self._keys_p.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``K_p`` from :meth:`state_dict`.

        Raises:
            ValueError: not an AlphaEdit state, another version, other layers, or keys of the
                wrong shape or with NaN/inf (the editor's state is left unchanged).
        """
        try:
            header = json.loads(state["header"])
            keys = dict(state["keys"])
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"not an AlphaEdit state: {err}") from err
        if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
            raise ValueError(f"not a version-{STATE_VERSION} AlphaEdit state")
        if sorted(keys) != sorted(header.get("modules", [])):
            raise ValueError("AlphaEdit state: its key tensors do not match its header")
        if keys and header.get("hparams", {}).get("layers") != self.hparams.layers:
            raise ValueError(f"AlphaEdit state for layers {header['hparams'].get('layers')}, "
                             f"this editor edits {self.hparams.layers}")
        n = int(header.get("n_edits", 0))
        history = header.get("history", [])
        if not isinstance(history, list) or sum(int(h.get("n", 0)) for h in history) != n:
            raise ValueError("AlphaEdit state: its batch history does not add up to its edits")
        for name, k in keys.items():
            if not isinstance(k, Tensor) or k.ndim != 2 or k.shape[1] != n or not bool(
                    torch.isfinite(k).all()):
                raise ValueError(f"AlphaEdit state: bad preserved keys for {name!r}")
        self._keys_p = {name: k.float().cpu().clone() for name, k in keys.items()}
        self._gram = {name: k.double() @ k.double().T for name, k in self._keys_p.items()}
        self._model_id = header.get("model")
        self._history = [dict(h) for h in history]
        self.n_preserved_edits = n

    # ------------------------------------------------------------------ projector
    def projector(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str,
                  ) -> Tensor:
        """``P`` for module ``name`` (``(d_in, d_in)`` float64), computed once per model."""
        hp = self.hparams
        per_model = self._P.setdefault(model, {})
        # Keyed by what determines P, so that replacing ``self.hparams`` takes effect.
        key = (name, hp.nullspace_threshold, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype,
               id(self.second_moment), id(self.corpus))
        if key not in per_model:
            if self.second_moment is not None:
                from lightning_rome.editing.context import second_moment

                evals, evecs = _eigh(second_moment(model, tokenizer, name, fn=self.second_moment))
            else:
                from lightning_rome.models.loading import resolve_dtype

                evals, evecs = mom2_eigh(
                    model, tokenizer, name,
                    corpus=self.corpus if self.corpus is not None else hp.mom2_dataset,
                    n_samples=hp.mom2_n_samples, dtype=resolve_dtype(hp.mom2_dtype))
            r = int((evals < hp.nullspace_threshold).sum())
            if r == 0:
                raise ValueError(
                    f"the null space of {name!r} is empty: no eigenvalue of C is below "
                    f"nullspace_threshold={hp.nullspace_threshold} (smallest "
                    f"{float(evals[0]):.3g}); AlphaEdit could not change this layer")
            self.last_stats.setdefault("null_dims", {})[name] = r
            per_model[key] = null_space_projector(evals, evecs, hp.nullspace_threshold)
        return per_model[key]

    # ------------------------------------------------------------------ editing
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Any, *,
             apply: bool = False, remember: bool | None = None) -> WeightPatch:
        """Edit a batch of requests and return one patch over every layer of R.

        As in MEMIT, layers are edited in order on the partly edited model, which is then
        restored exactly unless ``apply=True``. The batch's keys, read on the fully edited
        model, join ``K_p`` (``remember``, default ``hparams.preserve_edits``) once the edit
        has succeeded. On any error the model and ``K_p`` are left as they were.

        Raises:
            ValueError / SubjectNotFoundError: a bad request, an empty null space, or ``K_p``
                recorded on another model (checked before any weight changes).
            IndexError: a layer of R is out of range.
            ValueOptimisationError: NaN/inf while optimising z.
        """
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        hp = self.hparams
        remember = hp.preserve_edits if remember is None else remember
        reqs = check_batch(as_requests(requests), "alphaedit")
        if not reqs:
            raise ValueError("no edit requests given")
        layout = get_layout(model, self.layout_override)
        for layer in hp.layers:
            layout.check_layer(model, layer)
        names = [layout.name("mlp_out", layer) for layer in hp.layers]
        self._check_model(model, names)
        self._sync(model, names)
        for r in reqs:
            subject_span(tokenizer, r.prompt, r.subject)
        check_requests(model, tokenizer, reqs)
        memit = self._shared_memit()
        with eval_mode(model), EditTransaction(model) as tx:
            contexts = memit._contexts(model, tokenizer)
            check_requests(model, tokenizer, reqs, contexts)
            projectors = {n: self.projector(model, tokenizer, n) for n in names}
            new_keys: dict[str, Tensor] = {}
            pre = self._weights(model, names) if remember else {}
            post: dict[str, str] = {}
            Z = memit.compute_z(model, tokenizer, reqs)  # (d, u)
            block = layout.block(hp.layers[-1])
            for i, name in enumerate(names):
                K = memit._keys(model, tokenizer, name, reqs, contexts)  # (d_in, u)
                h = memit._residual_now(model, tokenizer, block, reqs)  # (d, u)
                R_l = (Z.to(h.device) - h) / (len(names) - i)  # (d, u)
                delta = alphaedit_update(K, R_l, projectors[name], self._gram.get(name),
                                         hp.l2_weight)
                check_update_representable(model, {weight_param_name(name): delta},
                                           "AlphaEdit")
                dev = model.get_parameter(weight_param_name(name)).device
                tx.apply(WeightPatch.from_model(model, {weight_param_name(name): delta.to(dev)},
                                                method=self.method, hparams=hp.to_dict(),
                                                requests=reqs))  # later layers see this one
            if remember:
                post = self._weights(model, names)
                for name in names:
                    new_keys[name] = memit._keys(model, tokenizer, name, reqs,
                                                 contexts).cpu()  # (d_in, u)
            total = tx.composed(requests=reqs)
            if apply:
                tx.commit()
        self.last_stats.update(memit.last_stats)
        if remember:
            if self._model_id is None:
                self._model_id = self._identity(model, names)
            for name, k in new_keys.items():
                old = self._keys_p.get(name)
                self._keys_p[name] = k.float() if old is None else torch.cat([old, k.float()], 1)
                k64 = k.double()
                g = k64 @ k64.T  # (d_in, d_in)
                self._gram[name] = g if name not in self._gram else self._gram[name] + g
            self.n_preserved_edits += len(reqs)
            self._history.append({"n": len(reqs), "pre": pre, "post": post})
        return total


def alphaedit_edit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Any,
                   hparams: AlphaEditHyperParams | dict[str, Any] | str | None = None,
                   **kwargs: Any) -> WeightPatch:
    """Functional form of :meth:`AlphaEdit.edit` (one batch, no earlier edits; the model is left
    unchanged)."""
    return AlphaEdit(hparams, **kwargs).edit(model, tokenizer, requests)

