"""The published statistics loop (ROME's ``layer_stats`` with ``runningstats.SecondMoment``),
re-implemented for the benchmarks from reading the published code (kmeng01/rome,
``rome/layer_stats.py``, ``rome/tok_dataset.py``, ``util/runningstats.py``, ``util/nethook.py``).

What it does, step by step, as the published code does:

1. texts are read in groups of 100 (``layer_stats``' ``DataLoader`` ``batch_size``) and each is
   tokenized with ``tokenizer.encode(text, truncation=True, max_length=maxlen)``, where
   ``maxlen`` is ``n_positions`` (or ``batch_tokens`` when that is smaller); every item carries
   ``input_ids``, ``position_ids`` and an all-ones ``attention_mask``;
2. each group is collated by length (``length_collation(batch_tokens)``, ``batch_tokens =
   3 x n_positions`` by default): sorted longest first, empty texts dropped, a new sub-batch
   started whenever (the sub-batch's first width) x (rows + 1) would exceed ``batch_tokens``,
   each sub-batch right-padded with zeros (ids, positions and mask alike);
3. every sub-batch runs through the model with all three tensors, under a trace of the module
   (``Trace(model, layer, retain_input=True, retain_output=False, stop=True)``): a forward hook
   keeps the module's input and raises once the module has run, which ends the pass;
4. the real tokens' inputs are gathered through the mask (``flatten_masked_batch``: a
   ``nonzero`` index), cast to the precision (``float32`` in ROME's and MEMIT's hyperparameters,
   ``float64`` when ``layer_stats`` is called without one) and added to the running sum with
   ``mom2 += aᵀ a`` (``runningstats.SecondMoment.add``), in that precision; ``C = mom2 / n``.

What differs: the published code samples 100,000 texts of Wikipedia (or WikiText-103) with a
fixed seed, tokenizes them in two ``DataLoader`` worker processes and runs on CUDA; here the
texts are the ones given, in their order, tokenized in the calling process (as the package
also does), on the model's device. Neither changes the arithmetic of a batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PUBLISHED_GROUP", "published_batches", "published_compute_v", "published_memit",
           "published_rome_edit",
           "published_second_moment"]

PUBLISHED_GROUP = 100
"""``layer_stats``' ``DataLoader`` batch size: the texts that are sorted and collated together."""


class _Stopped(Exception):
    """How the trace ends the pass (raised from the forward hook, after the module ran)."""


def published_batches(ids: list[list[int]], batch_tokens: int) -> list[dict[str, Tensor]]:
    """One group's sub-batches by the published length collation (step 2 above): ``input_ids``,
    ``position_ids`` and ``attention_mask``, each ``(B, T)``, right-padded with zeros."""
    order = sorted(ids, key=len, reverse=True)  # a stable sort, longest first
    groups: list[list[list[int]]] = []
    rows: list[list[int]] = []
    width = 0
    for r in order:
        if not r:  # sorted: only empty texts follow
            break
        if width * (len(rows) + 1) > batch_tokens:
            groups.append(rows)
            rows, width = [], 0
        if not rows:
            width = len(r)
        rows.append(r)
    if rows:
        groups.append(rows)
    out = []
    for g in groups:
        T = len(g[0])
        input_ids = torch.zeros(len(g), T, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(g), T, dtype=torch.long)  # (B, T)
        positions = torch.zeros(len(g), T, dtype=torch.long)  # (B, T)
        for i, r in enumerate(g):
            input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
            positions[i, :len(r)] = torch.arange(len(r))
        out.append({"input_ids": input_ids, "position_ids": positions, "attention_mask": mask})
    return out


