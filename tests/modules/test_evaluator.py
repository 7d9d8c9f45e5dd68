"""The COUNTERFACT / zsRE evaluation pipeline against hand computations, on a tiny peaked GPT-2
with the real GPT-2 tokenizer.

Every expected value here comes from a plain forward pass of one unpadded sequence and a float64
log-softmax (:func:`hand_nll`), with edits added to the weights by hand (:func:`hand_apply`), and
the metric values from their definitions (ALGORITHMS.md §5), never from the package's scoring,
patches or metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tiny_factories import tiny_model

from lightning_rome.data import CounterFactDataModule, EditCase, ZsREDataModule
from lightning_rome.modules.evaluator import (
    RECORD_FORMAT,
    CaseResultsFile,
    EditEvaluator,
    evaluate_cases,
    evaluate_sequential,
    load_results,
    make_metrics,
    model_checksum,
    record_checksum,
)
from lightning_rome.patches import LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import _host_rows, candidate_nll, candidate_scores

PARAM = "transformer.h.1.mlp.c_proj.weight"  # Conv1D: stored (d_ff, d) = (in, out)


# ---------------------------------------------------------------------------------- helpers
def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def fixed_delta(subject: str, d_out: int = 32, d_in: int = 128, scale: float = 1.0):
    """A deterministic rank-one delta per subject (canonical [out, in]): left (d_out, 1),
    right (1, d_in)."""
    g = torch.Generator().manual_seed(_seed(subject))
    return (torch.randn(d_out, 1, generator=g) * scale, torch.randn(1, d_in, generator=g))


class FixedEditor:
    """A cheap deterministic editor: a rank-one patch of layer 1's MLP output weight."""

    method = "fixed"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def edit(self, model, tokenizer, requests):
        (req,) = requests
        left, right = fixed_delta(req.subject, scale=self.scale)
        return WeightPatch.from_model(model, {PARAM: LowRankDelta(left, right)}, method="fixed",
                                      requests=[req])


class CountingEditor:
    """Wraps an editor; records the case ids it edits and the model's checksum at each call."""

    method = "fixed"

    def __init__(self, inner, fail_on=()) -> None:
        self.inner = inner
        self.calls: list = []
        self.checksums: list[str] = []
        self.fail_on = set(fail_on)

    def edit(self, model, tokenizer, requests):
        self.calls.append(requests[0].case_id)
        self.checksums.append(model_checksum(model))
        if requests[0].case_id in self.fail_on:
            raise RuntimeError(f"boom on case {requests[0].case_id}")
        return self.inner.edit(model, tokenizer, requests)


def hand_nll(model, tok, prompt: str, target: str) -> float:
    """Mean per-token NLL of ``" " + target`` after ``prompt``: one unpadded forward pass."""
    p = tok(prompt)["input_ids"]
    c = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, -1)
    return float(torch.stack([-logp[len(p) - 1 + j, c[j]] for j in range(len(c))]).mean())


def hand_correct(model, tok, prompt: str, target: str) -> list[bool]:
    """zsRE: is the argmax the answer token at each answer position (teacher forced)?"""
    p = tok(prompt)["input_ids"]
    c = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0]  # (T, V)
    return [int(logits[len(p) - 1 + j].argmax()) == c[j] for j in range(len(c))]


def hand_apply(model, subjects, scale: float = 1.0) -> None:
    """Add the fixed deltas to the weight directly (Conv1D stores Wᵀ)."""
    W = model.get_parameter(PARAM)
    with torch.no_grad():
        for s in subjects:
            left, right = fixed_delta(s, scale=scale)
            W += (left @ right).T


def hand_cf_metrics(model, tok, cases) -> dict[str, float]:
    """ES, EM, PS, PM, NS, NM, S by their definitions: per case over its prompts, then the mean
    over cases; S the harmonic mean of ES, PS and NS."""
    per = {k: [] for k in ("ES", "EM", "PS", "PM", "NS", "NM")}
    for c in cases:
        r = c.request
        for key, prompts, answers in (("E", c.rewrite_prompts, [r.target_true]),
                                      ("P", c.paraphrase_prompts,
                                       [r.target_true] * len(c.paraphrase_prompts))):
            pn = [math.exp(-hand_nll(model, tok, p, r.target_new)) for p in prompts]
            pt = [math.exp(-hand_nll(model, tok, p, a)) for p, a in zip(prompts, answers)]
            per[key + "S"].append(sum(a > b for a, b in zip(pn, pt)) / len(pn))
            per[key + "M"].append(sum(a - b for a, b in zip(pn, pt)) / len(pn))
        pn = [math.exp(-hand_nll(model, tok, p, r.target_new)) for p in c.neighborhood_prompts]
        pt = [math.exp(-hand_nll(model, tok, p, a))
              for p, a in zip(c.neighborhood_prompts, c.neighborhood_answers)]
        per["NS"].append(sum(b > a for a, b in zip(pn, pt)) / len(pn))
        per["NM"].append(sum(b - a for a, b in zip(pn, pt)) / len(pn))
    out = {k: sum(v) / len(v) for k, v in per.items()}
    es, ps, ns = out["ES"], out["PS"], out["NS"]
    out["S"] = 0.0 if min(es, ps, ns) == 0 else 3 / (1 / es + 1 / ps + 1 / ns)
    return out


