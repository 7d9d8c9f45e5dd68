"""The README's measured numbers, regenerated from the jobs that measure them.

Every measured number in ``README.md`` sits in a generated block::

    <!-- numbers: demo-table (python -m benchmarks.readme_numbers --run demo) -->
    ...text rendered from benchmarks/results/demo.json...
    <!-- /numbers: demo-table -->

A block's text is the render of one **result file** (``benchmarks/results/<job>.json``: what the
job measured, with the commit, date, load and command it ran under). Four uses::

    python -m benchmarks.readme_numbers --run demo sequential   # run the jobs, record, re-render
    python -m benchmarks.readme_numbers                         # re-render from the records
    python -m benchmarks.readme_numbers --check                 # exit 1 if the README differs
    python -m benchmarks.readme_numbers --list                  # the jobs, blocks and records

``--check`` is part of the default test suite (``tests/test_readme_numbers.py``), so a number
edited by hand in a block, or a record changed without re-rendering, fails the tests. To change
a block's wording, edit its render function here and re-render.

Jobs (``--run`` names; all run on the CPU, one torch thread unless said otherwise):

* ``demo``: ``lightning-rome demo`` in a fresh process on the cached demo model (its wall time
  and ``summary.json``); ``demo-first``: the same with an empty model and statistics cache;
* ``sequential``: :mod:`benchmarks.bench_sequential` at N = 100, b = 1 (ROME, MEMIT, AlphaEdit
  and AlphaEdit with α = 1.5), without GE samples; ``sequential-large``: the most edits the
  default knowledge base allows, b = 10 (AlphaEdit, MEMIT, ROME);
* ``key-modes``: :mod:`benchmarks.bench_rome_modes` on the fact model, the demo model and the
  deep fact model (``--models`` to choose; ``deep`` trains the 8-layer model on first use);
* ``suite``: the default test suite (``pytest``), its test count and wall time;
* ``fact-model``: the two synthetic fact models' recorded build figures (training the deep one
  on first use, about 4 minutes) and the ``fact-model`` ROME preset on 10 edits;
* ``memit-scale``: :mod:`benchmarks.bench_memit_scale` (sequential ROME against one MEMIT batch
  of 100 on both fact models);
* ``benchmarks``: :mod:`benchmarks.bench_vstar`, ``bench_memit --published`` and
  ``bench_stats`` with the settings of ``benchmarks/RESULTS.md`` (about 20 minutes);
* ``evaluation``: :mod:`benchmarks.bench_evaluation` on the GPT-2-small shape, 4 cases.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, git_commit

README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"
#: The result files' format; a file of another version is refused.
FORMAT = 1

BLOCK_RE = re.compile(
    r"^<!-- numbers: (?P<name>[a-z0-9-]+)(?: \((?P<hint>[^)]*)\))? -->\n"
    r"(?P<body>.*?)"
    r"^<!-- /numbers: (?P=name) -->$", re.S | re.M)


# --------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------

def provenance(command: str) -> dict[str, Any]:
    """Where and when a job ran: commit (``+dirty`` when the tree had uncommitted changes, which
    ``uncommitted`` lists), UTC date, 1-minute load before the job, the machine and the command."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=REPO, capture_output=True, text=True, check=False,
                                 timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        changed = []
    return {"commit": git_commit(), "uncommitted": [line[3:] for line in changed],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "day": time.strftime("%-d %B %Y", time.gmtime()),
            "load": round(os.getloadavg()[0], 2), "cpu": cpu, "cores": os.cpu_count(),
            "command": command}


def write_result(job: str, data: Mapping[str, Any], prov: Mapping[str, Any],
                 folder: Path = RESULTS) -> Path:
    """Write ``folder/<job>.json`` atomically: ``{"format", "job", "provenance", "data"}``."""
    from lightning_rome.utils.io import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job}.json"
    atomic_write_json(path, {"format": FORMAT, "job": job, "provenance": dict(prov),
                             "data": dict(data)})
    path.chmod(0o644)  # a committed file, readable like the rest of the tree
    return path


def read_result(job: str, folder: Path = RESULTS) -> dict[str, Any]:
    """The record of ``job``, validated (format, job name, fields)."""
    path = folder / f"{job}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no record of job {job!r} ({path}): run "
                                f"`python -m benchmarks.readme_numbers --run {job}`")
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): run the job again") from e
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or rec.get("job") != job or \
            not isinstance(rec.get("data"), dict) or not isinstance(rec.get("provenance"), dict):
        raise ValueError(f"{path} is not a format-{FORMAT} record of job {job!r}: run the job "
                         "again")
    return rec


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------

def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def sci(x: float) -> str:
    """``4e-6`` (one significant digit, no zero-padded exponent)."""
    mant, _, exp = f"{x:.0e}".partition("e")
    return f"{mant}e{int(exp)}"