@torch.no_grad()
def published_second_moment(model: nn.Module, tokenizer: Any, texts: list[str],
                            module_name: str, *, precision: torch.dtype = torch.float32,
                            batch_tokens: int | None = None) -> dict[str, Any]:
    """``C = E[k kᵀ]`` of ``module_name``'s input over ``texts``, the published way.

    Returns:
        ``{"C": (d, d) in precision, "count": real tokens, "padded": padded tokens run}``.
    """
    device = next(model.parameters()).device
    npos = int(model.config.n_positions)
    maxlen = npos if batch_tokens is None or batch_tokens >= npos else batch_tokens
    token_size = 3 * npos if batch_tokens is None else batch_tokens
    module = model.get_submodule(module_name)
    mom2: Tensor | None = None
    count = padded = 0
    for g in range(0, len(texts), PUBLISHED_GROUP):
        ids = [tokenizer.encode(t, truncation=True, max_length=maxlen)
               for t in texts[g:g + PUBLISHED_GROUP]]
        for batch in published_batches(ids, token_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            kept: dict[str, Tensor] = {}

            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any,
                     kept: dict[str, Tensor] = kept) -> None:
                kept["input"] = inputs[0]
                raise _Stopped

            handle = module.register_forward_hook(hook)
            try:
                model(**batch)
            except _Stopped:
                pass
            finally:
                handle.remove()
            padded += batch["input_ids"].numel()
            x = kept["input"]  # (B, T, d)
            flat = x.reshape(-1, x.shape[-1])  # (B*T, d)
            a = flat[batch["attention_mask"].reshape(-1).nonzero()[:, 0]]  # (n, d)
            a = a.to(dtype=precision)  # (n, d)
            if a.shape[0] == 0:
                continue
            if mom2 is None:
                mom2 = a.new_zeros(a.shape[1], a.shape[1])  # (d, d)
            count += int(a.shape[0])
            mom2 += a.t().mm(a)  # (d, d)
    if mom2 is None:
        raise ValueError("the texts gave no tokens")
    return {"C": mom2 / count, "count": count, "padded": padded}


# ---------------------------------------------------------------------------------------------
# ROME's value optimisation (``compute_v``), the published way