def make_case(i: int, subject: str, prompt: str, new: str, true: str, **kw) -> EditCase:
    text = prompt.format(subject)
    return EditCase(
        EditRequest(prompt, subject, new, true, case_id=i),
        paraphrase_prompts=kw.get("para", (f"In short, {text}", f"Some say that {text}")),
        neighborhood_prompts=kw.get("nb", (f"The friend of {subject} said that {prompt.format('Paul')}",
                                           f"Neighbour {i} is")),
        neighborhood_answers=kw.get("nba", (true, true)),
        attribute_prompts=kw.get("attr", ()),
        generation_prompts=kw.get("gen", ()),
    )


CASES = [
    make_case(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    make_case(1, "Toko Yasuda", "{} plays the", "piano", "bass guitar"),
    make_case(2, "Edwin of Northumbria", "The official religion of {} is", "Islam",
              "Christianity"),
    make_case(3, "Autonomous University of Madrid", "{}, which is located in", "Sweden",
              "Spain"),
]


def rome_record(c: EditCase) -> dict:
    """``c`` in the schema of ROME's counterfact.json (neighbour answers: target_true)."""
    r = c.request
    return {"case_id": r.case_id, "requested_rewrite": {
        "prompt": r.prompt, "subject": r.subject, "relation_id": "P1",
        "target_new": {"str": r.target_new, "id": "Q1"},
        "target_true": {"str": r.target_true, "id": "Q2"}},
        "paraphrase_prompts": list(c.paraphrase_prompts),
        "neighborhood_prompts": list(c.neighborhood_prompts)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two threads
    contend badly."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def lm(gpt2_tokenizer):
    """A 2-layer, width-32 GPT-2 with a wide init (peaked, non-uniform outputs)."""
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.2,
                       n_positions=128)
    return model, gpt2_tokenizer


def trainer(tmp_path: Path, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, **kw)


def cf_datamodule(tmp_path: Path, cases, batch_size: int = 2) -> CounterFactDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rome_record(c) for c in cases]))
    return CounterFactDataModule(path, batch_size=batch_size, cache_dir=tmp_path / "hf")


def means(results: dict, prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v["mean"] for k, v in results.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------- scoring
def test_host_rows_share_prefixes():
    rows, row_of = _host_rows([(1, 2), (1, 2, 3), (1,), (4,), (1, 2, 3), (1, 5)])
    assert rows == [(1, 2, 3), (1, 5), (4,)]
    # (1, 2) and (1,) are read off (1, 2, 3); (1,) is also a prefix of (1, 5): either is fine.
    assert [rows[r] for r in row_of] == [(1, 2, 3), (1, 2, 3), (1, 2, 3), (4,), (1, 2, 3),
                                         (1, 5)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_candidate_scores_match_a_hand_computation(lm, side):
    model, tok = lm
    prompts = ["The mother tongue of Danielle Darrieux is"] * 3 + ["Paris is the capital of",
                                                                    "Rome"]
    cands = ["French", "French language", "the United States", "France", "Italy"]
    scores = candidate_scores(model, tok, prompts, cands, side=side, batch_size=2)
    nll_ref = candidate_nll(model, tok, prompts, cands)
    for p, c, s, ref in zip(prompts, cands, scores, nll_ref):
        ids_p = tok(p)["input_ids"]
        ids_c = tok(" " + c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids_p + ids_c])).logits[0].double()  # (T, V)
        logp = torch.log_softmax(logits, -1)
        rows = [len(ids_p) - 1 + j for j in range(len(ids_c))]
        want_nll = torch.stack([-logp[q, t] for q, t in zip(rows, ids_c)])
        want_arg = torch.stack([logp[q].argmax() for q in rows])
        torch.testing.assert_close(s.nll.double(), want_nll, rtol=1e-5, atol=1e-5)
        assert s.target.tolist() == ids_c
        assert s.argmax.tolist() == want_arg.tolist()
        assert s.correct.tolist() == [a == t for a, t in zip(want_arg.tolist(), ids_c)]
        torch.testing.assert_close(s.nll, ref, rtol=1e-5, atol=1e-6)
        assert s.prob == pytest.approx(math.exp(-float(want_nll.mean())), rel=1e-5)
    # Per-token correctness True where the argmax is the target: a copy of the model whose
    # final-norm bias is pushed along the embedding of " Paris" predicts it at every position
    # (checked with the plain forward pass), so "Paris Paris" is right twice and "Paris
    # France" once.
    paris = tok(" Paris", add_special_tokens=False)["input_ids"]
    france = tok(" France", add_special_tokens=False)["input_ids"]
    assert len(paris) == len(france) == 1
    boosted = tiny_model("gpt2", vocab_size=len(tok), initializer_range=0.2, n_positions=128)
    boosted.load_state_dict(model.state_dict())
    with torch.no_grad():
        e = boosted.transformer.wte.weight[paris[0]]  # (d,)
        boosted.transformer.ln_f.bias.add_(50 * e / e.norm())
    prompt = prompts[3]
    ids_p = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = boosted(torch.tensor([ids_p + paris + paris])).logits[0]  # (T, V)
    assert logits[len(ids_p) - 1:].argmax(-1).tolist() == paris * 3
    both, one = candidate_scores(boosted, tok, [prompt, prompt], ["Paris Paris", "Paris France"])
    assert both.target.tolist() == paris * 2 and one.target.tolist() == paris + france
    assert both.correct.tolist() == [True, True]
    assert one.correct.tolist() == [True, False]


