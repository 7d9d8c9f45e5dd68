"""Shared pieces of ROME and MEMIT: context templates, key reading, and the value optimisation."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.editing.suffix import SuffixRows, known_verdict, suffix_pass_agrees
from lightning_rome.hooks import module_hooks
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import make_batch, model_device, teacher_forced_rows
from lightning_rome.tokens import (
    FactToken,
    continuation_ids,
    encode_prompt,
    fact_token_index,
    fill,
)
from lightning_rome.utils.progress import progress_bar

__all__ = [
    "MEMIT_START_WORDS",
    "SecondMomentFn",
    "TemplateAverage",
    "ValueOptimisationError",
    "ValueResult",
    "as_template_groups",
    "check_start_words",
    "context_template_groups",
    "context_templates",
    "optimise_values",
    "read_at",
    "read_keys",
    "row_length",
    "second_moment",
    "template_weights",
    "wrap",
]

SecondMomentFn = Callable[[nn.Module, PreTrainedTokenizerBase, str], Tensor]
"""``(model, tokenizer, module_name) -> C``: the ``(d_in, d_in)`` uncentred second moment of the
module's input, E[k kᵀ]."""


def second_moment(model: nn.Module, tokenizer: PreTrainedTokenizerBase, module_name: str, *,
                  fn: SecondMomentFn | None = None, corpus: str = "wikitext",
                  n_samples: int = 100_000, dtype: str = "float32") -> Tensor:
    """C = E[k kᵀ] of ``module_name``'s input: from ``fn`` when given, else from the cached
    statistics of :mod:`lightning_rome.stats` over ``corpus``. Returns float64 ``(d_in, d_in)``."""
    if fn is not None:
        C = fn(model, tokenizer, module_name)
    else:
        from lightning_rome.models.loading import resolve_dtype
        from lightning_rome.stats import get_second_moment

        C = get_second_moment(model, tokenizer, module_name, corpus=corpus,
                              n_samples=n_samples, dtype=resolve_dtype(dtype)).mom2
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"second moment of {module_name!r} must be square, got {tuple(C.shape)}")
    if not bool(torch.isfinite(C).all()):
        raise FloatingPointError(f"second moment of {module_name!r} contains NaN or inf")
    return C.double()

_TEMPLATE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[str]]] = (
    weakref.WeakKeyDictionary())


class ValueOptimisationError(FloatingPointError):
    """The value optimisation produced NaN or inf (the model is left unchanged)."""


MEMIT_START_WORDS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
"""The start words of the published MEMIT code's generated context templates."""

TemplateAverage = Literal["templates", "groups"]
"""How keys are averaged over the context templates: ``"templates"`` weighs every template
equally (published ROME); ``"groups"`` averages within each group, then over the groups
(published MEMIT, where the bare ``"{}"`` is a group of its own and so weighs ``1 / n_groups``)."""


