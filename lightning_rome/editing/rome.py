"""ROME: Rank-One Model Editing (Meng et al., NeurIPS 2022).

``W_out`` of the MLP at layer l* is treated as a linear associative memory ``W K ≈ V``. Inserting
a new key-value pair (k*, v*) with least disturbance to the other keys (weighted by their second
moment C = E[k kᵀ]) has the closed form (paper, eq. 2)::

    Ŵ = W + Λ (C⁻¹ k*)ᵀ,    Λ = (v* − W k*) / ((C⁻¹ k*)ᵀ k*)

Three steps (:func:`compute_key`, :func:`compute_value`, :func:`insert`) return a
:class:`~lightning_rome.patches.WeightPatch` that :func:`rome_edit` composes over many requests.

**key_mode.** Three ways to form the right vector Λ; all use ``u = C⁻¹ k̄`` with k̄ the
template-averaged key, and ``z = v_init + δ`` the optimised value at the bare prompt:

* ``"reference"`` (the default) reproduces the published code: u normalised to unit length, and
  ``Λ = (z − W k_bare − b) / (uᵀ k_bare)`` from the key read on the *bare* prompt, so that
  ``Ŵ k_bare = z``. "Rebuilding ROME" (Gupta et al., 2024) traced sequential-editing collapse to
  this mix of two keys.
* ``"r-rome"`` ("Rebuilding ROME"): the same key everywhere, ``Λ = (z − v̄) / (uᵀ k̄)`` with
  ``v̄ = W k̄ + b`` the module's output averaged over the same templates (the module is linear),
  so that ``Ŵ k̄ = z``.
* ``"paper"``: eq. 2 at k̄ with the value that the optimisation wrote there; with
  ``v_mode="add"`` (δ added to each context's own value) that is ``Ŵ k̄ = W k̄ + b + δ``, i.e.
  ``Λ = δ / (uᵀ k̄)``; with ``"replace"``, ``Ŵ k̄ = z`` (then equal to ``"r-rome"``).

The averages weigh the templates as ``key_average`` says (equally, as the published code).

The default, ``reference``, was chosen by measurement (``benchmarks/bench_rome_modes.py``, table
in ``benchmarks/RESULTS.md``): over 100 single edits it had the best Score on the COUNTERFACT demo
model and on the deep fact model (0.535 against 0.231 and 0.098) and was within 0.01 of the best
(``paper``) on the 4-layer fact model, where it also kept the most of 100 sequential edits; no
mode was better on both single and sequential edits.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.editing.context import (
    SecondMomentFn,
    TemplateAverage,
    ValueResult,
    as_template_groups,
    check_start_words,
    context_template_groups,
    optimise_values,
    read_keys,
    row_length,
    second_moment,
    template_weights,
    wrap,
)
from lightning_rome.editing.hparams import INT, NONNEG, POSITIVE, POSITIVE_INT, HyperParams, Num
from lightning_rome.models.checks import check_requests
from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.modes import in_eval_mode
from lightning_rome.models.precision import check_update_representable
from lightning_rome.models.weights import canonical_weight, weight_param_name
from lightning_rome.patches import EditTransaction, LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest, as_requests
from lightning_rome.tokens import FactToken, subject_span
from lightning_rome.utils.modules import unwrap_model

__all__ = [
    "KEY_MODES",
    "ROME",
    "ROMEHyperParams",
    "SecondMomentFn",
    "compute_key",
    "compute_value",
    "insert",
    "rome_edit",
]

KEY_MODES: tuple[str, ...] = ("reference", "r-rome", "paper")
"""The ROME update's right-vector variants (see the module docstring)."""


