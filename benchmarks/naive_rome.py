"""A straightforward ROME, step by step as the paper describes it (ALGORITHMS.md §2).

For comparison in ``bench_rome.py`` only: it is what one writes when following the paper
literally, with none of the package's reuse. Per edit it

* regenerates the context templates (top-k sampling from the end-of-text token, recomputing the
  whole prefix for every new token, no KV cache);
* reads k* with one forward pass per context prompt;
* reads v_init with an extra forward pass on the bare prompt, and the unedited essence
  distribution with another;
* at every optimisation step runs one forward pass per rewrite prompt and a separate one for the
  essence prompt;
* inverts C with ``torch.linalg.inv``.

It computes the same update as :class:`lightning_rome.editing.rome.ROME` with
``key_mode="paper"`` (``Ŵ = W + Λ (C⁻¹k*)ᵀ``, ``Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)``), so the two
can be checked against each other on the same inputs. With ``v_mode="add"`` (the default), where
δ is added to each context's own value during the optimisation, the value written at k* is
``v* = W k* + b + δ``, as in the package; with ``"replace"`` it is ``v_init + δ``. Only the package's foundation is used
(``module_hooks``, subject spans and target tokenization), never its editing code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rome.editing.rome import ROMEHyperParams
from lightning_rome.hooks import module_hooks
from lightning_rome.models import canonical_weight, get_layout
from lightning_rome.requests import EditRequest
from lightning_rome.tokens import continuation_ids, encode_prompt, fact_token_index, fill

__all__ = ["NaiveROMEResult", "naive_context_templates", "naive_rome_edit"]


@dataclass
class NaiveROMEResult:
    """The naive edit's update and its intermediate vectors."""

    delta: Tensor  # (d_out, d_in) float32, ΔW in canonical [out, in] orientation
    k_star: Tensor  # (d_in,)
    v_star: Tensor  # (d_out,) the value written at k*
    z: Tensor  # (d_out,) the optimised value at the bare prompt, v_init + δ
    v_init: Tensor  # (d_out,)
    templates: list[str]
    steps: int
    losses: list[float]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def naive_context_templates(model: nn.Module, tokenizer, lengths=((5, 10), (10, 10)),
                            seed: int = 0) -> list[str]:
    """``"{}"`` plus ``count`` texts of ``length - 1`` tokens after the end-of-text token per
    ``(length, count)`` (the published ``max_out_len`` counts the start token), sampled with
    top-k = 5 from the end-of-text token, each followed by ``". {}"``. Every new token re-runs
    the whole prefix (no KV cache)."""
    device = _device(model)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
        tokenizer.eos_token_id)
    g = torch.Generator(device=device).manual_seed(seed)
    templates = ["{}"]
    for length, count in lengths:
        ids = torch.full((count, 1), int(start), dtype=torch.long, device=device)  # (n, 1)
        for _ in range(length - 1):  # length counts the start token (published max_out_len)
            logits = _forward(model, ids).logits[:, -1].float()  # (n, V)
            vals, idx = logits.topk(5, dim=-1)  # (n, 5)
            choice = torch.multinomial(F.softmax(vals, -1), 1, generator=g)  # (n, 1)
            ids = torch.cat([ids, idx.gather(-1, choice)], dim=1)  # (n, t + 1)
        for row in ids[:, 1:].tolist():
            text = tokenizer.decode(row)
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def _forward(model: nn.Module, ids: Tensor):
    """One unpadded forward pass (the all-ones mask only says so to transformers)."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _one_prompt(tokenizer, template: str, subject: str, fact_token: str,
                device: torch.device) -> tuple[Tensor, int, int]:
    """Token ids ``(1, T)`` of ``template`` filled with ``subject``, the fact token's index and
    the prompt's length."""
    ids = encode_prompt(tokenizer, fill(template, subject)[0])
    idx = fact_token_index(tokenizer, template, subject, fact_token)
    return torch.tensor([ids], device=device), idx, len(ids)