# ---------------------------------------------------------------------------------- metrics
def test_pipeline_reproduces_hand_metrics_for_two_cases(lm, tmp_path):
    """Trainer.test on two COUNTERFACT cases (ROME's schema) gives the ES, EM, PS, PM, NS, NM, S
    of a hand computation, before and after the edits, and logs them to the logger."""
    model, tok = lm
    cases = CASES[:2]
    start = model_checksum(model)
    pre = hand_cf_metrics(model, tok, cases)
    post_each = []
    for c in cases:  # post: each case with its own delta added by hand
        probe = tiny_model("gpt2", vocab_size=len(tok), initializer_range=0.2, n_positions=128)
        probe.load_state_dict(model.state_dict())
        hand_apply(probe, [c.request.subject], scale=3.0)
        post_each.append(hand_cf_metrics(probe, tok, [c]))
    post = {k: sum(p[k] for p in post_each) / 2 for k in ("ES", "EM", "PS", "PM", "NS", "NM")}
    post["S"] = (0.0 if min(post["ES"], post["PS"], post["NS"]) == 0 else
                 3 / (1 / post["ES"] + 1 / post["PS"] + 1 / post["NS"]))
    assert pre != post  # the edits change the numbers
    ev = EditEvaluator(model, tok, FixedEditor(scale=3.0), results_dir=tmp_path / "res",
                       verbose=False)
    logger = CSVLogger(tmp_path, name="logs")
    trainer(tmp_path, logger=logger).test(ev, datamodule=cf_datamodule(tmp_path, cases))
    got_pre, got_post = means(ev.results["pre"], "pre/"), means(ev.results["post"], "post/")
    # Probabilities are ~1e-5 here (50,257 tokens), so the magnitudes get a relative tolerance
    # (float32 NLLs are good to ~1e-6 relative); the scores are exact fractions.
    for k in ("ES", "EM", "PS", "PM", "NS", "NM", "S"):
        assert got_pre[k] == pytest.approx(pre[k], rel=1e-4, abs=1e-12), k
        assert got_post[k] == pytest.approx(post[k], rel=1e-4, abs=1e-12), k
    assert ev.results["n_cases"] == 2 and ev.results["n_errors"] == 0
    assert model_checksum(model) == start
    # Per-case probabilities in the results file, against the hand computation.
    records, problems = CaseResultsFile.read(tmp_path / "res" / "cases.rank0.jsonl")
    assert not problems and [r["case_id"] for r in records] == [0, 1]
    r0 = records[0]
    want = math.exp(-hand_nll(model, tok, cases[0].request.text, "English"))
    assert r0["pre"]["rewrite"]["p_new"][0] == pytest.approx(want, rel=1e-5)
    left, right = fixed_delta(cases[0].request.subject, scale=3.0)
    assert r0["patch_norm"] == pytest.approx(float((left @ right).norm()), rel=1e-5)
    # Every metric went to the logger.
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    for k in ("pre/ES", "post/ES", "post/S", "post/NM", "edit/patch_norm", "edit/error_rate"):
        assert k in text
    # Summary files, written atomically, in the published layout.
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["post"]["post/ES"]["mean"] == post["ES"]
    md = (tmp_path / "res" / "summary.md").read_text()
    assert "| Editor" in md and "| S " in md and "fixed (pre-edit)" in md


def test_unedited_baseline_scores_pre_equal_post(lm, tmp_path):
    model, tok = lm
    records = evaluate_cases(model, tok, CASES[:2], None)
    assert [r["method"] for r in records] == ["none", "none"]
    assert all(r["pre"] == r["post"] and r["patch_norm"] is None for r in records)
    hand = hand_cf_metrics(model, tok, CASES[:2])
    metrics = {"post": make_metrics("counterfact", "post/")}
    evaluate_cases(model, tok, CASES[:2], None, metrics=metrics)
    for k, v in metrics["post"].compute().items():
        assert float(v) == pytest.approx(hand[k.split("/")[1]], rel=1e-4, abs=1e-12)


def test_cases_missing_prompt_kinds_only_update_what_they_have(lm):
    """A reduced COUNTERFACT case without a paraphrase counts in ES and NS but not in PS or S."""
    model, tok = lm
    bare = make_case(7, "Toko Yasuda", "{} plays the", "piano", "guitar", para=())
    metrics = {"post": make_metrics("counterfact", "post/")}
    evaluate_cases(model, tok, [CASES[0], bare], None, metrics=metrics)
    col = metrics["post"]
    assert int(col["ES"].compute_with_ci()["n"]) == 2
    assert int(col["PS"].compute_with_ci()["n"]) == 1
    assert int(col["S"].compute_with_ci()["n"]) == 1


