"""KN: Knowledge Neurons (Dai et al., ACL 2022), the baseline of the ROME paper.

Three steps, each a function of its own:

1. **Attribution** (:func:`neuron_attributions`). A "neuron" is one coordinate of the MLP's
   intermediate activation: the input of ``W_out`` (``layout.name("mlp_out", l)``), at the token
   that predicts the answer. For layer ``l`` with activation ``ā`` (``(d_ff,)``), let
   ``F(a) = P(o | prompt)`` when the activation at that token is replaced by ``a``. Integrated
   gradients (the paper's eq. 5) along the straight path from 0 to ``ā``::

       Attr_i = ā_i ∫₀¹ ∂F(α ā)/∂a_i dα  ≈  ā_i / m Σ_k ∂F(α_k ā)/∂a_i

   with ``m = steps`` Riemann points ``α_k = k/m`` (``riemann="right"``, the paper's sum),
   ``(k−1)/m`` (``"left"``) or ``(k−½)/m`` (``"midpoint"``). As in the paper's and the ROME
   baseline's code, **all d_ff neurons of one layer are scaled together** (one path per layer,
   the other layers untouched), so completeness holds per layer:
   ``Σ_i Attr_i → F(ā) − F(0)`` as ``m`` grows. ``F`` is the *probability* (not the log) of the
   answer's first token (``attribution_tokens="first"``) or, with ``"all"``, the mean of the
   per-token attributions over the answer's tokens, teacher-forced (token ``j`` is attributed at
   the position that predicts it).

   The answer attributed is the *old* fact: ``target_true``, or, when a request has none, the
   model's own top-1 next token.

2. **Selection** (:func:`select_neurons`). Per prompt, the coarse neurons are those whose
   attribution exceeds ``adaptive_threshold × max`` (the max over all scanned layers of that
   prompt; a prompt whose max is not positive contributes none). With ``refine`` the neurons kept
   are those shared by *more than* a fraction ``p`` of the prompts (the request's prompt plus any
   ``extra_prompts``: paraphrases); without it, the union.

3. **Update** (:func:`kn_update`). A selected neuron ``i`` of layer ``l`` owns the value vector
   ``v_i = W_out[:, i]`` (column ``i`` of the canonical ``[out, in]`` weight). The paper's
   "updating facts" edit subtracts the embedding of the old answer and adds that of the new::

       v_i ← v_i − λ₁ E[o]  + λ₂ E[o*]

   with ``λ₁ = erase_scale`` and ``λ₂ = update_scale`` (``scale_by_value_norm`` multiplies them by
   ``‖v_i‖ / ‖E[·]‖``, which is what the paper's own code does). ``E`` is the input embedding
   (``embedding="output"``: the unembedding). Only the selected columns change: the patch is a
   rank-2 :class:`~lightning_rome.patches.LowRankDelta` ``[E[o], E[o*]] @ R`` whose right factor
   ``R`` is zero outside the selected neurons.

**Defaults and the ROME baseline.** The ``gpt2-xl`` preset takes the ROME paper's published KN
settings (``steps`` 20, ``batch_size`` 20, ``adaptive_threshold`` 0.2, ``p`` 0.4, ``refine``
off: one prompt, all of its coarse neurons) and its edit: ``λ₁ = 2`` on the embedding of the
model's top-1 prediction (``erase_token="argmax"``) and ``λ₂ = 1`` on the *sum* of the embeddings
of all the new target's tokens (``update_tokens="all"``). Two deliberate differences from that
code: it scaled GPT-2's ``c_fc`` *output* (before the GELU) while the paper, and this module, scale
the activation that multiplies the value vectors (after the GELU: ``W_out``'s input); and targets
follow the package's leading-space rule (``" Rome"``, not ``"Rome"``). The dataclass defaults
differ from the preset only in the tokens used: ``E[o]`` is the first token of ``target_true``
and ``E[o*]`` the first token of ``target_new``.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.editing.hparams import FINITE, POSITIVE_INT, HyperParams, Num
from lightning_rome.hooks import module_hooks, replace_positions
from lightning_rome.models.checks import check_requests
from lightning_rome.models.layout import ModelLayout, get_layout
from lightning_rome.models.modes import in_eval_mode
from lightning_rome.models.weights import canonical_weight, weight_param_name
from lightning_rome.patches import EditTransaction, LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest, as_requests
from lightning_rome.scoring import forward_logits, make_batch, model_device
from lightning_rome.tokens import continuation_ids, encode_prompt, fill, subject_span
from lightning_rome.utils.modules import unwrap_model

__all__ = [
    "KN",
    "KNHyperParams",
    "kn_update",
    "neuron_attributions",
    "riemann_alphas",
    "select_neurons",
]

Riemann = Literal["left", "right", "midpoint"]
Neuron = tuple[int, int]
"""``(layer, index)``: one coordinate of the input of ``W_out`` at ``layer``."""


@dataclasses.dataclass
class KNHyperParams(HyperParams):
    """Knowledge Neurons hyperparameters (see the module docstring for the method).

    Attributes:
        layers: layers whose neurons are attributed (``None``: every layer).
        steps: m, the Riemann points of integrated gradients.
        batch_size: scaled copies of the prompt per forward pass.
        riemann: ``"right"`` (α_k = k/m, the paper), ``"left"`` or ``"midpoint"``.
        attribution_tokens: attribute P of the answer's ``"first"`` token, or the mean over
            ``"all"`` its tokens (teacher-forced).
        adaptive_threshold: a neuron is coarse when its attribution exceeds this times the
            prompt's maximum attribution.
        refine: keep only neurons that are coarse in more than a fraction ``p`` of the prompts
            (else the union of all prompts' coarse neurons).
        p: the sharing fraction of ``refine``.
        erase_token: the embedding subtracted: the first token of ``"target_true"`` (the model's
            top-1 token when a request has no ``target_true``), or always the model's top-1
            next token (``"argmax"``, the ROME baseline).
        update_tokens: the embedding added: the ``"first"`` token of ``target_new``, or the sum
            over ``"all"`` its tokens (the ROME baseline).
        erase_scale: λ₁.
        update_scale: λ₂.
        scale_by_value_norm: multiply λ by ``‖v_i‖ / ‖E‖`` for each neuron (the paper's code).
        embedding: ``"input"`` (the token embedding) or ``"output"`` (the unembedding rows).
    """

    METHOD = "kn"
    RANGES: ClassVar[Mapping[str, Num]] = {
        "layers": Num(integer=True, optional=True, depth=1), "steps": POSITIVE_INT,
        "batch_size": POSITIVE_INT, "adaptive_threshold": Num(low=0, high=1, low_open=True),
        "p": Num(low=0, high=1, high_open=True), "erase_scale": FINITE, "update_scale": FINITE,
    }

    layers: list[int] | None = None
    steps: int = 20
    batch_size: int = 20
    riemann: Riemann = "right"
    attribution_tokens: Literal["first", "all"] = "first"
    adaptive_threshold: float = 0.2
    refine: bool = False
    p: float = 0.4
    erase_token: Literal["target_true", "argmax"] = "target_true"
    update_tokens: Literal["first", "all"] = "first"
    erase_scale: float = 2.0
    update_scale: float = 1.0
    scale_by_value_norm: bool = False
    embedding: Literal["input", "output"] = "input"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and not self.layers:
            raise ValueError("KN layers must be None (every layer) or a non-empty list")
        _check_choice("riemann", self.riemann, ("left", "right", "midpoint"))
        _check_choice("attribution_tokens", self.attribution_tokens, ("first", "all"))
        _check_choice("erase_token", self.erase_token, ("target_true", "argmax"))
        _check_choice("update_tokens", self.update_tokens, ("first", "all"))
        _check_choice("embedding", self.embedding, ("input", "output"))


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# ---------------------------------------------------------------------------- 1. attribution
def riemann_alphas(steps: int, rule: Riemann = "right") -> Tensor:
    """The ``steps`` scales α_k of the Riemann sum ``1/m Σ_k f(α_k) ≈ ∫₀¹ f``, float64."""
    _check_choice("riemann", rule, ("left", "right", "midpoint"))
    k = torch.arange(1, steps + 1, dtype=torch.float64)  # (m,)
    shift = {"right": 0.0, "left": 1.0, "midpoint": 0.5}[rule]
    return (k - shift) / steps  # (m,)


def _target_ids(tokenizer: PreTrainedTokenizerBase, target: str | Sequence[int]) -> list[int]:
    if isinstance(target, str):
        return continuation_ids(tokenizer, target)
    ids = [int(t) for t in target]
    if not ids:
        raise ValueError("the attributed target has no tokens")
    return ids


def _layers(model: nn.Module, layout: ModelLayout, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(layout.n_layers(model)))
    return [layout.check_layer(model, layer) for layer in layers]


def _accepts(model: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False


def _last_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits at the last position, ``(B, V)`` float32, computing only those when the model
    allows (unpadded rows: no mask needed)."""
    kwargs: dict[str, Any] = {"use_cache": False}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, **kwargs).logits[:, -1].float()


def _ig_one_layer(model: nn.Module, name: str, ids: Sequence[int], target_id: int,
                  a_bar: Tensor, alphas: Tensor, batch_size: int) -> Tensor:
    """``ā ⊙ 1/m Σ_k ∇F(α_k ā)`` for one layer (``W_out`` named ``name``), float32 ``(d_ff,)``.

    ``ids`` ends at the predicting token (a causal model's output there ignores later tokens),
    whose activation ``ā`` (``(d_ff,)``) is scaled.
    """
    device = a_bar.device
    pos = len(ids) - 1
    row = torch.as_tensor(list(ids), dtype=torch.long, device=device)  # (T,)
    grad_sum = torch.zeros(a_bar.shape[0], dtype=torch.float32, device=device)  # (d_ff,)
    for s in range(0, alphas.shape[0], batch_size):
        alpha = alphas[s:s + batch_size].to(device=device, dtype=torch.float32)  # (n,)
        a = (alpha[:, None] * a_bar.float()[None, :]).requires_grad_(True)  # (n, d_ff)
        input_ids = row[None, :].expand(a.shape[0], -1)  # (n, T)
        with module_hooks(model, [name], edit_input=replace_positions(pos, a)):
            logits = _last_logits(model, input_ids)  # (n, V)
        prob = torch.softmax(logits, dim=-1)[:, target_id]  # (n,)  F(α_k ā)
        (grad,) = torch.autograd.grad(prob.sum(), a)  # (n, d_ff)  ∂F/∂a at α_k ā
        grad_sum += grad.sum(0)
    return a_bar.float() * grad_sum / alphas.shape[0]  # (d_ff,)


def neuron_attributions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str | Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    steps: int = 20,
    batch_size: int = 20,
    riemann: Riemann = "right",
    tokens: Literal["first", "all"] = "first",
    layout: ModelLayout | None = None,
) -> Tensor:
    """Integrated-gradients attribution of every MLP neuron of ``layers`` to ``P(target)``.

    Each layer's neurons (the input of its ``W_out`` at the predicting token) are scaled together
    from 0 to their values; see the module docstring for the formula.

    Args:
        model: a causal LM (its weights are not changed).
        tokenizer: its tokenizer.
        prompt: the prompt text (the subject filled in).
        target: the answer: a string (tokenized with the leading-space rule) or token ids.
        layers: the layers (default: all).
        steps: m, the Riemann points.
        batch_size: scaled copies per forward pass.
        riemann: ``"right"``, ``"left"`` or ``"midpoint"``.
        tokens: ``"first"``: P of the first target token after the prompt; ``"all"``: the mean of
            the per-token attributions over the target's tokens, teacher-forced.
        layout: a layout override.

    Returns:
        ``(len(layers), d_ff)`` float32; row ``r`` is layer ``layers[r]``. For one layer and
        enough steps the row sums to ``F(ā) − F(0)``: the probability minus the probability with
        that layer's activation zeroed at the predicting token.

    Raises:
        IndexError: a layer is out of range.
        ValueError: the target is empty.
        FloatingPointError: an activation or a gradient is NaN/inf.
    """
    layout = layout or get_layout(model)
    layer_list = _layers(model, layout, layers)
    if (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
            or isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"steps and batch_size must be positive ints, got {steps!r} and "
                         f"{batch_size!r}")
    _check_choice("tokens", tokens, ("first", "all"))
    t_ids = _target_ids(tokenizer, target)
    if tokens == "first":
        t_ids = t_ids[:1]
    p_ids = encode_prompt(tokenizer, prompt)
    ids = p_ids + t_ids[:-1]  # teacher forcing: token j is predicted at len(p) − 1 + j
    positions = [len(p_ids) - 1 + j for j in range(len(t_ids))]
    names = [layout.name("mlp_out", layer) for layer in layer_list]
    alphas = riemann_alphas(steps, riemann)  # (m,)
    device = model_device(model)

    # Leave inference mode (a Lightning hook may run under it): the IG passes need autograd.
    with torch.inference_mode(False):
        with torch.no_grad(), module_hooks(model, names, retain_input=True) as rec:
            forward_logits(model, make_batch(tokenizer, [ids], "right", device))
        a_bars = {n: rec[n].input[0] for n in names}  # (T, d_ff) each
        for layer, n in zip(layer_list, names):
            if not bool(torch.isfinite(a_bars[n][positions]).all()):
                raise FloatingPointError(
                    f"KN: the MLP activations (input of {n!r}, layer {layer}) are NaN or inf "
                    f"for prompt {prompt!r}")
        out = torch.zeros(len(layer_list), a_bars[names[0]].shape[-1], dtype=torch.float32,
                          device=device)  # (L, d_ff)
        with torch.enable_grad():
            for r, n in enumerate(names):
                for pos, tid in zip(positions, t_ids):
                    out[r] += _ig_one_layer(model, n, ids[:pos + 1], tid, a_bars[n][pos],
                                            alphas, batch_size)
    out /= len(t_ids)
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError(f"KN: the attributions for prompt {prompt!r} contain NaN or inf")
    return out.detach()


