"""Benchmark: peak memory of a ROME edit and of a MEMIT batch of 100, against the model's size.

Each model is measured in a fresh process (glibc told to return freed blocks, see
``common.py``), so the peak is not hidden by memory an earlier measurement left in the heap.
The edit's peak above the loaded model is compared with what it must hold:

* one batch of activations: a plain forward and backward pass over the same padded batch the
  value optimisation runs (all rewrite prompts and the essence prompt, full-vocabulary
  log-softmax), measured on its own;
* one layer's statistics: C (or its Cholesky factor), ``d_ff² × 8`` bytes in float64.

What is left over ("excess") would be copies: a copy of the model's weights would add the
parameter bytes.

Usage::

    python -m benchmarks.bench_memory [--quick] [--in-process]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    REPO,
    BenchModel,
    PeakMemory,
    Settings,
    add_common_args,
    build_model,
    counterfact_requests,
    fact_model_or_none,
    fmt_bytes,
    machine_line,
    param_bytes,
    print_table,
    random_second_moment,
    section,
    settings_from_args,
    write_json,
)
from lightning_rome.editing.context import context_templates
from lightning_rome.editing.rome import ROME, ROMEHyperParams
from lightning_rome.hooks import module_hooks
from lightning_rome.models import get_layout
from lightning_rome.scoring import make_batch
from lightning_rome.tokens import continuation_ids, encode_prompt, fact_token_index, fill

#: Below this, an excess is allocator and tokenizer noise rather than a copy of anything.
NOISE_FLOOR = 64 << 20
ROME_LAYER = {"gpt2-small": 5, "gpt2-mini": 1, "tiny": 0, "fact": 1}


def reference_pass(bm: BenchModel, requests: list[Any], contexts: list[str], module_name: str,
                   fact_token: str = "subject_last") -> None:
    """One forward and backward pass over the batch that the value optimisation runs: every
    context prompt + target of every request, and its essence prompt, right-padded, with a
    trainable vector added at the fact token of ``module_name``'s output, and a
    full-vocabulary log-softmax loss. Plain torch: the activations one such batch needs."""
    model, tok = bm.model, bm.tokenizer
    device = next(model.parameters()).device
    seqs, look = [], []
    for r in requests:
        t = continuation_ids(tok, r.target_new)
        for c in contexts:
            tpl = c.replace("{}", r.prompt)
            seqs.append(encode_prompt(tok, fill(tpl, r.subject)[0]) + t[:-1])
            look.append(fact_token_index(tok, tpl, r.subject, fact_token))
        seqs.append(encode_prompt(tok, fill("{} is a", r.subject)[0]))
        look.append(fact_token_index(tok, "{} is a", r.subject, fact_token))
    batch = make_batch(tok, seqs, "right", device)
    rows = torch.arange(len(seqs), device=device)
    pos = torch.as_tensor(look, device=device)
    d_out = model.config.n_embd  # the MLP's and the block's output width
    delta = torch.zeros(len(seqs), d_out, device=device, requires_grad=True)  # (R, d)

    def edit(x: torch.Tensor, name: str) -> torch.Tensor:  # x: (R, T, d)
        x = x.clone()
        x[rows, pos] = x[rows, pos] + delta.to(x.dtype)
        return x

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with module_hooks(model, [module_name], edit_output=edit):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False).logits
        logp = F.log_softmax(logits.float(), -1)  # (R, T, V)
        logp[rows, pos, 0].sum().backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _rome_hparams(bm: BenchModel, s: Settings) -> ROMEHyperParams:
    lengths = [[3, 2]] if bm.name == "tiny" else ([[5, 3]] if s.quick else [[5, 10], [10, 10]])
    return ROMEHyperParams(layer=ROME_LAYER.get(bm.name, 0), v_num_grad_steps=2,
                           context_template_lengths=lengths, early_stop_loss=0.0, seed=s.seed)


def measure(s: Settings, memit_batch: int) -> dict[str, Any]:
    """All measurements for one model, in this process."""
    from benchmarks.bench_memit import DEFAULT_LAYERS, make_memit
    from benchmarks.bench_rome import REQUEST

    with PeakMemory(s.device) as load:
        bm = build_model(s.model, s.device, s.dtype, s.seed)
    out: dict[str, Any] = {"model": bm.description, "name": bm.name,
                           "param_bytes": param_bytes(bm.model), "load": load.peak,
                           "load_retained": load.retained, "stats_bytes": bm.d_ff ** 2 * 8}
    layout = get_layout(bm.model)
    # ROME
    hp = _rome_hparams(bm, s)
    name = layout.name("mlp_out", hp.layer)
    C = random_second_moment(bm.d_ff, s.seed, s.device)
    contexts = context_templates(bm.model, bm.tokenizer, hp.context_template_lengths, hp.seed)
    with PeakMemory(s.device) as ref:
        reference_pass(bm, [REQUEST], contexts, name)
    rome = ROME(hp, second_moment=lambda m, t, n: C)
    with PeakMemory(s.device) as first:
        rome.edit(bm.model, bm.tokenizer, REQUEST)
    with PeakMemory(s.device) as steady:
        rome.edit(bm.model, bm.tokenizer, REQUEST)
    out["rome"] = {"ref": ref.peak, "first": first.peak, "first_retained": first.retained,
                   "steady": steady.peak, "steady_retained": steady.retained,
                   "rows": len(contexts) + 1}
    del rome
    # MEMIT
    layers = DEFAULT_LAYERS.get(bm.name, [0, 1])
    memit, _Cs = make_memit(bm, 2, layers, s.seed, s.device)
    reqs = counterfact_requests(memit_batch, bm.tokenizer)
    chunk = min(memit_batch, memit.hparams.z_batch_size or memit_batch)
    with PeakMemory(s.device) as mref:
        reference_pass(bm, reqs[:chunk], ["{}"], layout.block(layers[-1]))
    with PeakMemory(s.device) as medit:
        memit.edit(bm.model, bm.tokenizer, reqs)
    out["memit"] = {"ref": mref.peak, "peak": medit.peak, "retained": medit.retained,
                    "batch": memit_batch, "chunk": chunk, "layers": layers}
    return out


def _child(s: Settings, argv: list[str], out_path: Path) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", *argv, "--child-out", str(out_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(out_path.read_text())


def _rows(r: dict[str, Any]) -> list[list[str]]:
    P = r["param_bytes"]

    def rel(x: int | None) -> str:
        return "n/a" if x is None else f"{x / P:.2f}x"

    ro, me = r["rome"], r["memit"]
    return [
        [r["name"], "model parameters (loading the model)", fmt_bytes(P), "1.00x",
         fmt_bytes(r["load_retained"])],
        [r["name"], "one layer's statistics C (float64)", fmt_bytes(r["stats_bytes"]),
         rel(r["stats_bytes"]), "-"],
        [r["name"], f"reference: fwd+bwd of the ROME batch ({ro['rows']} rows)",
         fmt_bytes(ro["ref"]), rel(ro["ref"]), "-"],
        [r["name"], "ROME edit, first (Cholesky, templates)", fmt_bytes(ro["first"]),
         rel(ro["first"]), fmt_bytes(ro["first_retained"])],
        [r["name"], "ROME edit, steady", fmt_bytes(ro["steady"]), rel(ro["steady"]),
         fmt_bytes(ro["steady_retained"])],
        [r["name"], f"reference: fwd+bwd of one MEMIT z batch ({me['chunk']} requests)",
         fmt_bytes(me["ref"]), rel(me["ref"]), "-"],
        [r["name"], f"MEMIT batch of {me['batch']} ({len(me['layers'])} layers)",
         fmt_bytes(me["peak"]), rel(me["peak"]), fmt_bytes(me["retained"])],
    ]


def _verdicts(r: dict[str, Any]) -> list[str]:
    P, S = r["param_bytes"], r["stats_bytes"]
    ro, me = r["rome"], r["memit"]
    if None in (ro["first"], ro["ref"], me["peak"], me["ref"]):
        return [f"{r['name']}: peak memory not measurable on this platform"]
    lines = []
    for what, peak, ref, held in (("ROME edit (first)", ro["first"], ro["ref"], S),
                                  ("ROME edit (steady)", ro["steady"], ro["ref"], 0),
                                  (f"MEMIT batch of {me['batch']}", me["peak"], me["ref"], S)):
        excess = peak - ref - held
        if excess < P / 2:
            verdict = "no copy of the model's weights (excess under half the parameter bytes)"
        elif excess < NOISE_FLOOR:
            verdict = (f"excess under the {fmt_bytes(NOISE_FLOOR)} noise floor (the model is "
                       "too small to tell a copy of its weights apart)")
        else:
            verdict = "UNACCOUNTED MEMORY OF AT LEAST HALF THE MODEL'S SIZE (a copy?)"
        lines.append(f"{r['name']}: {what}: peak {fmt_bytes(peak)} = one batch "
                     f"{fmt_bytes(ref)} + statistics {fmt_bytes(held)} + excess "
                     f"{fmt_bytes(excess)} ({100 * excess / P:+.1f}% of the parameters): "
                     f"{verdict}")
    held = ro["first_retained"]
    lines.append(f"{r['name']}: held after the first ROME edit: {fmt_bytes(held)} (the cached "
                 f"Cholesky factor is {fmt_bytes(S)}); after a second edit "
                 f"{fmt_bytes(ro['steady_retained'])}; after MEMIT {fmt_bytes(me['retained'])}")
    return lines


def run(s: Settings, *, in_process: bool | None = None, memit_batch: int | None = None,
        with_fact: bool = True, forward: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure ``s.model`` (and the fact model when cached) and print the table."""
    print(machine_line(s.device), flush=True)
    if in_process is None:
        in_process = s.quick or s.model == "tiny"
    if memit_batch is None:
        memit_batch = 10 if s.model == "tiny" else (8 if s.quick else 100)
    models = [s.model]
    if with_fact and s.model != "fact":
        fm, note = fact_model_or_none()
        if fm is None:
            print(f"note: {note}")
        else:
            models.append("fact")
    results = []
    with section("peak memory"):
        for m in models:
            if in_process:
                s_m = Settings(**{**s.__dict__, "model": m})
                results.append(measure(s_m, memit_batch))
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    argv = [*(forward or []), "--model", m, "--memit-batch", str(memit_batch)]
                    results.append(_child(s, argv, Path(tmp) / "out.json"))
    how = "in this process" if in_process else "a fresh process per model"
    for r in results:
        print(f"model {r['name']}: {r['model']}")
    rows = [row for r in results for row in _rows(r)]
    print_table(["model", "what", "peak above the loaded model", "÷ parameter bytes",
                 "held afterwards"], rows,
                title=f"Peak memory ({'CUDA max_memory_allocated' if s.device.type == 'cuda' else 'RSS high-water mark'}, {how})")
    for r in results:
        for line in _verdicts(r):
            print(line)
    write_json(s.json_out, "memory", {"results": results})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--in-process", action="store_true", default=None,
                    help="measure in this process (default with --quick and --model tiny)")
    ap.add_argument("--memit-batch", type=int, default=None,
                    help="requests in the MEMIT batch (default 100; 8 with --quick, 10 for "
                         "--model tiny)")
    ap.add_argument("--no-fact", action="store_true", help="skip the fact-model row")
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    s = settings_from_args(args)
    if args.child_out is not None:
        args.child_out.write_text(json.dumps(measure(s, args.memit_batch or 100)))
        return 0
    forward = ["--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    if args.quick:
        forward.append("--quick")
    if args.threads:
        forward += ["--threads", str(args.threads)]
    run(s, in_process=args.in_process, memit_batch=args.memit_batch,
        with_fact=not args.no_fact, forward=forward)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
