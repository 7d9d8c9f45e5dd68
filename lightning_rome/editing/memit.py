"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023).

Many facts are written at once, spread over the MLPs of a range of layers R:

1. For each request i, optimise a target residual ``z_i`` at the output of the last layer of R
   (the ROME value loss, on the residual stream), all requests in one batch.
2. For each layer l in R, in order, on the model already edited at the earlier layers of R:
   read the template-averaged keys ``K`` (d_in × u; averaged within each group of context
   templates, then over the groups, as in the published code), the residual still missing
   ``R_l = (Z − h_L) / (layers left)``, and apply (paper, eq. 14)::

       ΔW_l = R_l Kᵀ (λ C_l + K Kᵀ)⁻¹         solved in float64

   with ``C_l = E[k kᵀ]`` the layer's second moment and ``λ = mom2_update_weight``. For fewer
   requests than ``d_in`` the solve goes through the Woodbury identity with a Cholesky factor
   of ``C_l`` computed once per layer (O(d²u) per batch instead of O(d³); see
   :func:`memit_update`).

The result is one :class:`~lightning_rome.patches.WeightPatch` with a rank-u delta per layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.editing.context import (
    MEMIT_START_WORDS,
    SecondMomentFn,
    TemplateAverage,
    as_template_groups,
    check_start_words,
    context_template_groups,
    optimise_values,
    read_at,
    read_keys,
    row_length,
    second_moment,
    template_weights,
    wrap,
)
from lightning_rome.editing.hparams import INT, NONNEG, POSITIVE, POSITIVE_INT, HyperParams, Num
from lightning_rome.models.checks import check_requests
from lightning_rome.models.fingerprint import parameters_digest
from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.modes import in_eval_mode
from lightning_rome.models.precision import check_update_representable
from lightning_rome.models.weights import weight_param_name
from lightning_rome.patches import EditTransaction, LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest, as_requests, check_batch
from lightning_rome.stats.cache import write_safetensors
from lightning_rome.tokens import FactToken, subject_span
from lightning_rome.utils.io import CorruptFileError, cache_dir, tensor_checksum, tensor_fingerprint
from lightning_rome.utils.modules import unwrap_model

__all__ = ["MEMIT", "MEMITHyperParams", "SolveMethod", "cholesky_factor", "memit_edit",
           "memit_update"]


@dataclasses.dataclass
class MEMITHyperParams(HyperParams):
    """MEMIT's hyperparameters. Defaults are the published GPT-2 XL settings.

    Attributes:
        layers: the critical layer range R (ascending).
        fact_token: the token whose key is read and whose residual is optimised.
        v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor, early_stop_loss,
            v_mode: the value optimisation, as in ROME (on the residual of ``layers[-1]``).
        v_loss_layer: kept for parity with the published configs (the loss reads the logits).
        mom2_update_weight: λ, the weight of the preserved keys' second moment.
        mom2_dataset, mom2_n_samples, mom2_dtype: the statistics for C (as in ROME).
        context_template_lengths, context_template_starts, seed: the generated templates,
            ``[length, count]`` groups (published: ``[[10, 5]]``, from the start words
            :data:`MEMIT_START_WORDS`; ``None`` starts from the BOS token as ROME does).
        context_templates: explicit templates instead: a list of strings (one group each) or a
            list of groups (lists of strings), e.g. ``[["{}"], [five templates]]``.
        key_average: ``"groups"`` (published: average within each group, then over the groups,
            with the bare ``"{}"`` a group of its own) or ``"templates"`` (all equal).
        z_batch_size: requests whose z are optimised together (memory bound); ``None``: all.
        key_batch_size: prompts per forward pass when reading keys.
        z_cache: cache the optimised z per request on disk (``True``: under the cache dir; a
            path; ``False``).
    """

    METHOD = "memit"
    RANGES: ClassVar[Mapping[str, Num]] = {
        "layers": Num(integer=True, depth=1),
        "v_num_grad_steps": POSITIVE_INT, "v_lr": POSITIVE,
        "v_loss_layer": Num(integer=True, optional=True), "v_weight_decay": NONNEG,
        "clamp_norm_factor": POSITIVE, "kl_factor": NONNEG, "early_stop_loss": NONNEG,
        "mom2_n_samples": POSITIVE_INT, "context_template_lengths": Num(low=1, integer=True,
                                                                        depth=2),
        "seed": INT,
        "mom2_update_weight": POSITIVE,
        "z_batch_size": Num(low=1, integer=True, optional=True), "key_batch_size": POSITIVE_INT,
    }

    layers: list[int] = dataclasses.field(default_factory=lambda: [13, 14, 15, 16, 17])
    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    v_mode: Literal["add", "replace"] = "add"
    mom2_update_weight: float = 20000.0
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
        if self.context_templates is not None:
            as_template_groups(self.context_templates)
        check_start_words(self.context_template_starts)
        if self.key_average not in ("templates", "groups"):
            raise ValueError(f"key_average must be 'templates' or 'groups', got "
                             f"{self.key_average!r}")