@dataclasses.dataclass
class ROMEHyperParams(HyperParams):
    """ROME's hyperparameters. Defaults are the published GPT-2 XL settings.

    Attributes:
        layer: l*, the layer whose MLP ``W_out`` is rewritten.
        fact_token: the token whose key is read: ``subject_last`` (default), ``subject_first``,
            ``last``.
        v_num_grad_steps: Adam steps for v*.
        v_lr: Adam learning rate for v*.
        v_loss_layer: the layer whose output the loss reads (the last layer in every preset; kept
            for parity with published configs; the loss uses the model's logits).
        v_weight_decay: weight of ``‖δ‖ / ‖v_init‖²``.
        clamp_norm_factor: ‖δ‖ is clamped to this times ‖v_init‖.
        kl_factor: weight of the essence-drift KL term.
        early_stop_loss: stop once the loss falls below this.
        v_mode: ``"add"`` (published code: δ added to each context's value) or ``"replace"``.
        mom2_adjustment: use C⁻¹ (False: u = k*).
        mom2_dataset: the corpus for C (``"wikitext"``, a text file path, ...).
        mom2_n_samples: texts sampled for C (100,000 in the paper).
        mom2_dtype: accumulation dtype of C.
        context_template_lengths: ``[length, count]`` pairs for generated context templates
            (``length`` counts the start token, as the published code's ``max_out_len``).
        context_template_starts: start words of the generated templates (``None``: the BOS
            token, as published ROME; MEMIT's published code uses five start words).
        context_templates: explicit templates (each with ``{}``); overrides generation. A list
            of strings, or a list of groups (lists of strings).
        key_average: ``"templates"`` (published ROME: every template weighs equally) or
            ``"groups"`` (average within each group, then over the groups).
        key_mode: ``"reference"`` (default), ``"r-rome"`` or ``"paper"`` (module docstring).
        seed: seed for template generation.
        rewrite_module: module-name template overriding the layout's ``mlp_out``.
    """

    METHOD = "rome"
    RANGES: ClassVar[Mapping[str, Num]] = {
        "layer": INT,
        "v_num_grad_steps": POSITIVE_INT, "v_lr": POSITIVE,
        "v_loss_layer": Num(integer=True, optional=True), "v_weight_decay": NONNEG,
        "clamp_norm_factor": POSITIVE, "kl_factor": NONNEG, "early_stop_loss": NONNEG,
        "mom2_n_samples": POSITIVE_INT, "context_template_lengths": Num(low=1, integer=True,
                                                                        depth=2),
        "seed": INT,
    }

    layer: int = 17
    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    v_mode: Literal["add", "replace"] = "add"
    mom2_adjustment: bool = True
    mom2_dataset: str = "wikitext"
    mom2_n_samples: int = 100_000
    mom2_dtype: str = "float32"
    context_template_lengths: list[list[int]] = dataclasses.field(
        default_factory=lambda: [[5, 10], [10, 10]])
    context_template_starts: list[str] | None = None
    context_templates: list[str] | list[list[str]] | None = None
    key_average: TemplateAverage = "templates"
    key_mode: Literal["reference", "r-rome", "paper"] = "reference"
    seed: int = 0
    rewrite_module: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {list(KEY_MODES)}, got {self.key_mode!r}")
        if self.key_average not in ("templates", "groups"):
            raise ValueError(f"key_average must be 'templates' or 'groups', got "
                             f"{self.key_average!r}")
        if self.v_mode not in ("add", "replace"):
            raise ValueError(f"v_mode must be 'add' or 'replace', got {self.v_mode!r}")
        if self.context_templates is not None:
            as_template_groups(self.context_templates)
        check_start_words(self.context_template_starts)


def _module_name(model: nn.Module, hp: ROMEHyperParams, layout: ModelLayout) -> str:
    layout.check_layer(model, hp.layer)
    return hp.rewrite_module.format(hp.layer) if hp.rewrite_module else layout.name(
        "mlp_out", hp.layer)


def _template_groups(model: nn.Module, tok: PreTrainedTokenizerBase, hp: ROMEHyperParams,
                     ) -> list[list[str]]:
    if hp.context_templates is not None:
        return as_template_groups(hp.context_templates)
    return context_template_groups(model, tok, hp.context_template_lengths, hp.seed,
                                   starts=hp.context_template_starts)


def _contexts(model: nn.Module, tok: PreTrainedTokenizerBase, hp: ROMEHyperParams) -> list[str]:
    return [t for g in _template_groups(model, tok, hp) for t in g]