def published_compute_v(model: nn.Module, tokenizer: Any, request: Any, module_name: str,
                        contexts: list[str], *, steps: int = 20, lr: float = 0.5,
                        weight_decay: float = 0.5, kl_factor: float = 0.0625,
                        clamp_norm_factor: float = 4.0, early_stop_loss: float = 0.05,
                        fact_token: str = "subject_last") -> dict[str, Any]:
    """ROME's v* for one request as the published ``compute_v`` (kmeng01/rome,
    ``rome/compute_v.py``) computes it, re-implemented for the benchmarks:

    1. one padded batch (right padding) of every context template filled with the prompt and
       the target's tokens but its last (teacher forcing), followed by the essence prompt
       ``"{} is a"``; the lookup index of each row is the subject's fact token;
    2. every step runs the **whole model on the whole batch**, with a forward hook on the
       module that adds δ to its output at each row's lookup index (the first pass's value at
       the first row's lookup token is ``v_init``), and takes the **log-softmax of the logits at
       every position** of every row; the loss is the mean over the rewriting rows of each
       row's summed target log-probabilities divided by the target length, plus
       ``kl_factor · KL(new ‖ initial)`` of the essence row at its lookup token, plus
       ``weight_decay · ‖δ‖ / ‖v_init‖²``;
    3. it stops when the loss is below ``early_stop_loss`` or at the last step (no gradient
       step after the last loss), else Adam steps and ``‖δ‖`` is clamped to
       ``clamp_norm_factor · ‖v_init‖``.

    The rows and lookup indices are built with the package's tokenizer helpers, so that both
    sides see the same tokens; what is timed is the published loop.

    Returns:
        ``{"v_star": (d,), "v_init": (d,), "losses": [...], "steps": n}``.
    """
    import torch.nn.functional as F

    from lightning_rome.editing.context import wrap
    from lightning_rome.scoring import teacher_forced_rows
    from lightning_rome.tokens import continuation_ids, encode_prompt, fact_token_index, fill

    device = next(model.parameters()).device
    target = continuation_ids(tokenizer, request.target_new)
    prompts, lookups = [], []
    for c in contexts:
        tpl = wrap(c, request.prompt)
        prompts.append(encode_prompt(tokenizer, fill(tpl, request.subject)[0]))
        lookups.append(fact_token_index(tokenizer, tpl, request.subject, fact_token))
    prompts.append(encode_prompt(tokenizer, fill("{} is a", request.subject)[0]))
    lookups.append(fact_token_index(tokenizer, "{} is a", request.subject, fact_token))
    n_rw = len(contexts)
    tf = teacher_forced_rows(tokenizer, prompts, [target] * n_rw + [[]], side="right",
                             device=device)
    batch = tf.batch
    R, T = batch.input_ids.shape
    labels = torch.full((n_rw, T), -100, dtype=torch.long, device=device)  # (n_rw, T)
    for i in range(n_rw):
        for j, p in enumerate(tf.predict_index[i].tolist()):
            if bool(tf.target_mask[i, j]):
                labels[i, p] = target[j]
    look = torch.tensor(lookups, device=device)  # (R,)
    module = model.get_submodule(module_name)
    d = int(model.config.hidden_size)
    delta = torch.zeros(d, device=device, requires_grad=True)
    state: dict[str, Tensor] = {}

    def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out  # a block returns a tuple
        if "v_init" not in state:
            state["v_init"] = h[0, look[0]].detach().clone()
        h = h.clone()
        h[torch.arange(R, device=device), look] += delta.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    opt = torch.optim.Adam([delta], lr=lr)
    losses: list[float] = []
    handle = module.register_forward_hook(hook)
    try:
        for it in range(steps):
            opt.zero_grad()
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits  # (R, T, V)
            kl_logp = F.log_softmax(logits[n_rw, look[n_rw]][None].float(), -1)  # (1, V)
            if "kl_init" not in state:
                state["kl_init"] = kl_logp.detach().clone()
            logp = F.log_softmax(logits[:n_rw].float(), -1)  # (n_rw, T, V): every position
            mask = labels != -100
            tok = logp.gather(2, labels.clamp(min=0)[..., None])[..., 0]  # (n_rw, T)
            nll = (-(tok * mask).sum(1) / len(target)).mean()
            kl = kl_factor * F.kl_div(state["kl_init"], kl_logp, log_target=True,
                                      reduction="batchmean")
            wd = weight_decay * (delta.norm() / state["v_init"].norm() ** 2)
            loss = nll + kl + wd
            losses.append(float(loss.detach()))
            if losses[-1] < early_stop_loss or it == steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = clamp_norm_factor * state["v_init"].norm()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return {"v_star": (state["v_init"] + delta).detach(), "v_init": state["v_init"],
            "losses": losses, "steps": len(losses)}


# ---------------------------------------------------------------------------------------------
# MEMIT (``execute_memit``), the published way


def _published_read(model: nn.Module, tokenizer: Any, module_name: str, texts: list[str],
                    subjects: list[str]) -> tuple[Tensor, Tensor]:
    """``get_module_input_output_at_words``: the module's input and output at each text's fact
    token, ``(n, d_in)`` and ``(n, d_out)``, from one padded pass of the **whole** model (logits
    included)."""
    from lightning_rome.scoring import make_batch
    from lightning_rome.tokens import encode_prompt, fact_token_index, fill

    device = next(model.parameters()).device
    filled = [fill(x, s)[0] for x, s in zip(texts, subjects)]
    look = torch.tensor([fact_token_index(tokenizer, x, s, "subject_last")
                         for x, s in zip(texts, subjects)], device=device)
    batch = make_batch(tokenizer, [encode_prompt(tokenizer, x) for x in filled], "right", device)
    kept: dict[str, Tensor] = {}

    def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        kept["in"] = inputs[0]
        kept["out"] = out[0] if isinstance(out, tuple) else out

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids)
    finally:
        handle.remove()
    rows = torch.arange(len(texts), device=device)
    return kept["in"][rows, look].float(), kept["out"][rows, look].float()