def test_attribute_prompts_and_generation_are_recorded(lm):
    model, tok = lm
    case = make_case(5, "Toko Yasuda", "{} plays the", "piano", "guitar",
                     attr=("Attribute one is",), gen=("Toko Yasuda is known for", "I saw"))
    (r,) = evaluate_cases(model, tok, [case], FixedEditor(), generation=True,
                          generation_kwargs={"max_new_tokens": 5}, seed=3)
    assert len(r["post"]["attribute"]["p_new"]) == 1
    want = math.exp(-hand_nll(model, tok, "Attribute one is", "piano"))
    assert r["pre"]["attribute"]["p_new"][0] == pytest.approx(want, rel=1e-5)
    texts = r["post"]["generation"]["texts"]
    assert len(texts) == 2 and texts[0].startswith("Toko Yasuda is known for")
    # Seeded per case: the same texts again, whatever else is in the batch.
    (again,) = evaluate_cases(model, tok, [case], FixedEditor(), generation=True,
                              generation_kwargs={"max_new_tokens": 5}, seed=3)
    assert again["post"]["generation"] == r["post"]["generation"]
    metrics = {"post": make_metrics("counterfact", "post/", generation=True)}
    evaluate_cases(model, tok, [case], FixedEditor(), generation=True, metrics=metrics,
                   generation_kwargs={"max_new_tokens": 5})
    assert "post/GE" in {k for k, _ in metrics["post"].items(keep_base=False)}
    assert float(metrics["post"]["GE"].compute()) > 0


def test_generation_feeds_ge_and_rs(lm):
    """GE and RS get each case's generated texts, and RS its relation and target ids: their
    values equal the functional metrics on the texts stored in the records."""
    from lightning_rome.metrics import AttributeSnippets, TfidfTable
    from lightning_rome.metrics.functional import generation_entropy, reference_score

    model, tok = lm
    vocab = {w: i for i, w in enumerate(["piano", "guitar", "the", "plays", "music", "is"])}
    tfidf = TfidfTable([1.0, 1.2, 0.1, 0.5, 2.0, 0.2], vocab)
    snippets = AttributeSnippets([{"name": "Someone", "relation_id": "P1303", "target_id": "Q1",
                                   "samples": [{"name": "Someone",
                                                "text": "She plays the piano. Piano music."}]}])
    cases = [EditCase(c.request, paraphrase_prompts=c.paraphrase_prompts,
                      neighborhood_prompts=c.neighborhood_prompts,
                      neighborhood_answers=c.neighborhood_answers,
                      generation_prompts=("Toko Yasuda plays the", "Music is"),
                      relation_id="P1303", target_new_id="Q1") for c in CASES[:2]]
    metrics = {"post": make_metrics("counterfact", "post/", generation=True, tfidf=tfidf,
                                    snippets=snippets)}
    records = evaluate_cases(model, tok, cases, FixedEditor(), generation=True, metrics=metrics,
                             generation_kwargs={"max_new_tokens": 8})
    texts = [r["post"]["generation"]["texts"] for r in records]
    got = {k: float(v) for k, v in metrics["post"].compute().items()}
    assert got["post/GE"] == pytest.approx(float(generation_entropy(texts)), rel=1e-6)
    refs = [["She plays the piano. Piano music."]] * 2
    assert got["post/RS"] == pytest.approx(float(reference_score(texts, refs, tfidf)), rel=1e-6)


# ---------------------------------------------------------------------------------- zsRE
@pytest.mark.filterwarnings("ignore:zsRE. skipped 2 malformed")
def test_zsre_efficacy_equals_hand_computation(lm, tmp_path, shared_data):
    model, tok = lm
    dm = ZsREDataModule(shared_data / "zsre" / "zsre_mend_train_1k.json", limit=3, batch_size=2,
                        cache_dir=tmp_path / "hf")
    dm.setup("test")
    cases = list(dm.test_dataset.records)

    def acc(m, case_list, kind):
        vals = []
        for c in case_list:
            if kind == "efficacy":
                flags = hand_correct(m, tok, c.request.text, c.request.target_new)
            elif kind == "paraphrase":
                flags = hand_correct(m, tok, c.paraphrase_prompts[0], c.request.target_new)
            else:
                flags = hand_correct(m, tok, c.neighborhood_prompts[0], c.neighborhood_answers[0])
            vals.append(sum(flags) / len(flags))
        return sum(vals) / len(vals)

    pre = {k: acc(model, cases, k) for k in ("efficacy", "paraphrase", "specificity")}
    post = {k: 0.0 for k in pre}
    for c in cases:
        probe = tiny_model("gpt2", vocab_size=len(tok), initializer_range=0.2, n_positions=128)
        probe.load_state_dict(model.state_dict())
        hand_apply(probe, [c.request.subject], scale=3.0)
        for k in post:
            post[k] += acc(probe, [c], k) / len(cases)
    ev = EditEvaluator(model, tok, FixedEditor(scale=3.0), results_dir=tmp_path / "res",
                       verbose=False)
    trainer(tmp_path).test(ev, datamodule=dm)
    assert ev.kind == "zsre"
    for k in pre:
        assert means(ev.results["pre"], "pre/")[k] == pytest.approx(pre[k], abs=1e-9), k
        assert means(ev.results["post"], "post/")[k] == pytest.approx(post[k], abs=1e-9), k
    assert "| Editor" in (tmp_path / "res" / "summary.md").read_text()