def when(prov: Mapping[str, Any]) -> str:
    """``commit `abc1234`, 6 December 2026, load 1.1``."""
    return f"commit `{prov['commit']}`, {prov['day']}, load {prov['load']:.1f}"


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


# --------------------------------------------------------------------------------------------
# Renders: one per README block
# --------------------------------------------------------------------------------------------

def render_demo_model(rec: dict[str, Any]) -> str:
    d = rec["data"]
    m = d["summary"]["model"]
    return (
        f"The model answers {pct(m['accuracy_train'])} of the edit prompts and "
        f"{pct(m['accuracy_neighborhood'])} of the neighbourhood prompts (top-1); the "
        f"rephrasings are held out ({pct(m['accuracy_paraphrase'])} top-1, "
        f"{pct(m['pairwise_paraphrase'])} P(true) > P(new)); {d['summary']['n_known_cases']} "
        f"cases are known on all their prompts.")


def cell(text: str) -> str:
    """``text`` as inline code in a table cell (pipes escaped, backticks and newlines out)."""
    return "`" + text.replace("`", "'").replace("\n", " ").replace("|", "\\|") + "`"


def _headline(s: dict[str, Any]) -> str:
    comp = s["completions"]
    labels = ("edit", "paraphrase", "neighbour")
    rows = [f"| {label} | {cell(p)} | {cell(b)} | {cell(a)} |" for label, p, b, a in
            zip(labels, comp["prompts"], comp["before"], comp["after"])]
    ex = s["rome_outcomes"][s["rome_case_ids"].index(s["edited_case"])]
    said = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in zip(("ES", "PS", "NS"), ex))
    return ("The headline example (case " f"{s['edited_case']}; its outcome, {said}, is the "
            f"majority's: `{s['example']['true']} -> {s['example']['new']}`), greedy "
            "completions before and after the edit:\n\n"
            "| prompt | text | before | after |\n|---|---|---|---|\n" + "\n".join(rows))


def render_demo_table(rec: dict[str, Any]) -> str:
    from lightning_rome.metrics import summary_table

    d, prov = rec["data"], rec["provenance"]
    s = d["summary"]
    order = ("unedited", "ROME", "MEMIT")  # the demo's order (the record's keys are sorted)
    rows = dict(sorted(s["rows"].items(), key=lambda kv: next(
        (i for i, w in enumerate(order) if kv[0].startswith(w)), len(order))))
    table = summary_table(rows)
    return (f"Measured by `python -m benchmarks.readme_numbers --run demo` ({when(prov)}, "
            f"{prov['cores']} cores, model cached; 95% intervals, Wilson for the rates):\n\n"
            f"{table}\n\n{_headline(s)}")


def _share_text(t: dict[str, Any], kind: str, cls: str, note: str = "") -> str:
    p = t[kind][cls]
    return f"{p['peak']:.2f} ({p['share']:.0%} of it, layer {p['layer']}{note})"


def render_demo_trace(rec: dict[str, Any]) -> str:
    s = rec["data"]["summary"]
    t = s["trace"]
    lst, last = t["mlp"]["last subject token"], t["mlp"]["last token"]
    where = ("mostly at the subject" if lst["share"] >= last["share"]
             else "mostly at the prompt's last token, partly at the subject")
    outcomes = s["rome_outcomes"]
    n = len(outcomes)
    es = sum(o[0] for o in outcomes) / n
    ns = sum(o[2] for o in outcomes) / n
    return (
        f"**What the trace shows** (averaged over {t['n']} known facts): the total effect is "
        f"{t['ate']:.2f}; restoring the last subject token's MLP output recovers at most "
        f"{_share_text(t, 'mlp', 'last subject token', '; GPT-2 XL in the paper: 35%')}, against "
        f"{_share_text(t, 'mlp', 'last token')} for the prompt's last token's MLP; the hidden "
        f"state at the last subject token recovers at most "
        f"{_share_text(t, 'hidden', 'last subject token')}. So this small model recalls its "
        f"facts {where}; ROME at the subject's last token makes the new object win on "
        f"{es:.0%} of the {n} edit prompts while {ns:.0%} of the neighbours keep their answer.")


def render_demo_time(rec: dict[str, Any]) -> str:
    d, prov = rec["data"], rec["provenance"]
    s = d["summary"]
    text = (f"Time ({when(prov)}): a cached run takes {d['wall_seconds']:.0f} s wall clock "
            f"(the demo's own count after its imports: {s['seconds']:.0f} s; traces "
            f"{s['trace_seconds']:.0f} s, ROME's {len(s['rome_case_ids'])} edits "
            f"{s['rome_seconds']:.0f} s, MEMIT's batch {s['memit_seconds']:.0f} s)")
    try:
        first = read_result("demo-first")
    except FileNotFoundError:
        return text + "; the first run (empty cache) has not been measured on this commit."
    fd, fp = first["data"], first["provenance"]
    return (text + f"; a first run, with an empty cache, {fd['wall_seconds']:.0f} s "
            f"(training the model {fd['summary']['model']['seconds']:.0f} s; {when(fp)}).")