def _weights(hp: ROMEHyperParams, groups: Sequence[Sequence[str]], n_ctx: int) -> Tensor:
    """The key-average weight of each of ``n_ctx`` contexts, ``(n_ctx,)`` float64."""
    if sum(len(g) for g in groups) != n_ctx:
        raise ValueError(f"key_average='groups' needs the editor's own template groups (sizes "
                         f"{[len(g) for g in groups]}), got {n_ctx} contexts")
    return template_weights(groups, hp.key_average)


def _validate(tok: PreTrainedTokenizerBase, r: EditRequest) -> None:
    subject_span(tok, r.prompt, r.subject)  # raises SubjectNotFoundError with the prompt


@in_eval_mode
def compute_key(model: nn.Module, tokenizer: PreTrainedTokenizerBase, request: EditRequest,
                hparams: ROMEHyperParams, *, layout: ModelLayout | None = None,
                contexts: Sequence[str] | None = None) -> Tensor:
    """k*: the input of ``W_out`` at the fact token, averaged over the context templates
    (ROME paper, eq. 3), weighted as ``hparams.key_average`` says (with ``"groups"``,
    ``contexts`` must be laid out as the editor's template groups). Returns ``(d_in,)``
    float32."""
    layout = layout or get_layout(model)
    name = _module_name(model, hparams, layout)
    groups = _template_groups(model, tokenizer, hparams) if (
        contexts is None or hparams.key_average == "groups") else [list(contexts)]
    contexts = list(contexts) if contexts is not None else [t for g in groups for t in g]
    templates = [wrap(c, request.prompt) for c in contexts]
    k, _ = read_keys(model, tokenizer, name, templates, [request.subject] * len(templates),
                     hparams.fact_token)  # (n_ctx, d_in)
    if hparams.key_average == "templates":
        return k.mean(0)  # (d_in,)
    w = _weights(hparams, groups, len(contexts)).to(k)  # (n_ctx,)
    return w @ k  # (d_in,)


@in_eval_mode
def compute_value(model: nn.Module, tokenizer: PreTrainedTokenizerBase, request: EditRequest,
                  hparams: ROMEHyperParams, *, layout: ModelLayout | None = None,
                  contexts: Sequence[str] | None = None) -> ValueResult:
    """v*: the ``W_out`` output that makes the model predict ``target_new`` (paper, eq. 4).

    Works from any Lightning hook (it enables gradients and leaves inference mode itself).
    """
    layout = layout or get_layout(model)
    name = _module_name(model, hparams, layout)
    contexts = list(contexts) if contexts is not None else _contexts(model, tokenizer, hparams)
    return optimise_values(model, tokenizer, [request], name, contexts, **_value_kwargs(hparams))


def _value_kwargs(hp: ROMEHyperParams) -> dict[str, Any]:
    """The hyperparameters of :func:`~lightning_rome.editing.context.optimise_values`."""
    return {"fact_token": hp.fact_token, "num_steps": hp.v_num_grad_steps, "lr": hp.v_lr,
            "weight_decay": hp.v_weight_decay, "kl_factor": hp.kl_factor,
            "clamp_norm_factor": hp.clamp_norm_factor, "early_stop_loss": hp.early_stop_loss,
            "mode": hp.v_mode}


def _module_value(module: nn.Module, k: Tensor) -> Tensor:
    """The module's output for input ``k`` (``W k + b``), in float64. ``k``: (d_in,)."""
    with torch.no_grad():
        W = canonical_weight(module).double()  # (d_out, d_in)
        v = W @ k.double()  # (d_out,)
        bias = getattr(module, "bias", None)
        return v + bias.double() if bias is not None else v