# ---------------------------------------------------------------------------------- resume
def _run(model, tok, tmp_path, editor, cases=CASES, bs=2, **kw):
    ev = EditEvaluator(model, tok, editor, results_dir=tmp_path / "res", verbose=False, **kw)
    trainer(tmp_path).test(ev, datamodule=cf_datamodule(tmp_path, cases, bs))
    return ev


def test_resume_from_a_half_written_results_file(lm, tmp_path):
    model, tok = lm
    clean_editor = CountingEditor(FixedEditor())
    clean = _run(model, tok, tmp_path / "clean", clean_editor)
    assert clean_editor.calls == [0, 1, 2, 3]

    # Interrupted after two cases and half of the third line.
    folder = tmp_path / "clean" / "res"
    path = folder / "cases.rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    path.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    again = CountingEditor(FixedEditor())
    with pytest.warns(UserWarning, match="line 3: truncated line"):
        resumed = _run(model, tok, tmp_path / "clean", again)
    assert again.calls == [2, 3]  # only the missing cases were edited
    assert resumed.results["pre"] == clean.results["pre"]
    assert resumed.results["post"] == clean.results["post"]
    assert resumed.results["n_cases"] == 4
    records, problems = CaseResultsFile.read(path)
    assert not problems and sorted(r["case_id"] for r in records) == [0, 1, 2, 3]

    # A line whose values were altered (valid JSON) fails its checksum and is redone.
    lines = path.read_text().splitlines(keepends=True)
    rec = json.loads(lines[0])
    rec["post"]["rewrite"]["p_new"][0] = 0.999
    lines[0] = json.dumps(rec) + "\n"
    path.write_text("".join(lines))
    third = CountingEditor(FixedEditor())
    with pytest.warns(UserWarning, match="checksum mismatch"):
        resumed = _run(model, tok, tmp_path / "clean", third)
    assert third.calls == [rec["case_id"]]
    assert resumed.results["post"] == clean.results["post"]

    # Nothing left to do: no edits at all, same numbers.
    fourth = CountingEditor(FixedEditor())
    done = _run(model, tok, tmp_path / "clean", fourth)
    assert fourth.calls == [] and done.results["post"] == clean.results["post"]


def test_resume_refuses_other_settings_and_restarts_when_asked(lm, tmp_path):
    model, tok = lm
    _run(model, tok, tmp_path, FixedEditor(), cases=CASES[:2])
    with pytest.raises(ValueError, match=r"different run.*method"):
        _run(model, tok, tmp_path, None, cases=CASES[:2])
    counting = CountingEditor(FixedEditor())
    _run(model, tok, tmp_path, counting, cases=CASES[:2], resume=False)
    assert counting.calls == [0, 1]


NO_RESUME = r"resume=False \(CLI: --no-resume\)"


@pytest.mark.filterwarnings("ignore:zsRE. skipped 2 malformed")
def test_resume_refuses_another_dataset_with_the_same_case_ids(lm, tmp_path, shared_data):
    """zsRE, then COUNTERFACT into the same folder: the stored zsRE records have the ids of the
    COUNTERFACT cases, and were once fed into the COUNTERFACT summary."""
    model, tok = lm
    zsre = ZsREDataModule(shared_data / "zsre" / "zsre_mend_train_1k.json", limit=2,
                          batch_size=2, cache_dir=tmp_path / "hf")
    ev = EditEvaluator(model, tok, FixedEditor(), results_dir=tmp_path / "res", verbose=False)
    trainer(tmp_path).test(ev, datamodule=zsre)
    ids = {r["case_id"] for r in CaseResultsFile.read(tmp_path / "res" / "cases.rank0.jsonl")[0]}
    cases = [c for c in CASES if c.case_id in ids]
    assert cases  # the same ids in both datasets
    counting = CountingEditor(FixedEditor())
    with pytest.raises(ValueError, match=rf"the dataset \(dataset: 'zsre' -> 'counterfact'\).*"
                                         rf"{NO_RESUME}"):
        _run(model, tok, tmp_path, counting, cases=cases)
    assert counting.calls == []
    # With plain dataloaders (no DataModule to name the dataset before the run), the per-case
    # fingerprints refuse when the case comes up: the stored record is from the zsRE source.
    zsre.setup("test")
    cf = cf_datamodule(tmp_path, cases)
    cf.setup("test")
    ev = EditEvaluator(model, tok, FixedEditor(), results_dir=tmp_path / "res2", verbose=False)
    trainer(tmp_path).test(ev, dataloaders=zsre.test_dataloader())
    ev = EditEvaluator(model, tok, FixedEditor(), results_dir=tmp_path / "res2", verbose=False)
    with pytest.raises(ValueError, match=rf"case {cases[0].case_id!r} computed from other data "
                                         rf"\(it comes from the 'zsre' dataset.*{NO_RESUME}"):
        trainer(tmp_path).test(ev, dataloaders=cf.test_dataloader())
    assert ev.results == {}  # no summary was written from the mixed records


