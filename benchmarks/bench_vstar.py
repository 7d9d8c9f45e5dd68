"""Benchmark: ROME's value optimisation (v*), the published loop against the package's two
engines, interleaved in one run on the same request, contexts and model.

* **published**: :func:`benchmarks.published_loop.published_compute_v`, the loop of kmeng01/rome's
  ``compute_v`` (the whole model on the whole batch each step, the log-softmax at every position);
* **package, full**: :func:`lightning_rome.editing.context.optimise_values` with
  ``engine="full"`` (whole rows, the LM head only at the scored positions);
* **package, suffix**: ``engine="suffix"`` (the default once checked): the tokens before each
  row's fact token are computed once, each step runs only the rest
  (:mod:`lightning_rome.editing.suffix`).

Then a whole edit: the published ``compute_u`` + ``compute_v`` + update
(:func:`benchmarks.published_loop.published_rome_edit`) against ``ROME.edit`` (reference key
mode), both with their inverse or factor of C kept from the warm-up, interleaved, with the ΔW
check.

All run the same number of steps (no early stop) and must give the same v* (the check is
printed). The work column counts token-layer evaluations of one step (rows × tokens × layers
run), the measure of the forward work each engine does.

Usage::

    python -m benchmarks.bench_vstar                 # GPT-2 small shape (random), layer 5
    python -m benchmarks.bench_vstar --quick         # GPT-2 scaled to 4 x 256, 5 steps
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.common import (
    add_common_args,
    build_model,
    fmt_s,
    machine_line,
    print_table,
    random_second_moment,
    settings_from_args,
    time_interleaved,
    write_json,
)
from benchmarks.published_loop import published_compute_v, published_rome_edit
from lightning_rome.editing import ROME, ROMEHyperParams
from lightning_rome.editing.context import context_templates, optimise_values, wrap
from lightning_rome.models import get_layout
from lightning_rome.models.weights import weight_param_name
from lightning_rome.requests import EditRequest
from lightning_rome.tokens import continuation_ids, encode_prompt, fact_token_index, fill

REQUEST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English",
                      target_true="French")
#: The published ROME templates: the bare prompt, 10 of 5 tokens and 10 of 10 tokens.
LENGTHS = [[5, 10], [10, 10]]


def _work(tok: Any, request: EditRequest, contexts: list[str], n_layers: int
          ) -> tuple[int, int]:
    """Token-layer evaluations of one step: whole rows, and suffixes from the fact token on."""
    n_target = len(continuation_ids(tok, request.target_new))
    full = suffix = 0
    for c in [*contexts, None]:
        tpl = wrap(c, request.prompt) if c is not None else "{} is a"
        ids = encode_prompt(tok, fill(tpl, request.subject)[0])
        look = fact_token_index(tok, tpl, request.subject, "subject_last")
        extra = n_target - 1 if c is not None else 0
        full += len(ids) + extra
        suffix += len(ids) - look + extra
    return full * n_layers, suffix * n_layers


def _whole_edit(bm: Any, name: str, layer: int, contexts: list[str], steps: int, s: Any,
                ) -> dict[str, Any]:
    """A whole ROME edit: the published code's (:func:`published_rome_edit`, C⁻¹ kept between
    edits as the published cache does) against :class:`~lightning_rome.editing.ROME` in its
    default ``reference`` key mode (its Cholesky factor of C kept likewise), interleaved."""
    model, tok = bm.model, bm.tokenizer
    C = random_second_moment(bm.d_ff, s.seed, s.device)
    C_inv = torch.inverse(C)
    hp = ROMEHyperParams(layer=layer, v_num_grad_steps=steps, context_templates=contexts,
                         clamp_norm_factor=4.0, early_stop_loss=0.0)
    rome = ROME(hp, second_moment=lambda m, t, n: C)
    wname = weight_param_name(name)
    (t_pub, ref), (t_pkg, patch) = time_interleaved(
        [lambda: published_rome_edit(model, tok, REQUEST, name, contexts, C_inv, steps=steps,
                                     early_stop_loss=0.0),
         lambda: rome.edit(model, tok, REQUEST)], s)
    dW = patch.dense(wname, torch.float64).cpu()
    rel = float((dW - ref.cpu()).norm() / ref.norm())
    print_table(["ROME edit", "time (median)", "vs published", "|ΔW − ΔW_published| / |ΔW|"],
                [["published (compute_u, compute_v, update)", fmt_s(t_pub.median), "1.00x",
                  "—"],
                 ["package ROME.edit (reference key mode)", fmt_s(t_pkg.median),
                  f"{t_pub.median / t_pkg.median:.2f}x", f"{rel:.1e}"]],
                title=f"ROME edit, {s.model}, {steps} steps")
    return {"published": t_pub.times, "package": t_pkg.times, "rel_dW": rel}


def run(s: Any, steps: int = 20, layer: int | None = None, edit: bool = True
        ) -> dict[str, Any]:
    print(machine_line(s.device), flush=True)
    bm = build_model(s.model, s.device, s.dtype, s.seed)
    model, tok = bm.model, bm.tokenizer
    n_layers = int(model.config.n_layer)
    layer = layer if layer is not None else min(5, n_layers // 2 - 1)  # GPT-2 small: 5
    name = get_layout(model).name("mlp_out", layer)
    contexts = context_templates(model, tok, LENGTHS, 0)
    kw = {"num_steps": steps, "lr": 0.5, "weight_decay": 0.5, "kl_factor": 0.0625,
          "clamp_norm_factor": 4.0, "early_stop_loss": 0.0}

    def package(engine: str) -> Any:
        return optimise_values(model, tok, [REQUEST], name, contexts, engine=engine, **kw)

    print(f"model: {bm.description}; layer {layer}; {len(contexts)} contexts; {steps} steps "
          f"(no early stop); {s.dtype_name}; {s.runs} interleaved runs after {s.warmup} "
          "warm-up", flush=True)
    (t_pub, pub), (t_full, full), (t_suf, suf) = time_interleaved(
        [lambda: published_compute_v(model, tok, REQUEST, name, contexts, steps=steps,
                                     early_stop_loss=0.0),
         lambda: package("full"), lambda: package("suffix")], s)
    ref = pub["v_star"].double()

    def rel(v: torch.Tensor) -> float:
        return float((v.double().reshape(-1) - ref.reshape(-1)).norm() / ref.norm())

    w_full, w_suf = _work(tok, REQUEST, contexts, n_layers)
    rows = [["published compute_v loop", fmt_s(t_pub.median), "1.00x", "—", f"{w_full:,}",
             "—"],
            ["package, engine='full'", fmt_s(t_full.median),
             f"{t_pub.median / t_full.median:.2f}x", "1.00x", f"{w_full:,}",
             f"{rel(full.v_star[0]):.1e}"],
            ["package, engine='suffix'", fmt_s(t_suf.median),
             f"{t_pub.median / t_suf.median:.2f}x", f"{t_full.median / t_suf.median:.2f}x",
             f"{w_suf:,}", f"{rel(suf.v_star[0]):.1e}"]]
    print_table(["v* loop", "time (median)", "vs published", "vs full", "token-layers/step",
                 "|v* − v*_published| / |v*|"], rows,
                title=f"ROME v*, {s.model}, {steps} steps")
    out = {"published": t_pub.times, "full": t_full.times, "suffix": t_suf.times,
           "rel_full": rel(full.v_star[0]), "rel_suffix": rel(suf.v_star[0]),
           "work_full": w_full, "work_suffix": w_suf}
    if edit:
        out["edit"] = _whole_edit(bm, name, layer, contexts, steps, s)
    write_json(s.json_out, "vstar", out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--steps", type=int, default=None,
                    help="optimisation steps (default 20, the published count; --quick: 5)")
    ap.add_argument("--layer", type=int, default=None)
    args = ap.parse_args(argv)
    s = settings_from_args(args)
    run(s, steps=args.steps or (5 if s.quick else 20), layer=args.layer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