def insert(module: nn.Module, k_star: Tensor, v_star: Tensor, C_inv_k: Tensor, *,
           k_right: Tensor | None = None, normalise_u: bool = False) -> LowRankDelta:
    """The rank-one update ``Δ = Λ uᵀ`` with ``u = C⁻¹ k*`` and ``Λ = (v* − W k) / (uᵀ k)``.

    Args:
        module: the rewritten linear layer.
        k_star: ``(d_in,)`` the key whose value becomes v*.
        v_star: ``(d_out,)`` the target output of the module (bias included).
        C_inv_k: ``(d_in,)`` ``C⁻¹ k*`` (or k* itself when ``mom2_adjustment`` is off).
        k_right: the key used for Λ (the published code's bare-prompt key); default ``k_star``.
        normalise_u: scale u to unit length (the published code does; Δ is unchanged for
            ``k_right = k_star`` because Λ absorbs the scale).

    Returns:
        The canonical ``[out, in]`` delta as ``LowRankDelta(Λ (d_out, 1), uᵀ (1, d_in))``.
    """
    u = C_inv_k.detach().double()  # (d_in,)
    if normalise_u:
        u = u / u.norm()
    k = (k_right if k_right is not None else k_star).double()  # (d_in,)
    denom = u @ k  # scalar (C⁻¹k*)ᵀ k
    if not bool(torch.isfinite(denom)) or float(denom.abs()) < 1e-12:
        raise FloatingPointError(f"ROME denominator (C⁻¹k*)ᵀk is {float(denom)}: the key is "
                                 "degenerate or C is ill-conditioned")
    Lam = (v_star.detach().double() - _module_value(module, k.detach())) / denom  # (d_out,) Λ
    return LowRankDelta(Lam[:, None].float().detach(),
                        u[None, :].float().detach())  # (d_out, 1), (1, d_in)