def published_memit(model: nn.Module, tokenizer: Any, requests: list[Any], layers: list[int],
                    layout: Any, contexts: list[str], Cs: dict[str, Tensor], lam: float, *,
                    steps: int = 20, clamp_norm_factor: float = 0.75, **z_kwargs: Any,
                    ) -> dict[str, Tensor]:
    """MEMIT's ``execute_memit`` (kmeng01/memit, ``memit/memit_main.py``), re-implemented for the
    benchmarks: each request's ``z`` by the ``compute_z`` loop **one request at a time** (the
    loop of :func:`published_compute_v` at the last layer's block output), then for each layer
    of R, in order, on the model edited so far: the keys (context-averaged inputs of the
    layer's ``W_out``) and the current ``h_L`` each from a pass of the whole model, the dense
    solve ``(λC + KKᵀ)⁻¹K`` in float64, and the update written into the weights. The weights
    are restored before returning.

    Returns:
        ``{parameter name: ΔW (d_out, d_in)}``, float64.
    """
    from lightning_rome.editing.context import wrap
    from lightning_rome.models import canonical_weight

    block = layout.block(layers[-1])
    zs = torch.stack([published_compute_v(model, tokenizer, r, block, contexts, steps=steps,
                                          clamp_norm_factor=clamp_norm_factor,
                                          **z_kwargs)["v_star"] for r in requests], 1)  # (d, u)
    saved: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}
    try:
        for i, layer in enumerate(layers):
            name = layout.name("mlp_out", layer)
            texts = [wrap(c, r.prompt) for r in requests for c in contexts]
            subs = [r.subject for r in requests for _ in contexts]
            ks = _published_read(model, tokenizer, name, texts, subs)[0]  # (u·n_ctx, d_in)
            K = ks.view(len(requests), len(contexts), -1).mean(1).T.double()  # (d_in, u)
            h = _published_read(model, tokenizer, block, [r.prompt for r in requests],
                                [r.subject for r in requests])[1].T  # (d, u)
            R = (zs.to(h) - h).double() / (len(layers) - i)  # (d, u)
            C = Cs[name].double()
            adj = torch.linalg.solve(lam * C + K @ K.T, K)  # (d_in, u)
            dW = R @ adj.T  # (d_out, d_in)
            module = model.get_submodule(name)
            w = module.weight
            if name not in saved:
                saved[name] = w.detach().clone()
            with torch.no_grad():  # the [out, in] view (GPT-2's Conv1D stores W transposed)
                canonical_weight(module).add_(dW.to(w.dtype))
            deltas[name + ".weight"] = dW
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)
    return deltas


def published_rome_edit(model: nn.Module, tokenizer: Any, request: Any, module_name: str,
                        contexts: list[str], C_inv: Tensor, **v_kwargs: Any) -> Tensor:
    """A whole ROME edit as the published code makes it (``rome/rome_main.py``,
    ``compute_u.py``, ``compute_v.py``), re-implemented for the benchmarks: the key ``k̄`` is
    the mean over the contexts of the module's input at the fact token, from one padded pass
    of the whole model; ``u = C⁻¹ k̄ / ‖C⁻¹ k̄‖`` with the inverse of C computed once and kept
    (``C_inv``, as the published cache of ``inv_mom2``); ``v*`` by
    :func:`published_compute_v`; then one more pass reads the bare prompt's key and value, and
    ``ΔW = (v* − W k_bare − b) uᵀ / (uᵀ k_bare)``.

    Returns:
        ``ΔW`` ``(d_out, d_in)``, float64.
    """
    from lightning_rome.editing.context import wrap

    texts = [wrap(c, request.prompt) for c in contexts]
    keys = _published_read(model, tokenizer, module_name, texts,
                           [request.subject] * len(texts))[0]  # (n_ctx, d_in)
    u = C_inv.to(keys.device, torch.float64) @ keys.mean(0).double()  # (d_in,)
    u = u / u.norm()
    v = published_compute_v(model, tokenizer, request, module_name, contexts, **v_kwargs)
    k_in, v_out = _published_read(model, tokenizer, module_name, [request.prompt],
                                  [request.subject])
    k_bare, v_bare = k_in[0].double(), v_out[0].double()  # (d_in,), (d_out,)
    right = (v["v_star"].double() - v_bare) / torch.dot(k_bare, u)  # (d_out,)
    return torch.outer(right, u)  # (d_out, d_in)
