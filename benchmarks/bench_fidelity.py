"""Fidelity check: our ROME (``key_mode="reference"``) and MEMIT against a re-derivation of the
published algorithms (kmeng01/rome ``compute_u`` / ``compute_v``, kmeng01/memit ``compute_z`` /
``compute_ks`` / ``execute_memit``), step by step, on the same inputs.

Usage::

    python -m benchmarks fidelity            # or: python -m benchmarks.bench_fidelity [--quick]

The re-derivation below is written from the published method only (ALGORITHMS.md §2-3), with
none of the package's editing code: keys and values are read with plain forward hooks, one
prompt at a time; each request's value is optimised alone (published: Adam, ``δ`` added at the
fact token of every rewriting prompt, loss = mean NLL + KL on ``"{} is a"`` + ``‖δ‖/‖v_init‖²``,
stop below ``early_stop_loss``, no step after the last loss, clamp ``‖δ‖``); then

* ROME: ``u = C⁻¹ k̄ / ‖C⁻¹ k̄‖`` (k̄: mean key over the templates), right vector
  ``(z − W k_bare − b) / (uᵀ k_bare)`` from the bare prompt's key, ``ΔW = right uᵀ``;
* MEMIT: for each layer in order, on the model edited so far: keys averaged within each template
  group then over the groups, ``R = (Z − h_L) / (layers left)``,
  ``ΔW = R (λC + KKᵀ)⁻¹ K``ᵀ, applied before the next layer.

Both run in float64 on the synthetic fact model, with the same requests, context templates and
C (a fixed random SPD matrix), so any difference above rounding is a difference of method.
Exit status 1 when a relative difference ``‖ΔW_ours − ΔW_published‖ / ‖ΔW_published‖`` exceeds
``--tol`` (default 1e-5).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LIGHTNING_ROME_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lightning_rome.requests import EditRequest  # noqa: E402
from lightning_rome.tokens import (  # noqa: E402
    continuation_ids,
    encode_prompt,
    fact_token_index,
    fill,
)

__all__ = ["check", "main", "published_memit", "published_rome", "published_z"]

#: The check's context templates, in MEMIT's published shape: the bare prompt as its own group,
#: then one group of generated-looking texts (ROME uses them flat, MEMIT grouped).
GROUPS = [["{}"], ["The day was long. {}", "Therefore, we left. {}", "I think so. {}"]]


# ----------------------------------------------------------------------------------------------
# The published algorithm, re-derived


def _weight(module: nn.Module) -> Tensor:
    """The ``[out, in]`` weight (GPT-2's Conv1D stores ``[in, out]``)."""
    W = module.weight
    return W.T if type(module).__name__ == "Conv1D" else W


def _io_at(model: nn.Module, tok: Any, module_name: str, template: str, subject: str,
           fact_token: str) -> tuple[Tensor, Tensor]:
    """The input and output of ``module_name`` at the fact token of one filled prompt."""
    idx = fact_token_index(tok, template, subject, fact_token)
    ids = torch.tensor([encode_prompt(tok, fill(template, subject)[0])])
    got: dict[str, Tensor] = {}

    def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Any) -> None:
        got["in"] = args[0][0, idx].detach().clone()
        got["out"] = (out[0] if isinstance(out, tuple) else out)[0, idx].detach().clone()

    h = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    return got["in"], got["out"]


def published_z(model: nn.Module, tok: Any, request: EditRequest, module_name: str,
                contexts: Sequence[str], hp: Any) -> Tensor:
    """One request's target value at ``module_name``'s output (ROME's v*, MEMIT's z), optimised
    alone: ``v_init + δ`` with v_init the value at the bare prompt (``contexts[0]``)."""
    target = continuation_ids(tok, request.target_new)
    prompts = [c.replace("{}", request.prompt) for c in contexts]
    rows = []  # (input ids (1, T), fact index, first target position)
    for p in prompts:
        ids = encode_prompt(tok, fill(p, request.subject)[0])
        rows.append((torch.tensor([ids + target[:-1]]),
                     fact_token_index(tok, p, request.subject, hp.fact_token), len(ids) - 1))
    kl_tpl = "{} is a"
    kl_ids = torch.tensor([encode_prompt(tok, fill(kl_tpl, request.subject)[0])])
    kl_idx = fact_token_index(tok, kl_tpl, request.subject, hp.fact_token)
    module = model.get_submodule(module_name)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)  # float32, as published

    def run(ids: Tensor, idx: int) -> tuple[Tensor, Tensor]:
        """Logits with δ added at ``idx``, and the unedited value there."""
        seen: dict[str, Tensor] = {}

        def hook(mod: nn.Module, args: Any, out: Any) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            seen["v"] = h[0, idx].detach().clone()
            h = h.clone()
            h[0, idx] = h[0, idx] + delta.to(h.dtype)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = module.register_forward_hook(hook)
        try:
            logits = model(input_ids=ids).logits[0]  # (T, V)
        finally:
            handle.remove()
        return logits, seen["v"]

    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        _, v_init = run(rows[0][0], rows[0][1])
        kl_init = torch.log_softmax(run(kl_ids, kl_idx)[0][kl_idx].double(), -1)  # (V,)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    for it in range(hp.v_num_grad_steps):
        nlls = []
        for ids, idx, first in rows:
            logits, _ = run(ids, idx)
            logp = torch.log_softmax(logits[first:first + len(target)].double(), -1)
            nlls.append(-logp[torch.arange(len(target)), torch.tensor(target)].mean())
        kl_logp = torch.log_softmax(run(kl_ids, kl_idx)[0][kl_idx].double(), -1)
        kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()
        loss = (torch.stack(nlls).mean() + hp.kl_factor * kl
                + hp.v_weight_decay * delta.double().norm() / v_init.double().norm() ** 2)
        if float(loss.detach()) < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * v_init.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    for p in model.parameters():
        p.requires_grad_(True)
    return (v_init + delta.detach().to(v_init.dtype)).double()