# ---------------------------------------------------------------------------- 2. selection
def select_neurons(attributions: Sequence[Tensor], layers: Sequence[int], *,
                   adaptive_threshold: float = 0.2, refine: bool = False, p: float = 0.4,
                   ) -> tuple[list[Neuron], list[list[Neuron]]]:
    """The knowledge neurons from the attributions of one or more prompts of a fact.

    Args:
        attributions: one ``(len(layers), d_ff)`` tensor per prompt.
        layers: the layer of each row.
        adaptive_threshold: coarse neurons exceed this times the prompt's maximum attribution.
        refine: keep neurons coarse in more than ``p × len(attributions)`` prompts (else all).
        p: the sharing fraction.

    Returns:
        The selected ``(layer, index)`` neurons (sorted) and each prompt's coarse neurons. A
        prompt whose maximum attribution is not positive has no coarse neurons.
    """
    if not attributions:
        raise ValueError("select_neurons needs the attributions of at least one prompt")
    coarse: list[list[Neuron]] = []
    for A in attributions:  # (L, d_ff)
        if A.ndim != 2 or A.shape[0] != len(layers):
            raise ValueError(f"attributions must be ({len(layers)}, d_ff), got "
                             f"{tuple(A.shape)}")
        top = float(A.max())
        if top <= 0.0:
            coarse.append([])
            continue
        t = adaptive_threshold * top
        hits = torch.nonzero(A.gt(t)).tolist()  # (n, 2) rows of (r, i) with A > t
        coarse.append([(int(layers[r]), int(i)) for r, i in hits])
    counts = Counter(n for c in coarse for n in c)
    if refine:
        kept = [n for n, c in counts.items() if c > p * len(attributions)]
    else:
        kept = list(counts)
    return sorted(kept), coarse