def naive_rome_edit(model: nn.Module, tokenizer, request: EditRequest,
                    hparams: ROMEHyperParams, C: Tensor, *,
                    contexts: list[str] | None = None) -> NaiveROMEResult:
    """One ROME edit, the paper's way. The model's weights are not modified.

    Args:
        model: a causal LM (eval mode).
        tokenizer: its tokenizer.
        request: the fact to write.
        hparams: ROME's hyperparameters (``layer``, ``fact_token``, the v* settings,
            ``context_template_lengths``, ``seed``, ``v_mode``).
        C: ``(d_in, d_in)`` the second moment of ``W_out``'s input.
        contexts: explicit templates (default: generated from the model, every call).

    Returns:
        The dense update and the intermediate k*, v*.
    """
    hp = hparams
    device = _device(model)
    name = (hp.rewrite_module.format(hp.layer) if hp.rewrite_module
            else get_layout(model).name("mlp_out", hp.layer))
    module = model.get_submodule(name)
    if contexts is None:
        contexts = (list(hp.context_templates) if hp.context_templates is not None else
                    naive_context_templates(model, tokenizer, hp.context_template_lengths,
                                            hp.seed))
    prompts = [c.replace("{}", request.prompt) for c in contexts]

    # Step 1: k*, one forward pass per context prompt.
    keys = []
    with torch.no_grad():
        for p in prompts:
            ids, idx, _ = _one_prompt(tokenizer, p, request.subject, hp.fact_token, device)
            with module_hooks(model, [name], retain_input=True) as rec:
                _forward(model, ids)
            keys.append(rec[name].input[0, idx].float())  # (d_in,)
    k_star = torch.stack(keys).mean(0)  # (d_in,)

    # Step 2: v*. v_init (bare prompt) and the unedited essence distribution, extra passes.
    essence = "{} is a"
    with torch.no_grad():
        ids, idx, _ = _one_prompt(tokenizer, request.prompt, request.subject, hp.fact_token,
                                  device)
        with module_hooks(model, [name], retain_output=True) as rec:
            _forward(model, ids)
        v_init = rec[name].output[0, idx].float()  # (d_out,)
        e_ids, e_idx, _ = _one_prompt(tokenizer, essence, request.subject, hp.fact_token, device)
        logits = _forward(model, e_ids).logits  # (1, T, V)
        logp_essence_init = F.log_softmax(logits[0, e_idx].float(), -1)  # (V,)

    target = continuation_ids(tokenizer, request.target_new)
    rows = []  # (ids (1, T), fact index, first target position)
    for p in prompts:
        ids, idx, n = _one_prompt(tokenizer, p, request.subject, hp.fact_token, device)
        full = torch.cat([ids, torch.tensor([target[:-1]], device=device,
                                            dtype=torch.long)], 1)  # (1, n + t - 1)
        rows.append((full, idx, n - 1))
    t_ids = torch.tensor(target, device=device)  # (t,)

    delta = torch.zeros_like(v_init, requires_grad=True)  # (d_out,)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * v_init.norm()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    steps = 0
    try:
        for step in range(hp.v_num_grad_steps):
            steps = step + 1

            def write(idx: int):
                def fn(x: Tensor, _: str) -> Tensor:  # x: (1, T, d_out)
                    x = x.clone()
                    new = x[0, idx] + delta if hp.v_mode == "add" else v_init + delta
                    x[0, idx] = new.to(x.dtype)
                    return x
                return fn

            nlls = []
            for full, idx, first in rows:  # one forward pass per rewrite prompt
                with module_hooks(model, [name], edit_output=write(idx)):
                    logits = _forward(model, full).logits  # (1, T, V)
                logp = F.log_softmax(logits[0, first:first + len(target)].float(), -1)  # (t, V)
                nlls.append(-logp[torch.arange(len(target)), t_ids].mean())
            with module_hooks(model, [name], edit_output=write(e_idx)):
                logits = _forward(model, e_ids).logits  # (1, T, V)
            logp_e = F.log_softmax(logits[0, e_idx].float(), -1)  # (V,)
            kl = (logp_e.exp() * (logp_e - logp_essence_init)).sum()  # KL(new ‖ orig)
            wd = delta.norm() / v_init.norm() ** 2
            loss = torch.stack(nlls).mean() + hp.kl_factor * kl + hp.v_weight_decay * wd
            losses.append(float(loss.detach()))
            if losses[-1] < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    v_star = (v_init + delta).detach()  # (d_out,)

    # Step 3: insert, with C inverted every edit.
    with torch.no_grad():
        C_inv = torch.linalg.inv(C.double().to(device))  # (d_in, d_in)
        u = C_inv @ k_star.double()  # (d_in,)  C⁻¹ k*
        W = canonical_weight(module).double()  # (d_out, d_in)
        v_now = W @ k_star.double()  # (d_out,)
        if getattr(module, "bias", None) is not None:
            v_now = v_now + module.bias.double()
        if hp.v_mode == "add":  # δ was added to each context's own value: write W k* + b + δ
            v_write = v_now + (v_star - v_init).double()  # (d_out,)
        else:  # the optimised value itself
            v_write = v_star.double()  # (d_out,)
        Lam = (v_write - v_now) / (u @ k_star.double())  # (d_out,)  Λ
        delta_W = torch.outer(Lam, u).float()  # (d_out, d_in)
    return NaiveROMEResult(delta=delta_W, k_star=k_star, v_star=v_write.float(), z=v_star,
                           v_init=v_init, templates=list(contexts), steps=steps, losses=losses)