SolveMethod = Literal["auto", "dense", "woodbury"]
"""How :func:`memit_update` solves ``(λC + KKᵀ) A = K``: ``"dense"`` (an LU solve of the
``d × d`` system, O(d³)), ``"woodbury"`` (through a Cholesky factor of C, O(d²u) once the factor
is known) or ``"auto"`` (Woodbury when ``u < d`` and C is positive definite, else dense)."""


def cholesky_factor(C: Tensor) -> Tensor | None:
    """The lower Cholesky factor of ``C`` in float64, ``(d, d)``, or ``None`` when ``C`` is
    not (numerically) positive definite."""
    L, info = torch.linalg.cholesky_ex(C.double())  # (d, d)
    return L if int(info) == 0 else None


def memit_update(K: Tensor, R: Tensor, C: Tensor, lam: float, *, factor: Tensor | None = None,
                 method: SolveMethod = "auto") -> LowRankDelta:
    """``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` as a low-rank delta, solved in float64.

    With ``A = λC``, the Woodbury identity gives ``(A + KKᵀ)⁻¹ K = A⁻¹K (I + KᵀA⁻¹K)⁻¹ =
    X (λI + KᵀX)⁻¹`` with ``X = C⁻¹K``: two triangular solves with the Cholesky factor of C and
    a ``u × u`` solve, O(d²u) instead of the dense O(d³). It is used for ``u < d`` (``"auto"``)
    when C is positive definite; otherwise the ``d × d`` system is solved directly. Both give
    the same ΔW up to float64 rounding (relative ~ cond(λC + KKᵀ) x 1e-16).

    Args:
        K: ``(d_in, u)`` keys of the edited facts.
        R: ``(d_out, u)`` residuals to write.
        C: ``(d_in, d_in)`` second moment of the layer's keys.
        lam: λ.
        factor: the lower Cholesky factor of this ``C`` (:func:`cholesky_factor`), e.g. cached
            per layer; without it the Woodbury path factors C itself (O(d³/3), still half an
            LU solve). It must be the factor of ``C`` itself: λ is applied here.
        method: see :data:`SolveMethod`.

    Returns:
        ``LowRankDelta(R (d_out, u), Aᵀ (u, d_in))`` with ``A = (λC + KKᵀ)⁻¹ K``.

    Raises:
        ValueError: an unknown ``method``, or shapes that do not fit.
        FloatingPointError: ``method="woodbury"`` with a C that is not positive definite.
    """
    if method not in ("auto", "dense", "woodbury"):
        raise ValueError(f"method must be 'auto', 'dense' or 'woodbury', got {method!r}")
    d, u = K.shape
    if tuple(C.shape) != (d, d) or R.ndim != 2 or R.shape[1] != u:
        raise ValueError(f"shapes do not fit: K {tuple(K.shape)}, R {tuple(R.shape)}, "
                         f"C {tuple(C.shape)}")
    if factor is not None and tuple(factor.shape) != (d, d):
        raise ValueError(f"the factor is {tuple(factor.shape)}, C is {tuple(C.shape)}")
    K64, R64 = K.double(), R.double()  # (d_in, u), (d_out, u)
    woodbury = method == "woodbury" or (method == "auto" and u < d)
    if woodbury:
        L = factor if factor is not None else cholesky_factor(C.to(K64.device))
        if L is None and method == "woodbury":
            raise FloatingPointError("C is not positive definite: the Woodbury solve needs "
                                     "its Cholesky factor (use method='dense')")
        if L is not None:
            L = L.to(device=K64.device, dtype=torch.float64)  # (d_in, d_in)
            X = torch.cholesky_solve(K64, L)  # (d_in, u): C⁻¹K
            M = K64.T @ X  # (u, u): KᵀC⁻¹K, symmetric
            M.diagonal().add_(lam)  # λI + KᵀC⁻¹K
            At = torch.linalg.solve(M, X.T)  # (u, d_in): Aᵀ = M⁻¹ Xᵀ (M symmetric)
            return LowRankDelta(R64.float(), At.float())  # (d_out, u), (u, d_in)
    A = torch.linalg.solve(lam * C.double().to(K64.device) + K64 @ K64.T, K64)  # (d_in, u)
    return LowRankDelta(R64.float(), A.T.float())  # (d_out, u), (u, d_in)