def _generate_group(model: nn.Module, tokenizer: PreTrainedTokenizerBase, length: int,
                    count: int, starts: Sequence[str] | None, g: torch.Generator) -> list[str]:
    """One group of ``count`` generated texts of ``length`` tokens (the start word's tokens
    included, as ``max_out_len`` of the published ``generate_fast``), top-k = 5."""
    from lightning_rome.scoring import generate

    if not starts:  # published ROME: from the end-of-text token, which is not in the text
        if length < 2:
            raise ValueError(f"a generated context template needs length >= 2, got {length}")
        texts = generate(model, tokenizer, [""] * count, max_new_tokens=length - 1, top_k=5,
                         generator=g)
    else:  # published MEMIT: count // len(starts) texts from each start word
        if count % len(starts):
            raise ValueError(f"context template count {count} is not a multiple of the "
                             f"{len(starts)} start words {list(starts)}")
        texts = []
        for s in starts:
            n_new = length - len(encode_prompt(tokenizer, s))
            if n_new < 1:
                raise ValueError(f"context template length {length} leaves no token to "
                                 f"generate after the start word {s!r}")
            texts += generate(model, tokenizer, [s] * (count // len(starts)),
                              max_new_tokens=n_new, top_k=5, generator=g)
    return [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]


def context_template_groups(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[Sequence[int]] = ((5, 10), (10, 10)),
    seed: int = 0,
    *,
    starts: Sequence[str] | None = None,
) -> list[list[str]]:
    """``[["{}"], group_1, ...]``: the bare prompt as its own group, then one group of ``count``
    texts of ``length`` tokens per ``(length, count)``, sampled from the model itself with
    top-k = 5, each followed by ``". {}"``.

    ``starts=None`` starts every text from the BOS/EOS token (published ROME,
    ``[[5, 10], [10, 10]]``); start words (published MEMIT: ``"The", "Therefore", "Because",
    "I", "You"`` with ``[[10, 5]]``) each start ``count / len(starts)`` texts, which include
    them. ``length`` counts the start's tokens, as the published ``max_out_len`` does.

    Generated once per model, lengths, start words and seed, and cached (editing many facts
    must not regenerate them). Braces in generated text are replaced by spaces so that
    templates keep exactly one ``{}``.
    """
    key = (tuple(tuple(int(v) for v in x) for x in lengths), seed,
           tuple(starts) if starts else None)
    cache = _TEMPLATE_CACHE.setdefault(model, {})
    if key not in cache:
        for x in lengths:
            if len(x) != 2 or int(x[1]) < 1:
                raise ValueError(f"context template lengths must be [length, count] pairs with "
                                 f"count >= 1, got {list(x)}")
        device = model_device(model)
        g = torch.Generator(device=device).manual_seed(seed)
        groups = [["{}"]]
        for length, count in lengths:
            groups.append(_generate_group(model, tokenizer, int(length), int(count), starts, g))
        cache[key] = groups
    return [list(grp) for grp in cache[key]]


def context_templates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[Sequence[int]] = ((5, 10), (10, 10)),
    seed: int = 0,
    *,
    starts: Sequence[str] | None = None,
) -> list[str]:
    """The templates of :func:`context_template_groups`, flattened (the bare ``"{}"`` first)."""
    return [t for grp in context_template_groups(model, tokenizer, lengths, seed, starts=starts)
            for t in grp]


def check_start_words(starts: Sequence[str] | None) -> None:
    """``context_template_starts``: ``None`` or a non-empty list of non-empty strings."""
    if starts is None:
        return
    if isinstance(starts, str) or not starts or not all(
            isinstance(s, str) and s.strip() for s in starts):
        raise ValueError("context_template_starts must be None or a non-empty list of "
                         f"non-empty strings, got {starts!r}")


def as_template_groups(templates: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """Explicit ``context_templates`` as groups: a flat list of strings is one group per
    template; a list of lists is taken as given. Each template must contain ``{}`` once."""
    if isinstance(templates, str) or not templates:
        raise ValueError(f"context_templates must be a non-empty list, got {templates!r}")
    flat = all(isinstance(t, str) for t in templates)
    groups = [[t] for t in templates] if flat else [list(g) for g in templates]  # type: ignore
    for grp in groups:
        if isinstance(grp, str) or not grp:
            raise ValueError("context_templates must be a list of strings or a list of "
                             f"non-empty lists of strings, got {templates!r}")
        for t in grp:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"context template must contain '{{}}' exactly once: {t!r}")
    return groups


def template_weights(groups: Sequence[Sequence[str]], average: TemplateAverage) -> Tensor:
    """Each template's weight in the key average, ``(n_ctx,)`` float64 summing to 1, in the
    order of the flattened groups (see :data:`TemplateAverage`)."""
    if average == "templates":
        n = sum(len(g) for g in groups)
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if average == "groups":
        return torch.cat([torch.full((len(g),), 1.0 / (len(g) * len(groups)),
                                     dtype=torch.float64) for g in groups])
    raise ValueError(f"key_average must be 'templates' or 'groups', got {average!r}")


def wrap(context: str, prompt: str) -> str:
    """Put a request prompt (with ``{}`` for the subject) into a context template's ``{}``."""
    if context.count("{}") != 1:
        raise ValueError(f"context template must contain '{{}}' exactly once: {context!r}")
    return context.replace("{}", prompt)