def test_resume_refuses_changed_case_data(lm, tmp_path):
    import dataclasses

    model, tok = lm
    _run(model, tok, tmp_path, FixedEditor(), cases=CASES[:2])
    changed = dataclasses.replace(CASES[1], paraphrase_prompts=("A different paraphrase of it",))
    with pytest.raises(ValueError, match=rf"case 1 computed from other data \(its prompts or "
                                         rf"answers differ\).*{NO_RESUME}"):
        _run(model, tok, tmp_path, FixedEditor(), cases=[CASES[0], changed])
    other_target = make_case(1, CASES[1].request.subject, CASES[1].request.prompt, "Klingon",
                             CASES[1].request.target_true)
    with pytest.raises(ValueError, match=r"case 1 computed from other data \(its edit request"):
        _run(model, tok, tmp_path, FixedEditor(), cases=[CASES[0], other_target])


def test_resume_refuses_changed_weights_at_the_same_path(lm, tmp_path):
    model, tok = lm
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)

    def run(editor):
        ev = EditEvaluator(str(path), editor=editor, results_dir=tmp_path / "res", verbose=False)
        trainer(tmp_path).test(ev, datamodule=cf_datamodule(tmp_path, CASES[:2]))
        return ev

    first = run(CountingEditor(FixedEditor()))
    # The same model, unchanged: resumed, nothing edited again, the same numbers.
    again = CountingEditor(FixedEditor())
    assert run(again).results["post"] == first.results["post"] and again.calls == []
    # Other weights under the same name and size.
    other = tiny_model("gpt2", vocab_size=len(tok), initializer_range=0.2, n_positions=128)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    other.save_pretrained(path)
    counting = CountingEditor(FixedEditor())
    with pytest.raises(ValueError, match=rf"the model's weights \(model_sha256: '[0-9a-f]{{12}}…' "
                                         rf"-> '[0-9a-f]{{12}}…'\).*{NO_RESUME}"):
        run(counting)
    assert counting.calls == []
    # Starting over as the message says evaluates everything on the new weights.
    ev = EditEvaluator(str(path), editor=counting, results_dir=tmp_path / "res", verbose=False,
                       resume=False)
    trainer(tmp_path).test(ev, datamodule=cf_datamodule(tmp_path, CASES[:2]))
    assert counting.calls == [0, 1]
    assert ev.results["pre"] != first.results["pre"]


def test_resume_refuses_other_editor_settings_and_package_versions(lm, tmp_path, monkeypatch):
    import lightning_rome

    model, tok = lm
    _run(model, tok, tmp_path, FixedEditor(scale=3.0), cases=CASES[:2])
    with pytest.raises(ValueError, match=r"the editor or its hyperparameters \(editor: "
                                         rf"settings.scale\).*{NO_RESUME}"):
        _run(model, tok, tmp_path, FixedEditor(scale=1.0), cases=CASES[:2])
    monkeypatch.setattr(lightning_rome, "__version__", "99.0")
    with pytest.raises(ValueError, match=r"the lightning_rome version \(package_version: "
                                         r"'0\.\d+\.\d+' -> '99\.0'\)"):
        _run(model, tok, tmp_path, FixedEditor(scale=3.0), cases=CASES[:2])


def test_results_file_roundtrip_and_validation(tmp_path):
    path = tmp_path / "r.jsonl"
    rec = {"format": RECORD_FORMAT, "case_id": "a", "status": "ok", "x": [1.5, float("inf")]}
    with CaseResultsFile(path) as f:
        f.append(rec)
        f.append({**rec, "case_id": 2})
    records, problems = CaseResultsFile.read(path)
    assert [r["case_id"] for r in records] == ["a", 2] and not problems
    assert records[0]["checksum"] == record_checksum(records[0])
    path.write_text(path.read_text() + f'{{"format": {RECORD_FORMAT}, "case_id": 3, '
                    '"checksum": "00"}\n{"form')
    records, problems = CaseResultsFile.read(path)
    assert len(records) == 2
    assert problems == [(3, "checksum mismatch (case 3)"), (4, "truncated line")]
    with CaseResultsFile(path) as f:  # appending after a cut line starts a new line
        f.append({**rec, "case_id": 5})
    records, problems = CaseResultsFile.read(path)
    assert [r["case_id"] for r in records] == ["a", 2, 5]
    assert problems == [(3, "checksum mismatch (case 3)"), (4, "not valid JSON")]
    with pytest.warns(UserWarning):
        stored = load_results(tmp_path, "r.jsonl")
    assert set(stored) == {'"a"', "2", "5"}  # 2 and "2" would be different keys
    assert len(path.read_text().splitlines()) == 3  # repaired atomically


# ---------------------------------------------------------------------------------- weights
def test_weights_restored_exactly_after_every_case(lm, tmp_path):
    model, tok = lm
    start = model_checksum(model)
    counting = CountingEditor(FixedEditor(scale=5.0))
    _run(model, tok, tmp_path, counting, verify_revert=True)
    # The editor saw the original weights at the start of every case, and they are back.
    assert counting.checksums == [start] * 4
    assert model_checksum(model) == start