# ---------------------------------------------------------------------------- 3. update
def kn_update(module: nn.Module, neurons: Sequence[int], e_erase: Tensor, e_update: Tensor, *,
              erase_scale: float, update_scale: float, scale_by_value_norm: bool = False,
              ) -> LowRankDelta:
    """``Δ[:, i] = −λ₁ E[o] + λ₂ E[o*]`` for the selected ``neurons`` i of ``W_out``; zero elsewhere.

    Args:
        module: ``W_out`` (``nn.Linear`` or ``Conv1D``).
        neurons: the selected indices of its input dimension.
        e_erase: ``(d_out,)`` E[o], the embedding subtracted.
        e_update: ``(d_out,)`` E[o*], the embedding added.
        erase_scale: λ₁.
        update_scale: λ₂.
        scale_by_value_norm: λ ← λ ‖v_i‖ / ‖E‖ per neuron (``v_i = W_out[:, i]``).

    Returns:
        The canonical ``[out, in]`` delta ``LowRankDelta([E[o], E[o*]] (d_out, 2), R (2, d_in))``,
        float32, with ``R[:, j] = 0`` for every unselected ``j``.
    """
    W = canonical_weight(module).detach()  # (d_out, d_ff)
    d_out, d_ff = W.shape
    idx = sorted({int(i) for i in neurons})
    if not idx:
        raise ValueError("kn_update needs at least one neuron")
    if idx[0] < 0 or idx[-1] >= d_ff:
        raise IndexError(f"neuron index out of range: W_out has {d_ff} neurons, got {idx}")
    e_o = e_erase.detach().float().to(W.device)  # (d_out,)
    e_new = e_update.detach().float().to(W.device)  # (d_out,)
    for what, e in (("erased", e_o), ("added", e_new)):
        if e.shape != (d_out,):
            raise ValueError(f"the {what} embedding has shape {tuple(e.shape)}, W_out's output "
                             f"dimension is {d_out}")
        if not bool(torch.isfinite(e).all()):
            raise FloatingPointError(f"the {what} embedding contains NaN or inf")
    sel = torch.as_tensor(idx, device=W.device)  # (s,)
    lam1 = torch.full((len(idx),), float(erase_scale), device=W.device)  # (s,)
    lam2 = torch.full((len(idx),), float(update_scale), device=W.device)  # (s,)
    if scale_by_value_norm:
        v_norm = W[:, sel].float().norm(dim=0)  # (s,)  ‖v_i‖
        for e in (e_o, e_new):
            if float(e.norm()) == 0.0:
                raise FloatingPointError("an embedding has zero norm: cannot scale by ‖v‖/‖E‖")
        lam1 = lam1 * v_norm / e_o.norm()
        lam2 = lam2 * v_norm / e_new.norm()
    R = torch.zeros(2, d_ff, dtype=torch.float32, device=W.device)  # (2, d_ff)
    R[0, sel] = -lam1
    R[1, sel] = lam2
    left = torch.stack([e_o, e_new], dim=1)  # (d_out, 2)
    return LowRankDelta(left, R)