@dataclasses.dataclass(frozen=True)
class _Factor:
    """A cached Cholesky factor ``L`` of the tensor ``C`` at version ``version``, on
    ``device`` (``L`` is ``None`` when C is not positive definite)."""

    C: Tensor
    version: int | tuple[str, int]
    device: torch.device
    L: Tensor | None


class MEMIT:
    """The MEMIT editor.

    Args:
        hparams: :class:`MEMITHyperParams`, a dict, a preset name (``"gpt2-xl"``, ``"gpt-j-6b"``)
            or a YAML path.
        second_moment: ``(model, tokenizer, module_name) -> C`` (default: cached statistics).
        layout: a layout override.

    Example:
        >>> patch = MEMIT("gpt2-xl").edit(model, tok, requests)   # one patch, |R| layers
    """

    def __init__(self, hparams: MEMITHyperParams | dict[str, Any] | str | None = None, *,
                 second_moment: SecondMomentFn | None = None,
                 layout: ModelLayout | dict[str, Any] | str | None = None) -> None:
        self.hparams = MEMITHyperParams.resolve(hparams)
        self.second_moment = second_moment
        self.layout_override = layout
        # per model: C by (module, statistics settings), and C's Cholesky factor by module
        self._C: weakref.WeakKeyDictionary[nn.Module, dict[Any, Tensor]] = (
            weakref.WeakKeyDictionary())
        self._chol: weakref.WeakKeyDictionary[nn.Module, dict[str, _Factor]] = (
            weakref.WeakKeyDictionary())
        self.last_stats: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # The per-model caches of C and its factor hold weak references, which cannot be
        # pickled (ddp_spawn pickles callbacks and modules); a copy starts with empty caches.
        state = self.__dict__.copy()
        state["_C"] = state["_chol"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._C = weakref.WeakKeyDictionary()
        self._chol = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ pieces
    def _C_of(self, model: nn.Module, tok: PreTrainedTokenizerBase, name: str) -> Tensor:
        hp = self.hparams
        per_model = self._C.setdefault(model, {})
        # the statistics settings are in the key: changing them on this editor gives a new C
        key = (name, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype)
        if key not in per_model:
            per_model[key] = second_moment(model, tok, name, fn=self.second_moment,
                                           corpus=hp.mom2_dataset, n_samples=hp.mom2_n_samples,
                                           dtype=hp.mom2_dtype)
        return per_model[key]

    def _factor_of(self, model: nn.Module, name: str, C: Tensor, device: torch.device,
                   ) -> Tensor | None:
        """The Cholesky factor of ``C`` on ``device`` (``None``: C is not positive definite),
        computed once per layer. It is reused only for this very tensor, unmodified (its
        object and version counter) on the same device; λ is not in it (it is applied in
        :func:`memit_update`), so changing λ never reuses a wrong factor."""
        per_model = self._chol.setdefault(model, {})
        hit = per_model.get(name)
        version = _version_of(C)
        if hit is not None and hit.C is C and hit.version == version and hit.device == device:
            return hit.L
        L = cholesky_factor(C.to(device))
        per_model[name] = _Factor(C, version, device, L)
        return L

    def _template_groups(self, model: nn.Module, tok: PreTrainedTokenizerBase,
                         ) -> list[list[str]]:
        """The context templates in their groups (explicit, or generated from the model)."""
        hp = self.hparams
        if hp.context_templates is not None:
            return as_template_groups(hp.context_templates)
        return context_template_groups(model, tok, hp.context_template_lengths, hp.seed,
                                       starts=hp.context_template_starts)

    def _contexts(self, model: nn.Module, tok: PreTrainedTokenizerBase) -> list[str]:
        """The context templates, flattened (the order of :meth:`_context_weights`)."""
        return [t for g in self._template_groups(model, tok) for t in g]

    def _context_weights(self, contexts: Sequence[str]) -> Tensor:
        """Each context's weight in the key average, ``(n_ctx,)`` float32, summing to 1.

        With ``key_average="groups"`` (the published MEMIT code) keys are averaged within each
        group of templates (the bare ``"{}"``; the generated ones of each ``(length, count)``;
        or the given groups), then over the groups, so the bare prompt weighs ``1 / n_groups``.
        """
        hp = self.hparams
        if hp.context_templates is not None:
            sizes = [len(g) for g in as_template_groups(hp.context_templates)]
        else:
            sizes = [1] + [int(count) for _, count in hp.context_template_lengths]
        if sum(sizes) != len(contexts):
            raise ValueError(f"{len(contexts)} contexts do not match the template groups "
                             f"of sizes {sizes}")
        groups = [[""] * n for n in sizes]
        return template_weights(groups, hp.key_average).float()

    def _keys(self, model: nn.Module, tok: PreTrainedTokenizerBase, name: str,
              reqs: Sequence[EditRequest], contexts: Sequence[str]) -> Tensor:
        """Template-averaged keys at ``name``'s input, ``(d_in, u)``."""
        templates = [wrap(c, r.prompt) for r in reqs for c in contexts]
        subjects = [r.subject for r in reqs for _ in contexts]
        step = self.hparams.key_batch_size
        ks = [read_keys(model, tok, name, templates[s:s + step], subjects[s:s + step],
                        self.hparams.fact_token)[0] for s in range(0, len(templates), step)]
        k = torch.cat(ks).view(len(reqs), len(contexts), -1)  # (u, n_ctx, d_in)
        w = self._context_weights(contexts).to(k)  # (n_ctx,)
        return torch.einsum("ucd,c->du", k, w)  # (d_in, u)

    def _keys_and_residual(self, model: nn.Module, tok: PreTrainedTokenizerBase, name: str,
                           block: str, reqs: Sequence[EditRequest], contexts: Sequence[str],
                           ) -> tuple[Tensor, Tensor]:
        """:meth:`_keys` and :meth:`_residual_now` of the model as it is now, from one pass
        per chunk when the contexts hold the bare ``"{}"`` (its rows are the bare prompts whose
        ``h_L`` is wanted; the pass runs up to block L instead of two passes). In float16 or
        bfloat16 the two passes stay apart: ``h_L`` read in a batch padded to the longest
        context differs from the bare prompts' batch by the half-precision rounding of another
        padding, which ``R = Z − h`` would write into the weights."""
        low_precision = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        if "{}" not in contexts or low_precision:
            return (self._keys(model, tok, name, reqs, contexts),
                    self._residual_now(model, tok, block, reqs))
        bare = list(contexts).index("{}")
        templates = [wrap(c, r.prompt) for r in reqs for c in contexts]
        subjects = [r.subject for r in reqs for _ in contexts]
        step = self.hparams.key_batch_size
        ks, hs = [], []
        for s in range(0, len(templates), step):
            ins, outs = read_at(model, tok, templates[s:s + step], subjects[s:s + step],
                                self.hparams.fact_token, inputs=[name], outputs=[block])
            ks.append(ins[name])
            hs.append(outs[block])
        k = torch.cat(ks).view(len(reqs), len(contexts), -1)  # (u, n_ctx, d_in)
        h = torch.cat(hs).view(len(reqs), len(contexts), -1)[:, bare]  # (u, d)
        w = self._context_weights(contexts).to(k)  # (n_ctx,)
        return torch.einsum("ucd,c->du", k, w), h.T  # (d_in, u), (d, u)

    def _residual_now(self, model: nn.Module, tok: PreTrainedTokenizerBase, block: str,
                      reqs: Sequence[EditRequest]) -> Tensor:
        """``h_L`` at the fact token of each bare prompt, ``(d, u)``."""
        step = self.hparams.key_batch_size
        hs = []
        for s in range(0, len(reqs), step):
            chunk = reqs[s:s + step]
            _, h = read_keys(model, tok, block, [r.prompt for r in chunk],
                             [r.subject for r in chunk], self.hparams.fact_token, outputs=True)
            hs.append(h)
        return torch.cat(hs).T  # (d, u)

    def _z_cache_path(self, model: nn.Module, r: EditRequest, block: str) -> Path | None:
        hp = self.hparams
        if not hp.z_cache:
            return None
        root = Path(hp.z_cache) if isinstance(hp.z_cache, str) else cache_dir("memit_z")
        relevant = {k: v for k, v in hp.to_dict().items()
                    if k not in ("layers", "mom2_update_weight", "mom2_dataset", "mom2_n_samples",
                                 "mom2_dtype", "z_batch_size", "key_batch_size", "z_cache")}
        # z is optimised through the whole model: every parameter and buffer is in the key.
        model_id = {"name": getattr(model.config, "_name_or_path", ""),
                    "config": model.config.to_json_string(use_diff=False),
                    "weights": parameters_digest(model)}
        key = json.dumps({"request": r.to_dict(), "hparams": relevant, "block": block,
                          "z_layer": hp.layers[-1], "model": model_id}, sort_keys=True,
                         default=str)
        return root / f"z-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def _load_z(self, path: Path | None, d: int) -> Tensor | None:
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                z = f.get_tensor("z")
            if z.shape != (d,) or not bool(torch.isfinite(z).all()):
                raise CorruptFileError(f"bad z in {path}")
            if meta.get("sha256") != tensor_checksum(z):
                raise CorruptFileError(f"checksum mismatch in {path}")
            return z
        except Exception as e:
            import warnings

            warnings.warn(f"ignoring a corrupt z-vector cache file {path} ({e}); recomputing",
                          stacklevel=3)
            return None

    @in_eval_mode
    def compute_z(self, model: nn.Module, tok: PreTrainedTokenizerBase,
                  reqs: Sequence[EditRequest]) -> Tensor:
        """Target residuals ``Z`` at the last layer of R, ``(d, u)``, optimised in batches."""
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        hp = self.hparams
        layout = get_layout(model, self.layout_override)
        block = layout.block(hp.layers[-1])
        d = model.config.hidden_size if hasattr(model.config, "hidden_size") else None
        contexts = self._contexts(model, tok)
        paths = [self._z_cache_path(model, r, block) for r in reqs]
        zs: list[Tensor | None] = [self._load_z(p, d) if d else None for p in paths]
        # Batched in the order of their rows' lengths (each request's z does not depend on
        # what shares its batch), so that a batch pads little.
        todo = sorted((i for i, z in enumerate(zs) if z is None),
                      key=lambda i: row_length(tok, reqs[i], hp.fact_token))
        step = hp.z_batch_size or max(1, len(todo))
        steps_taken: list[int] = []
        steps_each: dict[int, int] = {}  # request index -> steps its z took
        for s in range(0, len(todo), step):
            idx = todo[s:s + step]
            res = optimise_values(
                model, tok, [reqs[i] for i in idx], block, contexts,
                fact_token=hp.fact_token, num_steps=hp.v_num_grad_steps, lr=hp.v_lr,
                weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
                clamp_norm_factor=hp.clamp_norm_factor, early_stop_loss=hp.early_stop_loss,
                mode=hp.v_mode)
            steps_taken.append(res.steps)
            steps_each.update(zip(idx, res.steps_each))
            for j, i in enumerate(idx):
                zs[i] = res.v_star[j].cpu()
                if paths[i] is not None:  # a write error warns; z is used uncached
                    z = zs[i].contiguous()
                    write_safetensors(paths[i], {"z": z}, {"sha256": tensor_checksum(z)},
                                      what="MEMIT z cache")
        self.last_stats["z_steps"] = steps_taken
        self.last_stats["z_steps_each"] = [steps_each.get(i) for i in range(len(reqs))]  # None: cached
        self.last_stats["z_cached"] = len(reqs) - len(todo)
        Z = torch.stack([z for z in zs if z is not None]).T  # (d, u)
        self.last_stats["z"] = Z
        return Z

    # ------------------------------------------------------------------ editing
    @in_eval_mode
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Any, *,
             apply: bool = False, chunk_size: int | None = None) -> WeightPatch:
        """Edit a batch of requests at once and return one patch over every layer of R.

        The model is edited layer by layer while the patch is computed (keys at later layers are
        read on the partly edited model), then restored exactly unless ``apply=True``. On any
        error the model is left as it was.

        Args:
            apply: leave the edits applied (else the model ends exactly as it started).
            chunk_size: edit a long list in consecutive chunks of this many requests, each
                computed on the model edited by the previous chunks (as :meth:`edit_stream`),
                and return their composed patch (``None``: one batch).

        Raises:
            ValueError / SubjectNotFoundError: a bad request (checked before any work), or a
                ``chunk_size`` below 1.
            IndexError: a layer of R is out of range.
            IncompatibleInputError: the tokenizer does not fit the model, or a prompt is too long.
            ValueOptimisationError: NaN/inf while optimising z.
        """
        check_chunk_size(chunk_size)
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        reqs = as_requests(requests)
        if chunk_size is None or len(reqs) <= chunk_size:
            return self._edit_batch(model, tokenizer, reqs, apply=apply)
        with EditTransaction(model) as tx:
            for s in range(0, len(reqs), chunk_size):
                tx.apply(self._edit_batch(model, tokenizer, reqs[s:s + chunk_size]))
            total = tx.composed(requests=reqs)
            if apply:
                tx.commit()
        return total

    def _edit_batch(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    requests: Sequence[EditRequest], *, apply: bool = False) -> WeightPatch:
        """One batch of :meth:`edit`: one patch over every layer of R."""
        hp = self.hparams
        reqs = check_batch(list(requests), "MEMIT")
        layout = get_layout(model, self.layout_override)
        for layer in hp.layers:
            layout.check_layer(model, layer)
        for r in reqs:
            subject_span(tokenizer, r.prompt, r.subject)
        check_requests(model, tokenizer, reqs)  # before generating templates with the model
        contexts = self._contexts(model, tokenizer)
        check_requests(model, tokenizer, reqs, contexts)
        for layer in hp.layers:  # every C of the unedited model, before any layer is edited
            self._C_of(model, tokenizer, layout.name("mlp_out", layer))
        with EditTransaction(model) as tx:
            Z = self.compute_z(model, tokenizer, reqs)  # (d, u)
            block = layout.block(hp.layers[-1])
            for i, layer in enumerate(hp.layers):
                name = layout.name("mlp_out", layer)
                K, h = self._keys_and_residual(model, tokenizer, name, block, reqs,
                                               contexts)  # (d_in, u), (d, u)
                R_l = (Z.to(h.device) - h) / (len(hp.layers) - i)  # (d, u)
                C = self._C_of(model, tokenizer, name)
                factor = None
                if K.shape[1] < K.shape[0]:  # Woodbury (u < d): C's factor, cached per layer
                    factor = self._factor_of(model, name, C, K.device)
                delta = memit_update(K, R_l, C, hp.mom2_update_weight, factor=factor,
                                     method="dense" if factor is None else "woodbury")
                check_update_representable(model, {weight_param_name(name): delta}, "MEMIT")
                dev = model.get_parameter(weight_param_name(name)).device
                tx.apply(WeightPatch.from_model(
                    model, {weight_param_name(name): delta.to(dev)}, method="memit",
                    hparams=hp.to_dict(), requests=reqs))  # later layers see this one
            total = tx.composed(requests=reqs)
            if apply:
                tx.commit()
        return total

    def edit_stream(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    requests: Iterable[EditRequest | dict[str, Any]], chunk_size: int = 1000,
                    ) -> Iterator[WeightPatch]:
        """Apply a long stream of edits in chunks of ``chunk_size``: each chunk is edited on the
        model as left by the previous chunks, applied, and its patch yielded (revert them in
        reverse order to undo)."""
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        chunk: list[EditRequest] = []
        for r in requests:
            chunk.append(r if isinstance(r, EditRequest) else EditRequest.from_dict(r))
            if len(chunk) == chunk_size:
                yield self.edit(model, tokenizer, chunk, apply=True)
                chunk = []
        if chunk:
            yield self.edit(model, tokenizer, chunk, apply=True)


def _version_of(C: Tensor) -> int | tuple[str, int]:
    """What says that ``C`` is unmodified: its version counter, or for an inference tensor
    (made under ``torch.inference_mode``, e.g. in a Lightning validation hook: it has none) the
    fingerprint of its values."""
    if C.is_inference():
        return ("fingerprint", tensor_fingerprint(C))
    return C._version


def check_chunk_size(chunk_size: int | None) -> None:
    """``chunk_size``: ``None`` or a whole number of requests, at least 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a whole number >= 1, got {chunk_size!r}")


def memit_edit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Any,
               hparams: MEMITHyperParams | dict[str, Any] | str | None = None,
               **kwargs: Any) -> WeightPatch:
    """Functional form of :meth:`MEMIT.edit` (the model is left unchanged)."""
    return MEMIT(hparams, **kwargs).edit(model, tokenizer, requests)