class LeakyEditor(FixedEditor):
    """Breaks the editor contract: changes a weight outside its patch."""

    def edit(self, model, tokenizer, requests):
        with torch.no_grad():
            model.get_parameter("transformer.ln_f.bias").add_(1e-3)
        return super().edit(model, tokenizer, requests)


def test_verify_revert_catches_a_weight_left_changed(gpt2_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.2,
                       n_positions=128)
    with pytest.raises(RuntimeError, match="not restored exactly after case 0"):
        evaluate_cases(model, gpt2_tokenizer, CASES[:2], LeakyEditor(), verify_revert=True)


def test_on_error_raise_leaves_the_model_intact(lm, tmp_path):
    model, tok = lm
    start = model_checksum(model)
    failing = CountingEditor(FixedEditor(), fail_on={1})
    with pytest.raises(RuntimeError, match="boom on case 1"):
        _run(model, tok, tmp_path, failing)
    assert model_checksum(model) == start
    records, _ = CaseResultsFile.read(tmp_path / "res" / "cases.rank0.jsonl")
    assert [r["case_id"] for r in records] == [0]  # case 1 not recorded: a rerun redoes it


def test_on_error_skip_records_the_error_and_goes_on(lm, tmp_path):
    model, tok = lm
    start = model_checksum(model)
    failing = CountingEditor(FixedEditor(), fail_on={1})
    with pytest.warns(UserWarning, match="case 1 failed and is skipped: RuntimeError"):
        ev = _run(model, tok, tmp_path, failing, on_error="skip")
    assert failing.calls == [0, 1, 2, 3]
    assert model_checksum(model) == start
    records, _ = CaseResultsFile.read(tmp_path / "res" / "cases.rank0.jsonl")
    bad = [r for r in records if r["status"] == "error"]
    assert [r["case_id"] for r in bad] == [1]
    assert "RuntimeError: boom on case 1" in bad[0]["error"] and bad[0]["post"] is None
    assert ev.results["n_cases"] == 4 and ev.results["n_errors"] == 1
    # The metrics cover the three good cases only.
    good = [c for c in CASES if c.case_id != 1]
    metrics = {"post": make_metrics("counterfact", "post/")}
    evaluate_cases(model, tok, good, FixedEditor(), metrics=metrics)
    assert ev.results["post"]["post/EM"]["mean"] == pytest.approx(
        float(metrics["post"]["EM"].compute()), rel=1e-6)
    assert ev.results["post"]["post/EM"]["n"] == 3


def test_a_failure_while_edited_reverts_first(lm, monkeypatch):
    """Scoring fails while the patch is applied: the model is restored before the error goes
    on (raise) or is recorded (skip)."""
    import lightning_rome.evaluation.run as evaluator

    model, tok = lm
    start = model_checksum(model)
    real = evaluator.score_cases
    seen = []

    def flaky(m, *args, **kwargs):
        seen.append(model_checksum(m))
        if len(seen) == 2:  # the post-edit scoring of the first case
            raise FloatingPointError("scoring failed")
        return real(m, *args, **kwargs)

    monkeypatch.setattr(evaluator, "score_cases", flaky)
    with pytest.raises(FloatingPointError):
        evaluate_cases(model, tok, CASES[:2], FixedEditor())
    assert seen[1] != start and model_checksum(model) == start  # it was edited, then restored
    seen.clear()
    with pytest.warns(UserWarning, match="case 0 failed and is skipped"):
        records = evaluate_cases(model, tok, CASES[:2], FixedEditor(), on_error="skip")
    assert [r["status"] for r in records] == ["error", "ok"]
    assert records[0]["error"] == "FloatingPointError: scoring failed"
    assert model_checksum(model) == start


def test_bad_inputs_are_refused(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="no target_true"):
        evaluate_cases(model, tok, [EditCase(EditRequest("{} is", "X", "Y"))], None)
    with pytest.raises(ValueError, match="on_error"):
        evaluate_cases(model, tok, CASES[:1], None, on_error="ignore")
    with pytest.raises(TypeError, match="edit"):
        evaluate_cases(model, tok, CASES[:1], object())
    with pytest.raises(ValueError, match="unknown editing method"):
        evaluate_cases(model, tok, CASES[:1], "no-such-method")
    with pytest.raises(ValueError, match="mode"):
        EditEvaluator(model, tok, mode="parallel")


@pytest.mark.parametrize("label", ["..", ".", "", "a/b", "../x", "a\\b", "/abs", "x\0y"])
def test_path_like_labels_are_refused(lm, tmp_path, label):
    model, tok = lm
    with pytest.raises(ValueError, match="label"):
        EditEvaluator(model, tok, FixedEditor(), label=label)
    # A label that is only unusual characters is fine: it names the summary row as given, and
    # its folder under default_root_dir/edit_eval stays inside that folder.
    ev = EditEvaluator(model, tok, FixedEditor(), label="ROME (gpt2) v1.0", verbose=False)
    trainer(tmp_path).test(ev, datamodule=cf_datamodule(tmp_path / "data", CASES[:1]))
    assert ev.results_dir.parent == tmp_path / "edit_eval"
    assert ev.results["label"] == "ROME (gpt2) v1.0"