def _embedding_matrix(model: nn.Module, layout: ModelLayout, which: str) -> Tensor:
    """``(V, d)``: the token embedding or the unembedding rows."""
    if which == "input":
        return layout.module(model, "embed").weight.detach()  # (V, d)
    head = layout.module(model, "lm_head")
    return canonical_weight(head).detach()  # (V, d)


# ---------------------------------------------------------------------------- the editor
class KN:
    """The Knowledge Neurons editor: attribute, select, and rewrite the value vectors.

    Args:
        hparams: a :class:`KNHyperParams`, a dict, a preset name (``"gpt2-xl"``) or a YAML path.
        layout: a layout override for models whose family is not registered.

    Example:
        >>> kn = KN("gpt2-xl")
        >>> patch = kn.edit(model, tok, EditRequest("{} is in", "Eiffel Tower", "Rome",
        ...                                         target_true="Paris"))
        >>> patch.apply(model)
        >>> kn.last_results[0]["neurons"]        # [(layer, index), ...]
    """

    def __init__(self, hparams: KNHyperParams | dict[str, Any] | str | None = None, *,
                 layout: ModelLayout | dict[str, Any] | str | None = None) -> None:
        self.hparams = KNHyperParams.resolve(hparams)
        self.layout_override = layout
        self.last_results: list[dict[str, Any]] = []

    @torch.no_grad()
    def _top1(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str) -> int:
        batch = make_batch(tokenizer, [encode_prompt(tokenizer, text)], "right",
                           model_device(model))
        logits = forward_logits(model, batch)[0, -1]  # (V,)
        # NaN/inf here also reaches the attribution pass, which raises naming the layer.
        return int(logits.argmax())

    @in_eval_mode
    def edit_one(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 request: EditRequest, *, extra_prompts: Sequence[str] = ()) -> WeightPatch:
        """One request on the current model; the model is not modified (put it in eval mode:
        dropout would make the attributions noisy).

        Args:
            extra_prompts: more prompts of the same fact (paraphrases) for the attribution: each
                a template with ``{}`` (filled with the subject) or a full text.
        """
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        hp = self.hparams
        layout = get_layout(model, self.layout_override)
        layers = _layers(model, layout, hp.layers)
        subject_span(tokenizer, request.prompt, request.subject)
        prompts = [request.text] + [fill(t, request.subject)[0] if "{}" in t else t
                                    for t in extra_prompts]
        top1 = self._top1(model, tokenizer, request.text)
        if request.target_true is not None:
            old_ids = continuation_ids(tokenizer, request.target_true)
        else:
            old_ids = [top1]
        new_ids = continuation_ids(tokenizer, request.target_new)

        attributions = [neuron_attributions(
            model, tokenizer, text, old_ids, layers=layers, steps=hp.steps,
            batch_size=hp.batch_size, riemann=hp.riemann, tokens=hp.attribution_tokens,
            layout=layout) for text in prompts]  # each (L, d_ff)
        neurons, coarse = select_neurons(attributions, layers,
                                         adaptive_threshold=hp.adaptive_threshold,
                                         refine=hp.refine, p=hp.p)

        E = _embedding_matrix(model, layout, hp.embedding)  # (V, d)
        erase_id = top1 if hp.erase_token == "argmax" else old_ids[0]
        e_erase = E[erase_id].float()  # (d,)  E[o]
        e_update = E[new_ids].float().sum(0) if hp.update_tokens == "all" else (
            E[new_ids[0]].float())  # (d,)  E[o*]

        deltas: dict[str, LowRankDelta] = {}
        for layer in sorted({n[0] for n in neurons}):
            name = layout.name("mlp_out", layer)
            module = model.get_submodule(name)
            deltas[weight_param_name(name)] = kn_update(
                module, [i for lay, i in neurons if lay == layer], e_erase, e_update,
                erase_scale=hp.erase_scale, update_scale=hp.update_scale,
                scale_by_value_norm=hp.scale_by_value_norm)
        if not neurons:
            warnings.warn(f"KN selected no neuron for {request.text!r} -> {request.target_new!r}; "
                          "the patch is empty", stacklevel=2)
        self.last_results.append({
            "case_id": request.case_id, "neurons": neurons,
            "coarse": coarse, "prompts": prompts,
            "max_attribution": [float(A.max()) for A in attributions],
            "attributed_ids": old_ids, "erase_id": erase_id, "update_ids": new_ids,
        })
        return WeightPatch.from_model(model, deltas, method="kn", hparams=hp.to_dict(),
                                      requests=[request])

    @in_eval_mode
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
             requests: EditRequest | dict[str, Any] | Sequence[EditRequest | dict[str, Any]],
             *, extra_prompts: Sequence[str] | Sequence[Sequence[str]] | None = None,
             apply: bool = False) -> WeightPatch:
        """Edit one or many requests, one after another (each attributed on the model edited by
        the previous ones), and return their composed patch.

        Args:
            extra_prompts: paraphrase prompts for the attribution and the refining step: a list
                of prompts (one request) or one list per request. Each is a template with ``{}``
                or a full text.
            apply: leave the edits applied (else the model ends exactly as it started).

        Raises:
            ValueError / SubjectNotFoundError: a bad request or ``extra_prompts`` (checked
                before any work).
            IndexError: a layer is out of range.
            FloatingPointError: NaN/inf in the activations, gradients or embeddings.
            In every error case, the model is left exactly as it was.
        """
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        reqs = as_requests(requests)
        layout = get_layout(model, self.layout_override)
        _layers(model, layout, self.hparams.layers)
        extras = _per_request_prompts(extra_prompts, len(reqs))
        for r in reqs:
            subject_span(tokenizer, r.prompt, r.subject)
            continuation_ids(tokenizer, r.target_new)
        check_requests(model, tokenizer, reqs)
        self.last_results = []
        with EditTransaction(model) as tx:
            for r, extra in zip(reqs, extras):
                tx.apply(self.edit_one(model, tokenizer, r, extra_prompts=extra))
            total = tx.composed()
            if apply:
                tx.commit()
        return total


def _per_request_prompts(extra: Sequence[str] | Sequence[Sequence[str]] | None,
                         n: int) -> list[list[str]]:
    if extra is None:
        return [[] for _ in range(n)]
    if isinstance(extra, str):
        raise TypeError("extra_prompts must be a list of prompts, not one string")
    items = list(extra)
    if not items:
        return [[] for _ in range(n)]
    if all(isinstance(e, str) for e in items):
        if n != 1:
            raise ValueError(f"extra_prompts is one list of prompts but there are {n} "
                             "requests: give one list per request")
        lists = [list(items)]
    else:
        if len(items) != n or any(isinstance(e, str) for e in items):
            raise ValueError(f"extra_prompts must be one list of prompts per request ({n}), "
                             f"got {len(items)} entries")
        lists = [list(e) for e in items]
    for lst in lists:
        for t in lst:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"an extra prompt is empty or not a string: {t!r}")
            if t.count("{}") > 1:
                raise ValueError(f"an extra prompt template has more than one '{{}}': {t!r}")
    return lists