def render_sequential(rec: dict[str, Any]) -> str:
    d, prov = rec["data"], rec["provenance"]
    rows = d["rows"]
    names = {"alphaedit": "AlphaEdit (`fact-model` preset, α = 3)",
             "alphaedit-a1.5": "AlphaEdit, α = 1.5", "memit": "MEMIT", "rome": "ROME"}
    first = rows[0]
    lines = ["| method | efficacy | neighbourhood | unedited facts kept | ‖ΔW‖ |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        f = r["final"]
        lines.append(f"| {names.get(r['method'], r['method'])} | {f['efficacy']:.2f} | "
                     f"{f['neighborhood']:.2f} | {f['retain_accuracy']:.2f} | "
                     f"{f['update_norm']:.0f} |")
    alpha = next(r for r in rows if r["method"] == "alphaedit")
    base = alpha["unedited"]["retain_accuracy"]
    held = [p for p in alpha["points"] if p["edits"] > 0 and p["efficacy"] >= 0.8 and
            p["retain_accuracy"] >= base - 0.1]
    upto = (f"holds up to {held[-1]['edits']} edits ({held[-1]['efficacy']:.2f} efficacy, "
            f"{held[-1]['retain_accuracy']:.3f} kept)" if held else "holds at no point")
    curve = "; ".join(
        f"{names.get(r['method'], r['method']).split(' (')[0]} " + ", ".join(
            f"{p['efficacy']:.2f} / {p['retain_accuracy']:.2f}" for p in r["points"]
            if p["edits"] in (10, 20, 50, 100)) for r in rows)
    return (f"On the default fact model, after {first['n']} single edits (unedited accuracy on "
            f"the untouched facts {base:.2f}; `python -m benchmarks.readme_numbers --run "
            f"sequential`, {when(prov)}):\n\n" + "\n".join(lines) + "\n\n"
            f"Efficacy / kept after 10, 20, 50 and 100 edits: {curve}. The target of \"within "
            f"10 points of the unedited model with efficacy ≥ 0.8\" {upto}.")


def render_sequential_large(rec: dict[str, Any]) -> str:
    d, prov = rec["data"], rec["provenance"]
    rows = d["rows"]
    names = {"alphaedit": "AlphaEdit (`fact-model` preset)", "memit": "MEMIT", "rome": "ROME"}
    lines = ["| method | N | b | efficacy | neighbourhood | unedited facts kept | ‖ΔW‖ |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = r["final"]
        lines.append(f"| {names.get(r['method'], r['method'])} | {r['n']} | {r['b']} | "
                     f"{f['efficacy']:.2f} | {f['neighborhood']:.2f} | "
                     f"{f['retain_accuracy']:.2f} | {f['update_norm']:.0f} |")
    n = rows[0]["n"]
    return ("The default knowledge base has fewer than 500 facts to edit (the known facts of the "
            "subjects that are not held out, at most three per subject), so N = 500 and 1,000 "
            f"cannot be run on it; at N = {n}, the largest multiple of the batch size that fits, "
            f"in batches of {rows[0]['b']} (`python -m "
            f"benchmarks.readme_numbers --run sequential-large`, {when(prov)}):\n\n"
            + "\n".join(lines))


def render_key_modes(rec: dict[str, Any]) -> str:
    d, prov = rec["data"], rec["provenance"]
    labels = {"fact": "fact model 4×96", "counterfact": "COUNTERFACT demo model",
              "deep": "deep fact model 8×192 (4-layer preset, untuned)"}
    modes = ("reference", "r-rome", "paper")
    lines = ["| model | " + " | ".join(modes) + " | sequential: retained (unedited facts) |",
             "|---|" + "---|" * len(modes) + "---|"]
    for r in d["results"]:
        single = " | ".join(f"{r['single'][m]['Score']:.3f}" for m in modes)
        seq = ", ".join(f"{m} {r['sequential'][m]['retention']:.2f} "
                        f"({r['sequential'][m]['unedited_accuracy']:.2f})" for m in modes
                        if m in r["sequential"])
        lines.append(f"| {labels.get(r['model'], r['model'])} ({r['n_single']} single / "
                     f"{r['n_sequential']} seq.) | {single} | {seq} |")
    best = "; ".join(
        f"{labels.get(r['model'], r['model']).split(' (')[0]}: "
        f"{max(modes, key=lambda m: r['single'][m]['Score'])} for single edits, "
        f"{max(modes, key=lambda m: r['sequential'][m]['retention'])} for edits kept "
        "in sequence" for r in d["results"])
    before = ", ".join(f"{r['pool_accuracy_before']:.2f}" for r in d["results"])
    return ("Single-edit Score (harmonic mean of ES, PS, NS) and, after the sequential edits, "
            "the ES kept over all of them and the accuracy on unedited facts "
            f"(`python -m benchmarks.readme_numbers --run key-modes`, {when(prov)}):\n\n"
            + "\n".join(lines) + f"\n\nThe unedited facts' accuracy before the sequences: "
            f"{before}. The best mode per model ({best}; on a tie, the first of {', '.join(modes)}). Largest single-edit "
            "Score gap between modes against the standard error of ES over the cases: " + "; ".join(
                f"{labels.get(r['model'], r['model']).split(' (')[0]} "
                f"{max(r['single'][m]['Score'] for m in modes) - min(r['single'][m]['Score'] for m in modes):.3f}"
                f" against {max(math.sqrt(r['single'][m]['ES'] * (1 - r['single'][m]['ES']) / r['n_single']) for m in modes):.3f}"
                for r in d["results"]) + ".")


def render_suite(rec: dict[str, Any]) -> str:
    d, prov = rec["data"], rec["provenance"]
    if d.get("provisional"):  # written only while the first `--run suite` runs
        return ("`make test` runs the default suite (its size and time are not measured yet: "
                "`python -m benchmarks.readme_numbers --run suite`).")
    return (f"`make test` runs the default suite ({d['passed']:,} tests; "
            f"{duration(d['seconds'])} on the {prov['cores']}-core machine, {when(prov)}, with "
            f"the test models cached; {d['deselected']} tests marked `slow` are skipped).")


def render_fact_model(rec: dict[str, Any]) -> str:
    d = rec["data"]
    f, deep, r = d["fact"], d["deep"], d["rome"]
    return (
        f"The behaviour tests use a small GPT-2 that knows facts (`lightning_rome.testing`): "
        f"{f['n_layer']} layers, width {f['n_embd']}, {f['n_params'] / 1e3:.0f}k parameters, a "
        f"{f['vocab_size']:,}-token byte-level BPE trained offline, and a synthetic knowledge "
        f"base of {f['n_subjects']} subjects × {f['relations_per_subject']} of "
        f"{f['n_relations']} relations ({f['n_facts']} facts, 4 training and 2 held-out "
        f"paraphrase templates each). It answers {pct(f['accuracy_train'])} of its facts on "
        f"training templates and {pct(f['accuracy_paraphrase'])} on held-out paraphrases. "
        f"Training took {f['train_seconds']:.0f} s with one thread, plus "
        f"{f['eval_seconds']:.0f} s to measure its accuracy (the figures its cached build "
        f"recorded, read by `python -m benchmarks.readme_numbers --run fact-model`, "
        f"{when(rec['provenance'])}); "
        f"it is built once and cached under `.cache/` (keyed by its settings, validated by "
        f"checksums on every load), so later runs load it in under a second. The slow MEMIT test "
        f"also uses `DEEP_FACT_MODEL` ({deep['n_layer']} layers, width {deep['n_embd']}, "
        f"{deep['n_params'] / 1e6:.1f}M parameters; {pct(deep['accuracy_train'])} / "
        f"{pct(deep['accuracy_paraphrase'])}), built the same way (training "
        f"{deep['train_seconds']:.0f} s, measuring {deep['eval_seconds']:.0f} s). `prefers` and `predicted_objects` are the probability "
        f"comparisons the behaviour tests score edits with.\n\n"
        f"Small models need their own ROME settings: on {r['n']} edits "
        f"(`edit_requests({r['n']}, seed=0)`, as `tests/editing/test_rome_behaviour.py`), the "
        f"preset `fact-model` (layer 0, 60 steps, clamp 12, weight decay 0.01) reaches efficacy "
        f"{r['efficacy']:.2f}, held-out paraphrase {r['paraphrase']:.2f} and specificity "
        f"{r['specificity']:.2f} (`lightning_rome.testing.edit_quality`).")


def render_memit_scale(rec: dict[str, Any]) -> str:
    d, prov = rec["data"], rec["provenance"]
    r, deep = d["default"], d["deep"]
    seq, batch = r["ROME x100 sequential"], r["MEMIT x100 batch"]
    (_, s0), (me, ms), (re_, rs) = deep["unedited"], deep["memit"], deep["rome_sequential"]
    beats = "beats" if batch[0] > seq[0] else "does not beat"
    return (
        "`benchmarks/bench_memit_scale.py` (asserted by the slow "
        "`tests/editing/test_memit_behaviour.py`) repeats the MEMIT paper's \"multiple "
        "concurrent rewrites\" experiment, editing at the prompt's last token (where causal "
        "tracing places the facts on models this small). On the default 4-layer fact model, 100 "
        f"sequential ROME edits keep efficacy {seq[0]:.2f} (specificity {seq[1]:.2f}) and one "
        f"MEMIT batch of 100 keeps {batch[0]:.2f} (specificity {batch[1]:.2f}; unedited "
        f"{r['unedited'][1]:.2f}): MEMIT {beats} sequential ROME on retained efficacy. On "
        "`DEEP_FACT_MODEL` (8 layers of width 192) one MEMIT batch of 100 keeps efficacy "
        f"{me:.2f} with specificity {ms:.3f} against {s0:.3f} unedited, where 100 sequential ROME "
        f"edits keep efficacy {re_:.2f} with specificity {rs:.2f} (`python -m "
        f"benchmarks.readme_numbers --run memit-scale`, {when(prov)}).")


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def render_benchmarks(rec: dict[str, Any]) -> str:
    d, prov = rec["data"], rec["provenance"]
    v, m, st = d["vstar"], d["memit"], d["stats"]
    vs_loop = _median(v["published"]) / _median(v["suffix"])
    edit = _median(v["edit"]["published"]) / _median(v["edit"]["package"])
    pub = m["batches"]["published"]
    speed = {n: _median(r["published"]) / _median(r["package"]) for n, r in pub.items()}
    per_edit = {n: r["per_edit"] for n, r in m["batches"].items() if n != "published"}
    lo, hi = min(per_edit, key=int), max(per_edit, key=int)
    ratios = st["single"]["ratios"]
    r32 = ratios["package, float32 sums"]["median"]
    r64 = ratios["package, float64 sums"]["median"]
    rmix = ratios["package, float64 sums (default) vs published float32"]["median"]
    multi = _median(st["multi"]["per_layer_s"]) / _median(st["multi"]["one_pass_s"])
    sizes = ", ".join(sorted(speed, key=int))
    return (
        f"Highlights (`python -m benchmarks.readme_numbers --run benchmarks`, {when(prov)}; "
        f"{prov['cores']}-core CPU, one thread, ratios measured in the same run): ROME's v\\* "
        "optimisation runs the tokens before the subject's fact token once per edit and each "
        "step only the rest (`editing/suffix.py`), which makes a whole ROME edit "
        f"{edit:.1f}× faster than a step-by-step re-implementation of the published "
        "`compute_u` + `compute_v` + update on a GPT-2-small-sized model (20 steps, 21 "
        f"templates; ΔW equal to {sci(v['edit']['rel_dW'])}; the v\\* loop alone {vs_loop:.1f}×); "
        "MEMIT's z optimisation uses the same pass, and its per-layer keys and residuals are "
        "read in one pass that stops at the last layer of R: a batch edit is "
        f"{min(speed.values()):.1f}–{max(speed.values()):.1f}× faster than a step-by-step "
        f"re-implementation of the published `execute_memit` at {sizes} edits (GPT-2-small "
        f"size, {m['steps']} z steps; ΔW equal to "
        f"{sci(max(r['rel_dW'] for r in pub.values()))}), and its cost per edit falls "
        f"{per_edit[lo] / per_edit[hi]:.1f}× from batch {lo} to batch {hi}; second-moment "
        f"statistics of several layers in one pass are {multi:.1f}× faster than one pass per "
        "layer, and texts sorted by length into batches of at most `batch_tokens=4096` padded "
        "tokens, with each pass stopped before the hooked module, make one layer's statistics "
        f"{r32:.2f}× faster than a step-by-step re-implementation of ROME's published "
        f"`layer_stats` (`benchmarks/published_loop.py`) with float32 sums, and {r64:.2f}× "
        "with float64 sums on both sides (the package's float64 default against the published "
        f"float32: {rmix:.2f}×).")


def render_evaluation(rec: dict[str, Any]) -> str:
    d, prov = rec["data"], rec["provenance"]
    rows = d["rows"]
    parts = []
    for editor, label in (("rank-one", "with a (random rank-one) edit per case, pre and post"),
                          ("none", "unedited, one phase")):
        pub = rows[f"{editor}/per-case batch (candidate_nll)"]
        ours = rows[f"{editor}/evaluator (evaluate_cases)"]
        parts.append(
            f"{label}: {ours['cases_per_s'] / pub['cases_per_s']:.1f}× the published per-case "
            f"batching ({ours['cases_per_s']:.2f} against {pub['cases_per_s']:.2f} cases/s), "
            f"which does {pub['gflop_per_case'] / pub['minimal_gflop_per_case']:.1f}× the "
            f"minimal work against the evaluator's "
            f"{ours['gflop_per_case'] / ours['minimal_gflop_per_case']:.2f}×")
    return (f"COUNTERFACT scoring (`benchmarks/bench_evaluation.py`, {d['model']}, {d['cases']} "
            f"cases of {d['pairs']} prompt-candidate pairs, probabilities without generation; "
            f"{when(prov)}): " + "; ".join(parts) + ". On a CPU the ratio is bounded by the "
            "work: the published batching's excess over the minimal work is the most any "
            "scoring path can gain there.")


@dataclass(frozen=True)
class Block:
    """A generated README block: the job whose record it renders, and how."""

    job: str
    render: Callable[[dict[str, Any]], str]


BLOCKS: dict[str, Block] = {
    "demo-model": Block("demo", render_demo_model),
    "demo-table": Block("demo", render_demo_table),
    "demo-trace": Block("demo", render_demo_trace),
    "demo-time": Block("demo", render_demo_time),
    "sequential": Block("sequential", render_sequential),
    "sequential-large": Block("sequential-large", render_sequential_large),
    "key-modes": Block("key-modes", render_key_modes),
    "suite": Block("suite", render_suite),
    "fact-model": Block("fact-model", render_fact_model),
    "memit-scale": Block("memit-scale", render_memit_scale),
    "benchmarks": Block("benchmarks", render_benchmarks),
    "evaluation": Block("evaluation", render_evaluation),
}


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.update(extra)
    return env


def _run_demo(args: argparse.Namespace, first: bool) -> tuple[dict[str, Any], str]:
    with tempfile.TemporaryDirectory(prefix="readme-demo-") as tmp:
        out = Path(tmp) / "demo"
        cmd = [sys.executable, "-m", "lightning_rome.cli", "demo", "--out", str(out)]
        extra = {"LIGHTNING_ROME_CACHE": str(Path(tmp) / "cache")} if first else {}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=_env(**extra), cwd=REPO)
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
    shown = "lightning-rome demo" + (" (empty LIGHTNING_ROME_CACHE)" if first else "")
    return {"wall_seconds": wall, "summary": summary}, shown


def _run_sequential(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from benchmarks import bench_sequential as bs

    rows = []
    with tempfile.TemporaryDirectory(prefix="readme-seq-") as tmp:
        for method, hp, label in (("alphaedit", None, None),
                                  ("alphaedit", bs.alphaedit_variant(1.5), "alphaedit-a1.5"),
                                  ("memit", None, None), ("rome", None, None)):
            r = bs.run_one(method, 100, 1, 10, Path(tmp), fluency=False, hparams=hp, label=label)
            rows.append({k: v for k, v in r.items() if k != "folder"})
            print(f"{r['method']}: {r['final']}", flush=True)
    return {"rows": rows}, "python -m benchmarks.bench_sequential --n 100 --b 1 --no-fluency"


def _run_sequential_large(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from benchmarks import bench_sequential as bs
    from lightning_rome.evaluation import fact_model_benchmark
    from lightning_rome.testing import get_fact_model

    fm = get_fact_model()
    n = 10_000
    try:
        fact_model_benchmark(fm, n)
    except ValueError as e:  # the message names how many known facts there are
        n = int(re.search(r"only (\d+) known facts", str(e))[1])  # type: ignore[index]
    n -= n % 10
    rows = []
    with tempfile.TemporaryDirectory(prefix="readme-seq-large-") as tmp:
        for method in ("alphaedit", "memit", "rome"):
            r = bs.run_one(method, n, 10, 8, Path(tmp), fluency=False)
            rows.append({k: v for k, v in r.items() if k != "folder"})
            print(f"{r['method']}: {r['final']}", flush=True)
    return {"rows": rows}, (f"python -m benchmarks.bench_sequential --n {n} --b 10 "
                            "--eval-every-edits 80 --no-fluency --alphaedit-l2")


def _run_key_modes(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    import torch

    from benchmarks import bench_rome_modes as bm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = []
    for name in args.models:
        bench = bm.load_bench(name, 200)  # as bench_rome_modes: max(single, sequential) + pool
        res = bm.run_modes(bench, 100, 100, 100)
        results.append(res)
        print(bm.table([res]), flush=True)
    return ({"results": results}, "python -m benchmarks.bench_rome_modes --models "
            + " ".join(args.models))


def _model_record(fm: Any) -> dict[str, Any]:
    cfg, kb = fm.config, fm.kb
    st = {k: v for k, v in fm.stats.items() if not isinstance(v, (list, dict))}
    return {**st, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
            "n_params": sum(p.numel() for p in fm.model.parameters()),
            "n_subjects": cfg.kb.n_subjects, "relations_per_subject": cfg.kb.relations_per_subject,
            "n_relations": len(cfg.kb.relations), "n_facts": len(kb.facts)}


def _run_fact_model(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    import torch

    from lightning_rome.editing import ROME
    from lightning_rome.stats import get_second_moment
    from lightning_rome.testing import DEEP_FACT_MODEL, edit_quality, get_fact_model

    torch.set_num_threads(1)
    fm = get_fact_model()
    deep = get_fact_model(DEEP_FACT_MODEL)
    corpus = list(fm.kb.text_corpus())
    cache: dict[str, Any] = {}

    def second_moment(model: Any, tok: Any, name: str) -> Any:
        if name not in cache:
            cache[name] = get_second_moment(model, tok, name, corpus=corpus, n_samples=2000,
                                            cache=False, progress=False).mom2
        return cache[name]

    reqs = fm.edit_requests(10, seed=0)
    rome = ROME("fact-model", second_moment=second_moment)
    patches = [rome.edit(fm.model, fm.tokenizer, [r]) for r in reqs]
    eff, para, spec = edit_quality(fm.model, fm.tokenizer, fm.kb, reqs, patches)
    return ({"fact": _model_record(fm), "deep": _model_record(deep),
             "rome": {"n": len(reqs), "efficacy": eff, "paraphrase": para,
                      "specificity": spec}},
            "get_fact_model(), get_fact_model(DEEP_FACT_MODEL), ROME('fact-model') on "
            "edit_requests(10, seed=0)")


SUMMARY_RE = re.compile(r"^(?:=+ )?(?P<body>\d+ (?:passed|failed|error|errors|skipped|"
                        r"deselected)\b.*?) in (?P<secs>[\d.]+)s", re.M)


def parse_pytest_summary(output: str) -> dict[str, Any]:
    """``{"passed", "failed", "deselected", "skipped", "seconds"}`` from pytest's last line,
    e.g. ``1665 passed, 20 deselected, 190 warnings in 589.06s (0:09:49)`` (``-q``) or
    ``==== 1651 passed, 20 deselected in 809.57s (0:13:29) ====``."""
    found = list(SUMMARY_RE.finditer(output))
    if not found:
        raise ValueError("no pytest summary line in the output")
    m = found[-1]
    counts = {k: 0 for k in ("passed", "failed", "errors", "deselected", "skipped")}
    for part in m["body"].split(","):
        n, _, what = part.strip().partition(" ")
        what = {"error": "errors", "warning": "warnings"}.get(what, what)
        if what in counts:
            counts[what] = int(n)
    return {**counts, "seconds": float(m["secs"])}


def _run_suite(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if not (RESULTS / "suite.json").is_file():
        # The suite checks that the README is the render of every record, this one included:
        # the very first run writes a provisional record (rendered as "not measured yet") for
        # the suite to check against, and replaces it with the measured one afterwards.
        write_result("suite", {"provisional": True}, provenance("(provisional)"))
        atomic_write_readme(render_readme(README.read_text(), strict=False))
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    proc.wait()
    res = parse_pytest_summary("".join(lines[-5:]))
    if proc.returncode != 0 or res["failed"] or res["errors"]:
        raise RuntimeError(f"the suite failed (rc {proc.returncode}): not recorded")
    return res, "make test (" + shlex.join(cmd[1:]) + ")"


#: The benchmark runs behind the README's highlights (the settings of benchmarks/RESULTS.md).
BENCH_ARGS: dict[str, list[str]] = {
    "vstar": ["--steps", "20", "--runs", "1", "--warmup", "1", "--threads", "1"],
    "memit": ["--batches", "1", "10", "100", "--runs", "2", "--threads", "1", "--published",
              "--solve-dims", "768", "--solve-sizes", "1", "--budget", "60"],
    "stats": ["--texts", "200", "--naive-texts", "2", "--multi-texts", "8", "--runs", "2",
              "--warmup", "0", "--threads", "1", "--no-ddp"],
}


def _run_benchmarks(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    import importlib

    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="readme-bench-") as tmp:
        for name, argv in BENCH_ARGS.items():
            out = Path(tmp) / f"{name}.json"
            importlib.import_module(f"benchmarks.bench_{name}").main([*argv, "--json", str(out)])
            data[name] = json.loads(out.read_text())[name]
    return data, "; ".join(f"python -m benchmarks.bench_{k} {shlex.join(v)}"
                           for k, v in BENCH_ARGS.items())


EVALUATION_ARGS = ["--cases", "4", "--runs", "1", "--warmup", "0", "--threads", "1"]


def _run_evaluation(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from benchmarks import bench_evaluation

    with tempfile.TemporaryDirectory(prefix="readme-eval-") as tmp:
        out = Path(tmp) / "evaluation.json"
        bench_evaluation.main([*EVALUATION_ARGS, "--json", str(out)])
        data = json.loads(out.read_text())["bench_evaluation"]
    return data, "python -m benchmarks.bench_evaluation " + shlex.join(EVALUATION_ARGS)


def _memit_scale() -> dict[str, Any]:
    from benchmarks.bench_memit_scale import run

    return run()


JOBS: dict[str, Callable[[argparse.Namespace], tuple[dict[str, Any], str]]] = {
    "demo": lambda a: _run_demo(a, first=False),
    "demo-first": lambda a: _run_demo(a, first=True),
    "sequential": _run_sequential,
    "sequential-large": _run_sequential_large,
    "key-modes": _run_key_modes,
    "suite": _run_suite,
    "fact-model": _run_fact_model,
    "memit-scale": lambda a: (_memit_scale(), "python -m benchmarks.bench_memit_scale"),
    "benchmarks": _run_benchmarks,
    "evaluation": _run_evaluation,
}


# --------------------------------------------------------------------------------------------
# The README
# --------------------------------------------------------------------------------------------

def wrap(text: str, width: int = 100) -> str:
    """Paragraphs wrapped at ``width`` columns; table rows (``|``) and blank lines kept."""
    import textwrap

    out = []
    for line in text.split("\n"):
        if not line.strip() or line.lstrip().startswith("|"):
            out.append(line)
        else:
            out.append(textwrap.fill(line, width, break_long_words=False,
                                     break_on_hyphens=False))
    return "\n".join(out)


def render_readme(text: str, folder: Path = RESULTS, strict: bool = True) -> str:
    """``text`` with every generated block re-rendered from the records in ``folder``. A block
    whose job has no record raises (``strict``) or keeps its text, with a notice."""
    found = [m["name"] for m in BLOCK_RE.finditer(text)]
    unknown = sorted(set(found) - set(BLOCKS))
    if unknown:
        raise ValueError(f"README blocks with no render: {unknown}")
    missing = sorted(set(BLOCKS) - set(found))
    if missing:
        raise ValueError(f"blocks missing from the README: {missing}")
    if len(found) != len(set(found)):
        raise ValueError("a README block appears twice")
    records: dict[str, dict[str, Any]] = {}

    def sub(m: re.Match[str]) -> str:
        block = BLOCKS[m["name"]]
        if block.job not in records:
            try:
                records[block.job] = read_result(block.job, folder)
            except FileNotFoundError as e:
                if strict:
                    raise
                print(f"block {m['name']} kept as it is: {e}", file=sys.stderr)
                return m[0]
        body = wrap(block.render(records[block.job]).rstrip("\n"))
        hint = f" (python -m benchmarks.readme_numbers --run {block.job})"
        return (f"<!-- numbers: {m['name']}{hint} -->\n{body}\n"
                f"<!-- /numbers: {m['name']} -->")

    return BLOCK_RE.sub(sub, text)


def atomic_write_readme(text: str) -> None:
    """Replace README.md atomically, keeping its permissions."""
    from lightning_rome.utils.io import atomic_write

    mode = README.stat().st_mode & 0o777
    atomic_write(README, lambda tmp: tmp.write_text(text))
    README.chmod(mode)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs="+", choices=sorted(JOBS), default=[],
                    help="run these jobs and record their results first")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when the README's blocks differ from their render")
    ap.add_argument("--list", action="store_true", help="list the jobs, blocks and records")
    ap.add_argument("--models", nargs="+", default=None, choices=("fact", "counterfact", "deep"),
                    help="key-modes: the models (default: fact counterfact deep)")
    args = ap.parse_args(argv)
    if args.models is not None and "key-modes" not in args.run:
        ap.error("--models applies to --run key-modes only")
    args.models = args.models or ["fact", "counterfact", "deep"]
    if args.list:
        for job in JOBS:
            blocks = [b for b, v in BLOCKS.items() if v.job == job]
            path = RESULTS / f"{job}.json"
            rec = (json.loads(path.read_text())["provenance"] if path.is_file() else None)
            print(f"{job:<12} blocks: {', '.join(blocks) or '-'}; record: "
                  + (f"{rec['commit']} {rec['date']}" if rec else "none"))
        return 0
    for job in args.run:
        print(f"=== {job} ===", flush=True)
        t0 = time.perf_counter()
        prov = provenance("")
        data, command = JOBS[job](args)
        prov["command"] = command
        path = write_result(job, data, prov)
        print(f"--- {job}: {time.perf_counter() - t0:.0f} s; recorded in {path}", flush=True)
    text = README.read_text()
    new = render_readme(text, strict=args.check)
    if args.check:
        if new != text:
            import difflib

            sys.stdout.writelines(difflib.unified_diff(
                text.splitlines(True), new.splitlines(True), "README.md", "rendered"))
            print("README.md differs from its generated numbers: run "
                  "`python -m benchmarks.readme_numbers`", file=sys.stderr)
            return 1
        print("README.md's generated numbers match their records")
        return 0
    if new != text:
        atomic_write_readme(new)
        print("README.md re-rendered")
    else:
        print("README.md unchanged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