def test_editor_by_name_and_model_by_path(lm, tmp_path):
    from lightning_rome.editing import ROME

    model, tok = lm
    ev = EditEvaluator(model, tok, "rome", {"layer": 1, "v_num_grad_steps": 3})
    assert isinstance(ev.editor, ROME) and ev.editor.hparams.layer == 1
    assert ev.method == "rome" and ev.label == "rome"
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ev = EditEvaluator(str(tmp_path / "m"), editor=None)
    assert ev.method == "none" and ev.tokenizer is not None
    assert model_checksum(ev.model) == model_checksum(model)
    with pytest.raises(ValueError, match="hparams"):
        EditEvaluator(model, tok, FixedEditor(), {"layer": 1})


# ---------------------------------------------------------------------------------- sequential
def test_sequential_edits_are_evaluated_together_then_reverted(lm, tmp_path):
    model, tok = lm
    start = model_checksum(model)
    cases = CASES[:3]
    counting = CountingEditor(FixedEditor(scale=2.0))
    records = evaluate_sequential(model, tok, cases, counting)
    assert model_checksum(model) == start
    # Each edit was computed on the model holding the previous ones.
    assert counting.checksums[0] == start and len(set(counting.checksums)) == 3
    assert all(r["group"] == [0, 1, 2] for r in records)
    # Post scores: the model with all three deltas added by hand.
    probe = tiny_model("gpt2", vocab_size=len(tok), initializer_range=0.2, n_positions=128)
    probe.load_state_dict(model.state_dict())
    hand_apply(probe, [c.request.subject for c in cases], scale=2.0)
    for c, r in zip(cases, records):
        want = math.exp(-hand_nll(probe, tok, c.request.text, c.request.target_new))
        assert r["post"]["rewrite"]["p_new"][0] == pytest.approx(want, rel=1e-4)
        base = math.exp(-hand_nll(model, tok, c.request.text, c.request.target_new))
        assert r["pre"]["rewrite"]["p_new"][0] == pytest.approx(base, rel=1e-5)
    # The LightningModule's sequential mode: each test batch is one group.
    ev = _run(model, tok, tmp_path, FixedEditor(scale=2.0), cases=cases, mode="sequential",
              bs=3)
    got, problems = CaseResultsFile.read(Path(str(ev.results_dir)) / "cases.rank0.jsonl")
    assert not problems and sorted(r["case_id"] for r in got) == [0, 1, 2]
    by_id = {r["case_id"]: r for r in got}
    for r in records:
        assert by_id[r["case_id"]]["post"] == r["post"]
    assert model_checksum(model) == start


def test_sequential_resume_redoes_an_incomplete_group(lm, tmp_path):
    model, tok = lm
    cases = CASES[:4]
    # The same editor both times (a wrapper is another editor to the results' fingerprint).
    first = _run(model, tok, tmp_path, CountingEditor(FixedEditor()), cases=cases,
                 mode="sequential", bs=2)
    path = tmp_path / "res" / "cases.rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))  # the second group lost its last line
    counting = CountingEditor(FixedEditor())
    with pytest.warns(UserWarning, match="incomplete sequential groups"):
        again = _run(model, tok, tmp_path, counting, cases=cases, mode="sequential", bs=2)
    assert counting.calls == [2, 3]
    assert again.results["post"] == first.results["post"]


# ---------------------------------------------------------------------------------- DDP
class ChecksumEvaluator(EditEvaluator):
    """Writes, per rank, the model checksum at the start and end of the test."""

    def on_test_start(self) -> None:
        self._start = model_checksum(self.model)
        super().on_test_start()

    def on_test_end(self) -> None:
        super().on_test_end()
        out = Path(str(self.results_dir)) / f"check.rank{self.global_rank}.json"
        out.write_text(json.dumps({"start": self._start, "end": model_checksum(self.model),
                                   "world": self.trainer.world_size}))


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_ranks_evaluate_disjoint_cases_and_metrics_sync(lm, tmp_path):
    model, tok = lm
    cases = [*CASES, make_case(4, "Wellington", "The twin city of {} is", "Sheffield", "Sydney")]
    single = _run(model, tok, tmp_path / "single", FixedEditor(), cases=cases)
    ev = ChecksumEvaluator(model, tok, FixedEditor(), results_dir=tmp_path / "ddp" / "res",
                           verify_revert=True, verbose=False)
    tr = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, default_root_dir=tmp_path / "ddp")
    tr.test(ev, datamodule=cf_datamodule(tmp_path / "ddp", cases, batch_size=2))
    folder = tmp_path / "ddp" / "res"
    ids = []
    for r in range(2):
        records, problems = CaseResultsFile.read(folder / f"cases.rank{r}.jsonl")
        assert not problems and records
        ids.append([x["case_id"] for x in records])
        check = json.loads((folder / f"check.rank{r}.json").read_text())
        assert check["world"] == 2 and check["start"] == check["end"]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == [0, 1, 2, 3, 4]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n_cases"] == 5
    for phase in ("pre", "post"):
        for k, v in single.results[phase].items():
            assert summary[phase][k]["mean"] == pytest.approx(v["mean"], abs=1e-9), k
            assert summary[phase][k]["n"] == v["n"]