class ROME:
    """The ROME editor. Reuses C⁻¹ (a Cholesky factor per layer) and the context templates
    across edits.

    Args:
        hparams: a :class:`ROMEHyperParams`, a dict, a preset name (``"gpt2-xl"``) or a YAML path.
        second_moment: ``(model, tokenizer, module_name) -> C``; default: statistics over
            ``hparams.mom2_dataset`` from :mod:`lightning_rome.stats`, cached on disk.
        layout: a layout override for models whose family is not registered.

    Example:
        >>> rome = ROME("gpt2-xl")
        >>> patch = rome.edit(model, tok, EditRequest("{} is in", "Eiffel Tower", "Rome"))
        >>> patch.apply(model)
    """

    def __init__(self, hparams: ROMEHyperParams | dict[str, Any] | str | None = None, *,
                 second_moment: SecondMomentFn | None = None,
                 layout: ModelLayout | dict[str, Any] | str | None = None) -> None:
        self.hparams = ROMEHyperParams.resolve(hparams)
        self.second_moment = second_moment
        self.layout_override = layout
        self._chol: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = (
            weakref.WeakKeyDictionary())
        self.last_results: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        # The per-model Cholesky cache holds weak references, which cannot be pickled (ddp_spawn
        # pickles callbacks and modules); a copy starts with an empty cache.
        state = self.__dict__.copy()
        state["_chol"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._chol = weakref.WeakKeyDictionary()

    # C⁻¹ k via one Cholesky factorisation per (model, layer), reused across edits.
    def _cholesky(self, model: nn.Module, tok: PreTrainedTokenizerBase, name: str) -> Tensor:
        per_model = self._chol.setdefault(model, {})
        if name not in per_model:
            hp = self.hparams
            C = second_moment(model, tok, name, fn=self.second_moment, corpus=hp.mom2_dataset,
                              n_samples=hp.mom2_n_samples, dtype=hp.mom2_dtype)  # (d_in, d_in)
            L, info = torch.linalg.cholesky_ex(C)
            if int(info) != 0:
                raise FloatingPointError(
                    f"the second moment C of {name!r} is not positive definite (too few samples "
                    "for its dimension?); use more statistics samples")
            per_model[name] = L
        return per_model[name]

    def C_inv_times(self, model: nn.Module, tok: PreTrainedTokenizerBase, name: str,
                    k: Tensor) -> Tensor:
        """``C⁻¹ k`` for ``k`` of shape ``(d_in,)`` or ``(d_in, n)``."""
        L = self._cholesky(model, tok, name)
        kk = k.double().to(L.device)
        col = kk.ndim == 1
        x = torch.cholesky_solve(kk[:, None] if col else kk, L)
        return x[:, 0] if col else x

    @in_eval_mode
    def edit_one(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 request: EditRequest) -> WeightPatch:
        """One request on the current model; the model is not modified."""
        return self.edit_modes(model, tokenizer, request, [self.hparams.key_mode])[
            self.hparams.key_mode]

    @in_eval_mode
    def edit_modes(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   request: EditRequest, modes: Sequence[str] = KEY_MODES,
                   ) -> dict[str, WeightPatch]:
        """One request's patch under each of ``modes`` (see the module docstring), from one key
        and one value optimisation (the modes differ only in the right vector); the model is
        not modified. ``last_results`` gets one entry, for the first mode."""
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        hp = self.hparams
        bad = [m for m in modes if m not in KEY_MODES]
        if bad or not modes:
            raise ValueError(f"key modes must be among {list(KEY_MODES)}, got {list(modes)}")
        layout = get_layout(model, self.layout_override)
        name = _module_name(model, hp, layout)
        _validate(tokenizer, request)
        contexts = _contexts(model, tokenizer, hp)
        k_star, u = self._key(model, tokenizer, request, layout, name, contexts)
        res = compute_value(model, tokenizer, request, hp, layout=layout, contexts=contexts)
        return self._patches(model, tokenizer, request, modes, name, k_star, u, res, 0)

    def _key(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, request: EditRequest,
             layout: ModelLayout, name: str, contexts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """k* ``(d_in,)`` and ``u = C⁻¹ k*`` ``(d_in,)`` (k* itself without ``mom2_adjustment``)."""
        hp = self.hparams
        k_star = compute_key(model, tokenizer, request, hp, layout=layout, contexts=contexts)
        u = self.C_inv_times(model, tokenizer, name, k_star) if hp.mom2_adjustment else k_star
        return k_star, u.to(k_star.device)

    def _patches(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 request: EditRequest, modes: Sequence[str], name: str, k_star: Tensor,
                 u: Tensor, res: ValueResult, j: int) -> dict[str, WeightPatch]:
        """The patches of ``request`` under ``modes``, from its key ``k_star`` ``(d_in,)``,
        ``u`` ``(d_in,)`` and row ``j`` of the value optimisation ``res``; appends its entry
        to ``last_results``."""
        hp = self.hparams
        module = model.get_submodule(name)
        z = res.v_star[j].detach().to(k_star.device)  # (d_out,) v_init + δ, bare prompt
        patches: dict[str, WeightPatch] = {}
        written: dict[str, Tensor] = {}
        for mode in modes:
            v_star = z
            if mode == "r-rome":
                # One key everywhere: Λ = (v_init + δ − v̄) / (uᵀ k̄), v̄ = W k̄ + b.
                delta = insert(module, k_star, z, u, normalise_u=True)
            elif mode == "paper":
                if hp.v_mode == "add":
                    # δ was added to every context's own value, so the value to write at the
                    # averaged key is that key's own value plus δ: v* = W k* + b + δ (Λ = δ).
                    v_star = (_module_value(module, k_star).float()
                              + (res.v_star[j] - res.v_init[j]).detach().to(k_star.device))
                delta = insert(module, k_star, v_star, u)
            else:  # reference: Λ from the bare prompt's key
                k_bare, _ = read_keys(model, tokenizer, name, [request.prompt],
                                      [request.subject], hp.fact_token)
                delta = insert(module, k_star, z, u, k_right=k_bare[0], normalise_u=True)
            written[mode] = v_star
            check_update_representable(model, {weight_param_name(name): delta}, "ROME")
            dev = canonical_weight(module).device
            patches[mode] = WeightPatch.from_model(
                model, {weight_param_name(name): delta.to(dev)}, method="rome",
                hparams={**hp.to_dict(), "key_mode": mode}, requests=[request])
        steps = res.steps_each[j] if res.steps_each else res.steps
        loss = res.loss_each[j] if res.loss_each else (res.losses[-1] if res.losses else None)
        self.last_results.append({"case_id": request.case_id, "steps": steps, "loss": loss,
                                  "v_init_norm": float(res.v_init[j].norm()),
                                  "delta_v_norm": float((res.v_star[j] - res.v_init[j]).norm()),
                                  "k_star": k_star.detach().cpu(),
                                  "v_star": written[modes[0]].cpu(), "z": z.cpu()})
        return patches

    @in_eval_mode
    def edit_each(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                  requests: EditRequest | dict[str, Any] | Sequence[EditRequest | dict[str, Any]],
                  *, batch_size: int = 8,
                  progress: Callable[[int], None] | None = None) -> list[WeightPatch]:
        """Each request's own patch on the current model, in the order of ``requests``: what
        ``edit(model, tokenizer, [r])`` returns for each ``r`` alone (the model is not modified,
        and no request sees another's edit), with the value optimisations of up to
        ``batch_size`` requests run in one batch. Every request stops on its own and its δ is
        frozen from then on (:func:`~lightning_rome.editing.context.optimise_values`), so its
        v* is the one optimising it alone gives, to float rounding (the batch is padded to its
        longest row). Requests are batched in the order of their rows' lengths, so that
        little padding is computed. ``last_results`` gets one entry per request, in order.

        This is the fast way to evaluate many single edits (a batch of small rows runs the
        model's layers once per step, not once per request).

        ``progress(n)``, when given, is called after each batch with the number of requests
        whose value optimisation just finished (e.g. a progress bar's ``update``).

        Raises:
            ValueError / SubjectNotFoundError: a bad request or ``batch_size`` (checked before
                any work); the other errors of :meth:`edit`.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        hp = self.hparams
        reqs = as_requests(requests)
        layout = get_layout(model, self.layout_override)
        name = _module_name(model, hp, layout)
        for r in reqs:
            _validate(tokenizer, r)
        check_requests(model, tokenizer, reqs)  # before generating templates with the model
        contexts = _contexts(model, tokenizer, hp)
        check_requests(model, tokenizer, reqs, contexts)
        order = sorted(range(len(reqs)),
                       key=lambda i: row_length(tokenizer, reqs[i], hp.fact_token))
        keys = [self._key(model, tokenizer, r, layout, name, contexts) for r in reqs]
        values: list[tuple[ValueResult, int] | None] = [None] * len(reqs)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            res = optimise_values(model, tokenizer, [reqs[i] for i in idx], name, contexts,
                                  **_value_kwargs(hp))
            for j, i in enumerate(idx):
                values[i] = (res, j)
            if progress is not None:
                progress(len(idx))
        self.last_results = []
        patches = []
        for r, (k_star, u), value in zip(reqs, keys, values):
            assert value is not None
            patches.append(self._patches(model, tokenizer, r, [hp.key_mode], name, k_star, u,
                                         *value)[hp.key_mode])
        return patches

    @in_eval_mode
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
             requests: EditRequest | dict[str, Any] | Sequence[EditRequest | dict[str, Any]],
             *, apply: bool = False) -> WeightPatch:
        """Edit one or many requests, one after another (each on the model edited by the
        previous ones), and return their composed patch.

        Args:
            apply: leave the edits applied (else the model ends exactly as it started).

        Raises:
            ValueError / SubjectNotFoundError: a bad request (checked before any work).
            IndexError: the layer is out of range.
            ValueOptimisationError: NaN/inf during the v* optimisation.
            In every error case, the model is left exactly as it was.
        """
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        reqs = as_requests(requests)
        layout = get_layout(model, self.layout_override)
        _module_name(model, self.hparams, layout)
        for r in reqs:
            _validate(tokenizer, r)
        check_requests(model, tokenizer, reqs)  # before generating templates with the model
        check_requests(model, tokenizer, reqs, _contexts(model, tokenizer, self.hparams))
        self.last_results = []
        with EditTransaction(model) as tx:
            for r in reqs:
                tx.apply(self.edit_one(model, tokenizer, r))  # on the model edited so far
            total = tx.composed()
            if apply:
                tx.commit()
        return total


def rome_edit(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
              requests: EditRequest | Sequence[EditRequest],
              hparams: ROMEHyperParams | dict[str, Any] | str | None = None,
              **kwargs: Any) -> WeightPatch:
    """Functional form of :meth:`ROME.edit` (the model is left unchanged)."""
    return ROME(hparams, **kwargs).edit(model, tokenizer, requests)