def published_rome(model: nn.Module, tok: Any, request: EditRequest, hp: Any, C: Tensor,
                   module_name: str) -> Tensor:
    """Published ROME's ``ΔW`` (``[out, in]``, float64) for one request."""
    contexts = [t for g in GROUPS for t in g]
    keys = [_io_at(model, tok, module_name, c.replace("{}", request.prompt), request.subject,
                   hp.fact_token)[0].double() for c in contexts]
    k_bar = torch.stack(keys).mean(0)  # (d_in,)
    u = torch.linalg.solve(C.double(), k_bar)
    u = u / u.norm()
    z = published_z(model, tok, request, module_name, contexts, hp)  # (d_out,)
    k_bare, v_bare = _io_at(model, tok, module_name, request.prompt, request.subject,
                            hp.fact_token)
    right = (z - v_bare.double()) / (u @ k_bare.double())  # v_bare = W k_bare + b
    return torch.outer(right, u)


def published_memit(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hp: Any,
                    C: Tensor, layout: Any) -> dict[str, Tensor]:
    """Published MEMIT's ``ΔW`` per edited ``mlp_out`` module (``[out, in]``, float64)."""
    model = copy.deepcopy(model)  # edited layer by layer
    z_block = layout.block(hp.layers[-1])
    contexts = [t for g in GROUPS for t in g]
    Z = torch.stack([published_z(model, tok, r, z_block, contexts, hp)
                     for r in requests], 1)  # (d, u)
    out: dict[str, Tensor] = {}
    for i, layer in enumerate(hp.layers):
        name = layout.name("mlp_out", layer)
        K = torch.stack([
            torch.stack([torch.stack([
                _io_at(model, tok, name, c.replace("{}", r.prompt), r.subject,
                       hp.fact_token)[0].double() for c in g]).mean(0) for g in GROUPS]).mean(0)
            for r in requests], 1)  # (d_in, u)
        H = torch.stack([_io_at(model, tok, z_block, r.prompt, r.subject, hp.fact_token)[1]
                         .double() for r in requests], 1)  # (d, u)
        resid = (Z - H) / (len(hp.layers) - i)
        adj = torch.linalg.solve(hp.mom2_update_weight * C.double() + K @ K.T, K)  # (d_in, u)
        upd = resid @ adj.T  # (d_out, d_in)
        out[name] = upd
        with torch.no_grad():
            w = model.get_submodule(name).weight
            w += (upd.T if type(model.get_submodule(name)).__name__ == "Conv1D" else upd).to(w)
    return out


# ----------------------------------------------------------------------------------------------
# The check


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check(n_requests: int = 3, tol: float = 1e-5, steps: int = 25,
          ) -> list[tuple[str, float, bool]]:
    """``(what, relative difference, within tol)`` for ROME per request and MEMIT per layer,
    with ``steps`` value-optimisation steps."""
    from lightning_rome.editing import MEMIT, ROME
    from lightning_rome.editing.memit import MEMITHyperParams
    from lightning_rome.editing.rome import ROMEHyperParams
    from lightning_rome.models import get_layout
    from lightning_rome.testing import get_fact_model

    fm = get_fact_model()
    model, tok = fm.model.double(), fm.tokenizer
    layout = get_layout(model)
    reqs = fm.edit_requests(n_requests, seed=1)
    d_ff = 4 * model.config.n_embd
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d_ff, 4 * d_ff, generator=g, dtype=torch.float64)
    C = A @ A.T / (4 * d_ff)  # (d_ff, d_ff) the same C for both sides

    rows: list[tuple[str, float, bool]] = []
    rhp = ROMEHyperParams.from_preset("fact-model", key_mode="reference", v_num_grad_steps=steps,
                                      context_templates=[t for grp in GROUPS for t in grp])
    rome = ROME(rhp, second_moment=lambda m, t, n: C)
    name = layout.name("mlp_out", rhp.layer)
    for r in reqs:
        ours = rome.edit(model, tok, [r]).dense(f"{name}.weight", torch.float64)
        ref = published_rome(model, tok, r, rhp, C, name)
        d = _rel(ours, ref)
        rows.append((f"ROME reference, {r.subject!r} -> {r.target_new!r}", d, d <= tol))

    mhp = MEMITHyperParams(layers=[0, 1], v_num_grad_steps=steps, clamp_norm_factor=4.0,
                           v_weight_decay=0.01, mom2_update_weight=100.0,
                           context_templates=GROUPS, key_average="groups")
    patch = MEMIT(mhp, second_moment=lambda m, t, n: C).edit(model, tok, reqs)
    ref = published_memit(model, tok, reqs, mhp, C, layout)
    for n, upd in ref.items():
        d = _rel(patch.dense(f"{n}.weight", torch.float64), upd)
        rows.append((f"MEMIT {len(reqs)} requests, {n}", d, d <= tol))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_fidelity",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=25, help="value-optimisation steps")
    ap.add_argument("--quick", action="store_true", help="one request, 8 steps")
    args, _ = ap.parse_known_args(argv)  # the suite passes its common options too
    torch.set_num_threads(1)
    rows = check(1 if args.quick else args.requests, args.tol, 8 if args.quick else args.steps)
    width = max(len(w) for w, _, _ in rows)
    print(f"Fidelity against the published algorithm (float64, tolerance {args.tol:g}):")
    for what, d, ok in rows:
        print(f"  {what:<{width}}  rel. diff {d:.2e}  {'ok' if ok else 'FAILED'}")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
