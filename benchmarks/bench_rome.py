"""Benchmark: ROME edit latency, profiled part by part, against a naive implementation.

The fast path is :class:`lightning_rome.editing.rome.ROME` with the second moment C passed
through ``second_moment=`` (a random positive-definite matrix, so statistics are not part of the
edit; a one-off statistics timing is reported separately). The naive path is
``benchmarks/naive_rome.py``: the paper step by step (templates regenerated every edit, one
forward pass per prompt, C inverted every edit). Both run in the same process on the same
request; the script checks that they produce the same update before it reports the speed-up.

Usage::

    python -m benchmarks.bench_rome                 # GPT-2 small (random weights), 5 runs
    python -m benchmarks.bench_rome --quick         # scaled-down GPT-2, small workload
    python -m benchmarks.bench_rome --steps 20 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    BenchModel,
    PeakMemory,
    Settings,
    add_common_args,
    build_model,
    fact_model_or_none,
    fmt_bytes,
    fmt_s,
    machine_line,
    print_table,
    random_second_moment,
    section,
    settings_from_args,
    sync,
    time_interleaved,
    write_json,
)
from benchmarks.naive_rome import naive_rome_edit
from lightning_rome.editing.context import context_templates
from lightning_rome.editing.rome import ROME, ROMEHyperParams, compute_key, compute_value, insert
from lightning_rome.models import canonical_weight, get_layout
from lightning_rome.models.weights import weight_param_name
from lightning_rome.patches import WeightPatch
from lightning_rome.requests import EditRequest

REQUEST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English",
                      target_true="French")


# --------------------------------------------------------------------------------------------
# Instrumentation: time every forward pass of the model and every backward call
# --------------------------------------------------------------------------------------------


class PassTimer:
    """Accumulates the wall time of the model's forward passes and of ``Tensor.backward`` calls
    while active (benchmark-only instrumentation: it wraps ``model.forward`` and
    ``torch.Tensor.backward`` and restores both on exit)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.forward_s = self.backward_s = 0.0
        self.n_forward = self.n_backward = 0

    @contextmanager
    def active(self) -> Iterator[PassTimer]:
        model, device = self.model, self.device
        orig_forward, orig_backward = model.forward, torch.Tensor.backward

        def forward(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            t0 = time.perf_counter()
            try:  # a pass cut short by an exception from a hook counts too
                return orig_forward(*args, **kwargs)
            finally:
                sync(device)
                self.forward_s += time.perf_counter() - t0
                self.n_forward += 1

        def backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            sync(device)
            t0 = time.perf_counter()
            out = orig_backward(tensor, *args, **kwargs)
            sync(device)
            self.backward_s += time.perf_counter() - t0
            self.n_backward += 1
            return out

        model.forward = forward  # instance attribute shadows the class method
        torch.Tensor.backward = backward  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del model.forward
            torch.Tensor.backward = orig_backward  # type: ignore[method-assign]


def _timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _hparams(bm: BenchModel, s: Settings, steps: int, layer: int | None) -> ROMEHyperParams:
    if layer is None:
        layer = {"gpt2-small": 5, "gpt2-mini": 1, "tiny": 0, "fact": 1}.get(bm.name, 0)
    lengths = [[5, 10], [10, 10]] if not s.quick else [[5, 3]]
    if bm.name == "tiny":
        lengths = [[3, 2]]
    # early_stop_loss=0: the random-weight models never reach the published 0.05, and the fact
    # model sometimes does; without early stopping every run takes the same number of steps.
    # key_mode="paper": the naive ROME of naive_rome.py follows the paper's formula.
    return ROMEHyperParams(layer=layer, v_num_grad_steps=steps, context_template_lengths=lengths,
                           clamp_norm_factor=4.0, early_stop_loss=0.0, seed=s.seed,
                           key_mode="paper")


def profile_edit(bm: BenchModel, hp: ROMEHyperParams, C: torch.Tensor, request: EditRequest,
                 s: Settings) -> tuple[list[list[str]], dict[str, float]]:
    """One edit, part by part, in the order :meth:`ROME.edit_one` runs them; steady state
    (templates cached, Cholesky factor cached) plus the one-off first-call costs."""
    model, tok, dev = bm.model, bm.tokenizer, s.device
    name = get_layout(model).name("mlp_out", hp.layer)
    lengths = hp.context_template_lengths
    t_tpl_first, _ = _timed(lambda: context_templates(model, tok, lengths, hp.seed + 7919), dev)
    t_tpl_cached, contexts = _timed(lambda: context_templates(model, tok, lengths, hp.seed), dev)
    rome = ROME(hp, second_moment=lambda m, t, n: C)
    timer = PassTimer(model, dev)
    with timer.active():
        t_key, k_star = _timed(lambda: compute_key(model, tok, request, hp, contexts=contexts),
                               dev)
    key_passes = timer.n_forward
    t_chol, _ = _timed(lambda: rome.C_inv_times(model, tok, name, k_star), dev)
    t_solve, u = _timed(lambda: rome.C_inv_times(model, tok, name, k_star), dev)
    timer = PassTimer(model, dev)
    with timer.active():
        t_value, res = _timed(lambda: compute_value(model, tok, request, hp, contexts=contexts),
                              dev)
    module = model.get_submodule(name)

    def value_and_insert() -> Any:  # as ROME.edit_one does for key_mode="paper"
        v_star = res.v_star[0].to(k_star.device)  # (d_out,)
        if hp.v_mode == "add":  # v* = W k* + b + δ
            W = canonical_weight(module).detach().double()  # (d_out, d_in)
            b = getattr(module, "bias", None)
            v_now = W @ k_star.double() + (b.detach().double() if b is not None else 0)
            v_star = (v_now + (res.v_star[0] - res.v_init[0]).double()).float()
        return insert(module, k_star, v_star, u.to(k_star.device))

    t_insert, delta = _timed(value_and_insert, dev)
    t_patch, _ = _timed(lambda: WeightPatch.from_model(
        model, {weight_param_name(name): delta}, method="rome", hparams=hp.to_dict(),
        requests=[request]), dev)
    fb = timer.forward_s + timer.backward_s
    steady = t_tpl_cached + t_key + t_solve + t_value + t_insert + t_patch

    def pct(x: float) -> str:
        return f"{100 * x / steady:.1f}%"

    n_rows = len(contexts) + 1
    rows = [
        ["context templates, first call (generation)", fmt_s(t_tpl_first), "one-off"],
        ["context templates, cached", fmt_s(t_tpl_cached), pct(t_tpl_cached)],
        [f"k*: key reading ({key_passes} forward pass(es), {len(contexts)} prompts)",
         fmt_s(t_key),
         pct(t_key)],
        ["C⁻¹: Cholesky of C (first edit at this layer)", fmt_s(t_chol), "one-off"],
        ["C⁻¹k*: solve with the cached factor", fmt_s(t_solve), pct(t_solve)],
        [f"v*: {timer.n_forward} forward passes ({n_rows} rows each)", fmt_s(timer.forward_s),
         pct(timer.forward_s)],
        [f"v*: {timer.n_backward} backward passes", fmt_s(timer.backward_s),
         pct(timer.backward_s)],
        ["v*: loss, Adam, batching (the rest)", fmt_s(t_value - fb), pct(t_value - fb)],
        ["insert: v* and the rank-one update Λ (C⁻¹k*)ᵀ", fmt_s(t_insert), pct(t_insert)],
        ["patch: WeightPatch.from_model (weight checksum)", fmt_s(t_patch), pct(t_patch)],
        ["**edit, steady state (sum of the above)**", fmt_s(steady), "100%"],
    ]
    figures = {"templates_first": t_tpl_first, "templates_cached": t_tpl_cached,
               "key": t_key, "cholesky_first": t_chol, "solve": t_solve,
               "v_forward": timer.forward_s, "v_backward": timer.backward_s,
               "v_total": t_value, "insert": t_insert, "patch": t_patch, "steady": steady,
               "v_fb_fraction": fb / steady, "v_steps": res.steps,
               "v_forward_passes": timer.n_forward, "v_backward_passes": timer.n_backward}
    return rows, figures


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the needed module has run."""


def _vstar_batch(bm: BenchModel, request: EditRequest, contexts: list[str], name: str,
                 fact_token: str) -> dict[str, Any]:
    """The padded batch the value optimisation runs (context prompts + target, then the
    essence prompt), with the positions its loss reads."""
    from lightning_rome.scoring import make_batch
    from lightning_rome.tokens import continuation_ids, encode_prompt, fact_token_index, fill

    tok, device = bm.tokenizer, next(bm.model.parameters()).device
    t = continuation_ids(tok, request.target_new)
    seqs, look, tgt_rows, tgt_pos, tgt_ids = [], [], [], [], []
    for i, c in enumerate(contexts):
        tpl = c.replace("{}", request.prompt)
        p = encode_prompt(tok, fill(tpl, request.subject)[0])
        seqs.append(p + t[:-1])
        look.append(fact_token_index(tok, tpl, request.subject, fact_token))
        for j, tid in enumerate(t):
            tgt_rows.append(i)
            tgt_pos.append(len(p) - 1 + j)
            tgt_ids.append(tid)
    seqs.append(encode_prompt(tok, fill("{} is a", request.subject)[0]))
    look.append(fact_token_index(tok, "{} is a", request.subject, fact_token))
    as_t = lambda x: torch.as_tensor(x, device=device)  # noqa: E731
    return {"batch": make_batch(tok, seqs, "right", device), "look": as_t(look),
            "tgt_rows": as_t(tgt_rows), "tgt_pos": as_t(tgt_pos), "tgt_ids": as_t(tgt_ids),
            "kl_row": len(seqs) - 1, "n_rows": len(seqs)}


def waste_experiments(bm: BenchModel, hp: ROMEHyperParams, contexts: list[str],
                      request: EditRequest, s: Settings) -> list[list[str]]:
    """Prototypes (benchmark-only) of two savings the package could make, timed against what
    it does now, with a check that they compute the same numbers."""
    from lightning_rome.editing.context import read_keys
    from lightning_rome.hooks import module_hooks

    model, tok = bm.model, bm.tokenizer
    layout = get_layout(model)
    name = layout.name("mlp_out", hp.layer)
    head = layout.name("lm_head")
    b = _vstar_batch(bm, request, contexts, name, hp.fact_token)
    batch, look = b["batch"], b["look"]
    rows = torch.arange(b["n_rows"], device=look.device)
    kl_row = b["kl_row"]

    def step(only_needed: bool) -> float:
        """One v* step (forward + loss + backward) with a δ added at the fact token."""
        delta = torch.zeros(model.config.n_embd, device=look.device, requires_grad=True)

        def edit(x: torch.Tensor, _: str) -> torch.Tensor:  # (R, T, d)
            x = x.clone()
            x[rows, look] = x[rows, look] + delta.to(x.dtype)
            return x

        # The loss reads the target positions and the essence row's fact token only.
        sel_r = torch.cat([b["tgt_rows"], torch.tensor([kl_row], device=look.device)])
        sel_p = torch.cat([b["tgt_pos"], look[kl_row:kl_row + 1]])

        def gather(x: torch.Tensor, _: str) -> torch.Tensor:  # (R, T, d) -> (1, P, d)
            return x[sel_r, sel_p][None]

        fns = {name: edit}
        names = [name, head] if only_needed else [name]
        with module_hooks(model, names, edit_output=fns,
                          edit_input={head: gather} if only_needed else None):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits
        if only_needed:
            logp = F.log_softmax(logits[0].float(), -1)  # (P, V)
            nll = -logp[torch.arange(len(b["tgt_ids"])), b["tgt_ids"]].sum()
            ess = logp[-1]
        else:
            logp = F.log_softmax(logits.float(), -1)  # (R, T, V)
            nll = -logp[b["tgt_rows"], b["tgt_pos"], b["tgt_ids"]].sum()
            ess = logp[kl_row, look[kl_row]]
        loss = nll + ess.max()
        loss.backward()
        return float(loss.detach())

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        (full_t, full_loss), (need_t, need_loss) = time_interleaved(
            [lambda: step(False), lambda: step(True)], s)
    finally:
        for p in frozen:
            p.requires_grad_(True)

    templates = [c.replace("{}", request.prompt) for c in contexts]

    def keys(stop: bool) -> torch.Tensor:
        if not stop:
            return read_keys(model, tok, name, templates, [request.subject] * len(templates),
                             hp.fact_token)[0]
        from lightning_rome.scoring import make_batch
        from lightning_rome.tokens import encode_prompt, fact_token_index, fill

        texts = [fill(t, request.subject)[0] for t in templates]
        idx = torch.as_tensor([fact_token_index(tok, t, request.subject, hp.fact_token)
                               for t in templates])
        kb = make_batch(tok, [encode_prompt(tok, x) for x in texts], "right",
                        next(model.parameters()).device)

        def stop_fn(x: torch.Tensor, _: str) -> torch.Tensor:
            raise _Stop

        with torch.no_grad(), module_hooks(model, [name], retain_input=True,
                                           edit_output=stop_fn) as rec, suppress(_Stop):
            model(input_ids=kb.input_ids, attention_mask=kb.attention_mask,
                  position_ids=kb.position_ids, use_cache=False)
        return rec[name].input[torch.arange(len(texts)), idx.to(kb.input_ids.device)].float()

    (kfull_t, k_full), (kstop_t, k_stop) = time_interleaved(
        [lambda: keys(False), lambda: keys(True)], s)
    same_loss = abs(full_loss - need_loss) <= 1e-4 * max(1.0, abs(full_loss))
    same_k = bool(torch.allclose(k_full, k_stop, rtol=1e-5, atol=1e-6))
    return [
        [f"v* step, logits at all {batch.input_ids.numel()} positions (now)",
         fmt_s(full_t.median), "1.00x", f"loss {full_loss:.4f}"],
        [f"v* step, lm_head on the {len(b['tgt_ids']) + 1} positions the loss reads",
         fmt_s(need_t.median), f"{full_t.median / need_t.median:.2f}x",
         f"loss {need_loss:.4f} ({'same' if same_loss else 'DIFFERENT'})"],
        ["k* reading, full forward pass (now)", fmt_s(kfull_t.median), "1.00x", "-"],
        [f"k* reading, forward cut after layer {hp.layer}'s W_out", fmt_s(kstop_t.median),
         f"{kfull_t.median / kstop_t.median:.2f}x", f"keys {'same' if same_k else 'DIFFERENT'}"],
    ]


def compare(bm: BenchModel, hp: ROMEHyperParams, C: torch.Tensor, request: EditRequest,
            s: Settings) -> dict[str, Any]:
    """Time the fast and the naive edit (median of ``s.runs`` after ``s.warmup``), measure their
    peak memory, and check that they give the same update."""
    model, tok = bm.model, bm.tokenizer
    name = get_layout(model).name("mlp_out", hp.layer)
    rome = ROME(hp, second_moment=lambda m, t, n: C)
    # Interleaved (fast, naive, fast, naive, ...): a change of load hits both alike.
    (fast_t, patch), (naive_t, naive) = time_interleaved(
        [lambda: rome.edit(model, tok, request),
         lambda: naive_rome_edit(model, tok, request, hp, C)], s)
    with PeakMemory(s.device, retained=False) as fast_mem:
        patch = rome.edit(model, tok, request)
    with PeakMemory(s.device, retained=False) as naive_mem:
        naive = naive_rome_edit(model, tok, request, hp, C)
    # Correctness: same templates, same k*, v*, and the same ΔW within tolerance.
    contexts = context_templates(model, tok, hp.context_template_lengths, hp.seed)
    dW_fast = patch.dense(weight_param_name(name)).detach().double().cpu()  # (d_out, d_in)
    dW_naive = naive.delta.double().cpu()
    rel = float((dW_fast - dW_naive).norm() / dW_fast.norm())
    last = rome.last_results[-1]
    rel_k = float((last["k_star"].double() - naive.k_star.double().cpu()).norm()
                  / last["k_star"].double().norm())
    rel_v = float((last["v_star"].detach().double() - naive.v_star.double().cpu()).norm()
                  / last["v_star"].detach().double().norm())
    tol = 1e-3 if s.dtype == torch.float32 else 5e-2
    return {"fast": fast_t, "naive": naive_t, "fast_mem": fast_mem.peak,
            "naive_mem": naive_mem.peak, "rel_dW": rel, "rel_k": rel_k, "rel_v": rel_v,
            "same_templates": contexts == naive.templates, "tol": tol,
            "ok": rel < tol and contexts == naive.templates, "steps": naive.steps}


def statistics_timing(bm: BenchModel, hp: ROMEHyperParams, s: Settings) -> list[str]:
    """The one-off cost of C: ``get_second_moment`` over a few WikiText texts (cache off)."""
    from lightning_rome.corpora import as_corpus
    from lightning_rome.stats import get_second_moment

    as_corpus("wikitext")  # imports and file checks, once, outside the timing
    n = 4 if bm.name == "tiny" else (16 if s.quick else 64)
    t, m = _timed(lambda: get_second_moment(
        bm.model, bm.tokenizer, hp.layer, corpus="wikitext", n_samples=n, cache=False,
        progress=False, checkpoint_every=None), s.device)
    per_text = t / max(1, m.n_texts)
    return [f"{m.n_texts} texts, {m.count} tokens", fmt_s(t), f"{m.count / t:,.0f}",
            f"{fmt_s(per_text * 100_000)} (extrapolated)"]


def run(s: Settings, *, steps: int | None = None, layer: int | None = None,
        with_fact: bool = True, profile: bool = True) -> dict[str, Any]:
    """Run the benchmark and print its tables; returns the figures."""
    print(machine_line(s.device), flush=True)
    steps = steps or (2 if s.quick or s.model == "tiny" else 5)
    results: dict[str, Any] = {}
    models = [s.model] + (["fact"] if with_fact and s.model != "fact" else [])
    compare_rows, notes = [], []
    for which in models:
        if which == "fact":
            fm, note = fact_model_or_none()
            if fm is None:
                notes.append(f"fact model: {note}")
                continue
        bm = build_model(which, s.device, s.dtype, s.seed)
        hp = _hparams(bm, s, steps, layer if which == s.model else None)
        C = random_second_moment(bm.d_ff, s.seed, s.device)
        # The fact model edits one of its own facts; the others a COUNTERFACT-style request.
        request = bm.kb.edit_requests(1, seed=s.seed)[0] if bm.kb is not None else REQUEST
        print(f"\nmodel: {bm.description}")
        print(f"edit: {request.prompt.format(request.subject)!r} -> {request.target_new!r}; "
              f"layer {hp.layer}; {hp.v_num_grad_steps} v* steps (no early stop); templates "
              f"{hp.context_template_lengths}; C random PD ({bm.d_ff}x{bm.d_ff}); "
              f"{s.dtype_name}; {s.runs} timed runs after {s.warmup} warm-up")
        if which == s.model and profile:
            with section(f"ROME edit breakdown ({which})"):
                # Warm up the process (allocator, tokenizer caches) with one full edit first.
                ROME(hp, second_moment=lambda m, t, n, C=C: C).edit(bm.model, bm.tokenizer,
                                                                   request)
                rows, fig = profile_edit(bm, hp, C, request, s)
                print_table(["part", "time", "share of the edit"], rows)
                print(f"\nThe v* optimisation's forward and backward passes take "
                      f"{100 * fig['v_fb_fraction']:.1f}% of a steady-state edit "
                      f"({fig['v_forward_passes']} forward, {fig['v_backward_passes']} backward "
                      f"for {fig['v_steps']} steps).")
                per_step = ((fig["v_forward"] + fig["v_backward"]) / max(1, fig["v_steps"]))
                extra = (20 - fig["v_steps"]) * per_step
                if fig["v_steps"] < 20:
                    frac20 = (fig["v_fb_fraction"] * fig["steady"] + extra) / (
                        fig["steady"] + extra)
                    print(f"At the published 20 steps (extrapolated from the measured "
                          f"{fmt_s(per_step)} per step): about {100 * frac20:.0f}% of a "
                          f"{fmt_s(fig['steady'] + extra)} edit.")
                results["breakdown"] = fig
            with section("waste: prototypes of two savings (benchmark-only code)"):
                contexts = context_templates(bm.model, bm.tokenizer,
                                             hp.context_template_lengths, hp.seed)
                print_table(["what", "time (median)", "speed-up", "check"],
                            waste_experiments(bm, hp, contexts, request, s))
                fwd_pass = fig["v_forward"] / max(1, fig["v_forward_passes"])
                saved = fig["key"] + fwd_pass
                print(f"Reading k* and v_init/the essence baseline from the first optimisation "
                      f"step's forward pass (instead of two passes of their own) would save "
                      f"about {fmt_s(saved)} per edit ({100 * saved / fig['steady']:.0f}%).")
            with section("statistics (one-off, not part of an edit)"):
                row = statistics_timing(bm, hp, s)
                print_table(["sample", "time", "tokens/s", "100,000 texts would take"], [row])
                results["statistics"] = row
        with section(f"ROME fast vs naive ({which})"):
            c = compare(bm, hp, C, request, s)
        results[f"compare_{which}"] = {k: (v.times if hasattr(v, "times") else v)
                                       for k, v in c.items()}
        check = (f"{'PASS' if c['ok'] else 'FAIL'}: |ΔW_fast − ΔW_naive|/|ΔW| = "
                 f"{c['rel_dW']:.1e} (tol {c['tol']:.0e}); k* {c['rel_k']:.1e}, v* "
                 f"{c['rel_v']:.1e}; templates {'identical' if c['same_templates'] else 'DIFFER'}")
        print(f"correctness ({which}): {check}")
        compare_rows.append([which, fmt_s(c["fast"].median), fmt_s(c["naive"].median),
                             f"{c['naive'].median / c['fast'].median:.2f}x",
                             fmt_bytes(c["fast_mem"]), fmt_bytes(c["naive_mem"]),
                             f"{c['rel_dW']:.1e} ({'ok' if c['ok'] else 'FAIL'})"])
    print_table(["model", "ROME.edit (median)", "naive (median)", "speed-up", "peak mem fast",
                 "peak mem naive", "ΔW rel. diff"], compare_rows,
                title="ROME edit: fast vs naive (same run, same request)")
    for n in notes:
        print(f"note: {n}")
    write_json(s.json_out, "rome", results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--steps", type=int, default=None,
                    help="v* optimisation steps (default 5; 2 with --quick)")
    ap.add_argument("--layer", type=int, default=None, help="l* (default 5 on GPT-2 small)")
    ap.add_argument("--no-fact", action="store_true", help="skip the fact-model row")
    ap.add_argument("--compare-only", action="store_true",
                    help="only the fast-vs-naive timing (no breakdown, prototypes, statistics)")
    args = ap.parse_args(argv)
    s = settings_from_args(args)
    results = run(s, steps=args.steps, layer=args.layer, with_fact=not args.no_fact,
                  profile=not args.compare_only)
    return 0 if all(v.get("ok", True) for k, v in results.items() if k.startswith("compare")
                    ) else 1


if __name__ == "__main__":
    raise SystemExit(main())