def row_length(tokenizer: PreTrainedTokenizerBase, request: EditRequest,
               fact_token: FactToken = "subject_last") -> int:
    """The tokens a request's rows of the value optimisation run each step: from its fact
    token to the end of its target (the suffix that follows every context template). Batches
    of requests sorted by it pad little."""
    n = len(encode_prompt(tokenizer, fill(request.prompt, request.subject)[0]))
    return (n - fact_token_index(tokenizer, request.prompt, request.subject, fact_token)
            + len(continuation_ids(tokenizer, request.target_new)))


def read_at(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    templates: Sequence[str],
    subjects: Sequence[str],
    fact_token: FactToken = "subject_last",
    *,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The inputs of the modules ``inputs`` and the outputs of ``outputs`` at the fact token of
    each ``templates[i]`` filled with ``subjects[i]``, from one padded forward pass that ends
    once the last of them has run (the layers above and the LM head are not run).

    Returns:
        ``({name: (n, d_in)}, {name: (n, d_out)})``, float32.
    """
    names = list(dict.fromkeys([*inputs, *outputs]))
    if not names:
        raise ValueError("read_at needs a module to read")
    texts = [fill(t, s)[0] for t, s in zip(templates, subjects)]
    idx = [fact_token_index(tokenizer, t, s, fact_token) for t, s in zip(templates, subjects)]
    batch = make_batch(tokenizer, [encode_prompt(tokenizer, x) for x in texts], "right",
                       model_device(model))
    rows = torch.arange(len(texts), device=batch.input_ids.device)
    pos = torch.as_tensor(idx, device=batch.input_ids.device)
    with torch.no_grad(), module_hooks(model, names, retain_input=bool(inputs),
                                       retain_output=bool(outputs), stop=True) as rec:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, use_cache=False)
    ins = {n: rec[n].input[rows, pos].float().detach() for n in inputs}  # (n, d_in)
    outs = {n: rec[n].output[rows, pos].float().detach() for n in outputs}  # (n, d_out)
    return ins, outs


def read_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module_name: str,
    templates: Sequence[str],
    subjects: Sequence[str],
    fact_token: FactToken = "subject_last",
    *,
    outputs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The input (and optionally the output) of ``module_name`` at the fact token of each
    ``templates[i]`` filled with ``subjects[i]`` (:func:`read_at`).

    Returns:
        keys ``(n, d_in)`` and, if ``outputs``, values ``(n, d_out)``; float32.
    """
    ins, outs = read_at(model, tokenizer, templates, subjects, fact_token, inputs=[module_name],
                        outputs=[module_name] if outputs else [])
    return ins[module_name], outs.get(module_name)


@dataclass
class ValueResult:
    """The outcome of optimising target values for a batch of requests."""

    v_star: Tensor  # (n, d) the optimised values (v_init + δ)
    v_init: Tensor  # (n, d) the module's value at the bare prompt's lookup token
    losses: list[float]  # total loss per step (summed over requests)
    steps: int  # steps run (the most of any request)
    steps_each: list[int] = field(default_factory=list)  # steps each request ran until it stopped
    loss_each: list[float] = field(default_factory=list)  # each request's loss at its last step


def optimise_values(model: nn.Module, *args: object, **kwargs: object) -> ValueResult:
    """See :func:`_optimise_values`; runs it with gradients on and outside inference mode, so
    that it works from any Lightning hook (validation and test run under inference mode)."""
    with torch.enable_grad(), torch.inference_mode(False):
        return _optimise_values(model, *args, **kwargs)  # type: ignore[arg-type]


def _optimise_values(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module_name: str,
    contexts: Sequence[str],
    *,
    fact_token: FactToken = "subject_last",
    num_steps: int = 20,
    lr: float = 0.5,
    weight_decay: float = 0.5,
    kl_factor: float = 0.0625,
    clamp_norm_factor: float = 4.0,
    early_stop_loss: float = 0.05,
    mode: Literal["add", "replace"] = "add",
    essence_template: str = "{} is a",
    engine: Literal["auto", "suffix", "full"] = "auto",
) -> ValueResult:
    """Optimise, for each request, a vector ``v = v_init + δ`` at the output of ``module_name``
    (ROME: the MLP's ``W_out`` at layer l*; MEMIT: the block output at the last edited layer)
    at the subject's fact token, so that the model predicts ``target_new``.

    The loss (ROME paper, eq. 4 and its published implementation) per request is::

        L(δ) = 1/N Σ_j −log P[o* | x_j + p]                        (mean over target tokens)
               + kl_factor · KL(P_new[· | p'] ‖ P_orig[· | p'])     (p' = "{subject} is a")
               + weight_decay · ‖δ‖ / ‖v_init‖²

    All contexts of all requests, and the essence prompts, run in one padded batch per step. Adam
    takes up to ``num_steps`` steps; the last step takes no gradient step; each request stops on its
    own once its loss is below ``early_stop_loss`` (its δ is frozen from then on, so its v* is
    what optimising it alone gives, whatever else shares the batch); after each step δ is clamped to norm
    ``clamp_norm_factor · ‖v_init‖``.

    ``mode="add"`` (the published code) adds δ to each context's own value at the fact token, which
    is what the rank-one update later does to keys near k*; ``mode="replace"`` (the paper's text)
    writes the same ``v`` into every context.

    ``engine``: ``"suffix"`` computes the tokens before each row's fact token once (they never
    see δ) and runs each step over the rest only (:mod:`lightning_rome.editing.suffix`);
    ``"full"`` runs every step over whole rows; ``"auto"`` (default) uses the suffix pass once
    it was found to give the full pass's numbers on this model (checked on its first call).

    Runs with gradients enabled and outside inference mode, so it works from any Lightning hook.
    The model's weights are not modified.

    Raises:
        ValueOptimisationError: the loss or δ became NaN/inf.
    """
    device = model_device(model)
    n = len(requests)
    targets = [continuation_ids(tokenizer, r.target_new) for r in requests]
    # Rows: for each request, one row per context (teacher-forced on its target), then one
    # essence (KL) row (the prompt alone).
    p_ids, t_ids, lookup, owner, is_kl = [], [], [], [], []
    for i, (r, t) in enumerate(zip(requests, targets)):
        for c in contexts:
            tpl = wrap(c, r.prompt)
            p_ids.append(encode_prompt(tokenizer, fill(tpl, r.subject)[0]))
            t_ids.append(t)
            lookup.append(fact_token_index(tokenizer, tpl, r.subject, fact_token))
            owner.append(i)
            is_kl.append(False)
        p_ids.append(encode_prompt(tokenizer, fill(essence_template, r.subject)[0]))
        t_ids.append([])
        lookup.append(fact_token_index(tokenizer, essence_template, r.subject, fact_token))
        owner.append(i)
        is_kl.append(True)
    tf = teacher_forced_rows(tokenizer, p_ids, t_ids, side="right", device=device)
    batch = tf.batch
    R = len(tf)
    rows = torch.arange(R, device=device)
    look = torch.as_tensor(lookup, device=device)  # (R,)
    own = torch.as_tensor(owner, device=device)  # (R,)
    kl_rows = torch.as_tensor([j for j in range(R) if is_kl[j]], device=device)  # (n,)
    nll_rows = [j for j in range(R) if not is_kl[j]]
    # Teacher-forced target positions and ids, padded to the longest target.
    nll_rows_t = torch.as_tensor(nll_rows, device=device)
    pos = tf.predict_index[nll_rows_t]  # (R_nll, L)
    ids = tf.target_ids[nll_rows_t]  # (R_nll, L)
    msk = tf.target_mask[nll_rows_t].float()  # (R_nll, L)
    nll_owner = own[nll_rows_t]  # (R_nll,)
    bare_rows = torch.as_tensor(
        [i * (len(contexts) + 1) + list(contexts).index("{}") if "{}" in contexts
         else i * (len(contexts) + 1) for i in range(n)], device=device)  # (n,)

    # Only the real target positions (not the padding of the shorter targets, which the loss
    # masks out) and the essence prompts' lookup positions are scored: the LM head and the
    # log-softmax run on those G rows, not on every position of the batch.
    real_flat = (msk.reshape(-1) > 0).nonzero()[:, 0]  # (G_nll,) in the (R_nll · L) layout
    G_nll = int(real_flat.numel())
    g_rows = torch.cat([nll_rows_t[:, None].expand_as(pos).reshape(-1)[real_flat],
                        kl_rows])  # (G,)
    g_pos = torch.cat([pos.reshape(-1)[real_flat], look[kl_rows]])  # (G,)
    g_ids = ids.reshape(-1)[real_flat]  # (G_nll,) the target token scored at each
    body, head = model.base_model, model.get_output_embeddings()
    if body is model or head is None:
        raise TypeError(f"{type(model).__name__} has no separate base model and LM head")
    if engine not in ("auto", "suffix", "full"):
        raise ValueError(f"engine must be 'auto', 'suffix' or 'full', got {engine!r}")

    # The suffix pass (see lightning_rome.editing.suffix): the prefixes before the lookup
    # tokens run once; a step runs the rest. "auto" checks it against the full pass once per
    # model (at δ = 0, below) and keeps the full pass if they disagree or it fails.
    zero = torch.zeros_like(look)  # (R,) the lookup token is each suffix's first
    g_pos_s = g_pos - look[g_rows]  # (G,) scored positions within the suffixes
    splittable = not bool((g_pos_s < 0).any())  # no target before its row's fact token
    if engine == "suffix" and not splittable:
        raise ValueError("engine='suffix' needs every scored position at or after its row's "
                         "fact token (a target token comes before it here); use 'auto' or 'full'")
    suffix: SuffixRows | None = None
    verdict = known_verdict(model)
    if splittable and (engine == "suffix" or (engine == "auto" and verdict is not False)):
        try:
            with torch.no_grad():
                suffix = SuffixRows.build(body, batch.input_ids, batch.attention_mask,
                                          batch.position_ids, look)
        except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError):
            if engine == "suffix":
                raise
            suffix_pass_agrees(model, (), None)
            verdict = False
    use_suffix = suffix is not None and (engine == "suffix" or verdict is True)
    probe = suffix is not None and not use_suffix  # "auto" on a model not yet checked

    def scored_logp(edit: Callable[[Tensor], Callable[[Tensor, str], Tensor]] | None,
                    retain: bool = False, on_suffix: bool = False,
                    ) -> tuple[Tensor, Tensor | None]:
        """Log-probabilities at the scored positions ``(G, V)`` with ``edit`` (given the lookup
        positions) applied at the module, and (if ``retain``) the module's output at the lookup
        tokens ``(R, d)``; over whole rows, or (``on_suffix``) over the suffixes."""
        at = zero if on_suffix else look
        with module_hooks(model, [module_name], retain_output=retain,
                          edit_output=edit(at) if edit is not None else None) as rec:
            if on_suffix:
                hidden = suffix.hidden(body)  # type: ignore[union-attr]  # (R, S, d)
            else:
                hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False)[0]  # (R, T, d)
        vals = rec[module_name].output[rows, at].detach().float() if retain else None
        scored = hidden[g_rows, g_pos_s if on_suffix else g_pos]  # (G, d)
        return F.log_softmax(head(scored).float(), -1), vals

    def checked_start(edit: Callable[[Tensor], Callable[[Tensor, str], Tensor]] | None,
                      ) -> tuple[Tensor, Tensor | None]:
        """The unedited (δ = 0) pass. On a model not yet checked, both passes run and are
        compared; the suffix pass's result is used when they agree, so that every call computes
        with the same pass from its first step on (the first call's v* equals a later one's)."""
        nonlocal use_suffix
        if not probe:
            return scored_logp(edit, retain=True, on_suffix=use_suffix)
        full = scored_logp(edit, retain=True, on_suffix=False)
        try:
            other: tuple[Tensor, Tensor | None] | None = scored_logp(edit, retain=True,
                                                                     on_suffix=True)
        except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError):
            other = None
        use_suffix = suffix_pass_agrees(
            model, (full[0].detach(), full[1]),  # type: ignore[arg-type]
            None if other is None else (other[0].detach(), other[1]))  # type: ignore[arg-type]
        return other if use_suffix and other is not None else full

    d_model = int(model.config.hidden_size)
    delta = torch.zeros((n, d_model), device=device, requires_grad=True)  # (n, d)

    def edit(at: Tensor) -> Callable[[Tensor, str], Tensor]:
        """The edit of the module's output at positions ``at`` ``(R,)`` of each row."""

        def apply(x: Tensor, name: str) -> Tensor:  # x: (R, T, d)
            x = x.clone()
            if mode == "add":
                new = x[rows, at] + delta[own].to(x.dtype)  # (R, d)
            else:
                new = (v_init + delta)[own].to(x.dtype)  # (R, d)
            x[rows, at] = new
            return x

        return apply

    def start(logp: Tensor, vals: Tensor) -> None:
        """v_init (the value at each bare prompt) and the unedited essence distribution."""
        nonlocal v_init, kl_logp_init, max_norm
        v_init = vals[bare_rows]  # (n, d)
        kl_logp_init = logp[G_nll:].detach()  # (n, V)
        max_norm = clamp_norm_factor * v_init.norm(dim=-1)  # (n,)

    v_init = kl_logp_init = max_norm = torch.empty(0)
    if mode == "replace":  # the unedited values are needed before the first edited pass
        with torch.no_grad():
            start(*checked_start(None))  # type: ignore[arg-type]
    opt = torch.optim.Adam([delta], lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    steps = 0
    bar = progress_bar(num_steps, f"optimising v for {n} edit(s)", unit="step")
    # Each request stops on its own, as the published code (which optimises one request at a
    # time) does: once its loss is below early_stop_loss its δ is frozen, so a request's v* does
    # not depend on the other requests of its batch.
    active = torch.ones(n, dtype=torch.bool, device=device)  # (n,)
    steps_each = [num_steps] * n
    last_loss = torch.zeros(n, device=device)  # (n,) each request's loss at its last step
    try:
        for step in range(num_steps):
            steps = step + 1
            bar.update()
            last = step == num_steps - 1
            if step == 0 and mode == "add":
                # δ = 0: step 0's pass is the unedited pass, so it also gives v_init and the
                # essence baseline (no separate forward pass for them).
                logp, vals = checked_start(edit)
                start(logp, vals)  # type: ignore[arg-type]
            else:
                logp, _ = scored_logp(edit, on_suffix=use_suffix)  # (G, V)
            tok_real = logp[:G_nll].gather(-1, g_ids[:, None])[:, 0]  # (G_nll,)
            tok_logp = tok_real.new_zeros(pos.numel()).index_put(
                (real_flat,), tok_real).view(pos.shape)  # (R_nll, L), 0 past each target
            nll_each = -(tok_logp * msk).sum(1) / msk.sum(1)  # (R_nll,)
            nll = torch.zeros(n, device=device).index_add(0, nll_owner, nll_each)
            nll = nll / torch.bincount(nll_owner, minlength=n).float()  # (n,)
            kl_logp = logp[G_nll:]  # (n, V)
            kl = (kl_logp.exp() * (kl_logp - kl_logp_init)).sum(-1)  # (n,) KL(new ‖ orig)
            wd = delta.norm(dim=-1) / v_init.norm(dim=-1).pow(2)  # (n,)
            loss_each = nll + kl_factor * kl + weight_decay * wd  # (n,)
            loss = loss_each.sum()
            if not bool(torch.isfinite(loss)):
                raise ValueOptimisationError(
                    f"value optimisation at {module_name!r} produced a non-finite loss at "
                    f"step {step} (NLL {nll.tolist()}, KL {kl.tolist()}); the model was not "
                    "modified")
            losses.append(float(loss.detach()))
            last_loss = torch.where(active, loss_each.detach(), last_loss)  # (n,)
            stop = active & (loss_each.detach() < early_stop_loss)  # (n,) stop at this step
            for i in stop.nonzero()[:, 0].tolist():
                steps_each[i] = steps
            active = active & ~stop
            if last or not bool(active.any()):
                break
            opt.zero_grad()
            loss_each[active].sum().backward()
            frozen_delta = delta.detach()[~active].clone()  # (n_done, d)
            opt.step()
            with torch.no_grad():  # clamp ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖
                norm = delta.norm(dim=-1)
                scale = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
                delta.mul_(scale[:, None])
                delta[~active] = frozen_delta  # Adam's momentum must not move stopped ones
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
    v_star = (v_init + delta).detach()  # (n, d)
    if not bool(torch.isfinite(v_star).all()):
        raise ValueOptimisationError(f"value optimisation at {module_name!r} produced NaN/inf")
    return ValueResult(v_star=v_star, v_init=v_init.detach(), losses=losses, steps=steps,
                       steps_each=steps_each, loss_each=last_loss.tolist())
