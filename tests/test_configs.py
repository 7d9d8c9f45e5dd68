"""The YAML presets in configs/: every full-size config parses (without loading a model), and its
tiny offline variant runs through the real LightningCLI (``lightning_rome.cli.main``) on the
fact model and a handful of cases from the shared data folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from testutils import REPO, SHARED_DATA

from lightning_rome.cli import main

CONFIGS = REPO / "configs"
pytestmark = pytest.mark.skipif(not (SHARED_DATA / "counterfact").is_dir(),
                                reason="needs the shared data folder")

#: config -> (subcommand, class of the module, of the datamodule, the hub model it names)
FULL = {
    "rome-gpt2xl-counterfact.yaml": ("test", "EditEvaluator", "CounterFactDataModule", "gpt2-xl"),
    "rome-gptj-counterfact.yaml": ("test", "EditEvaluator", "CounterFactDataModule",
                                   "EleutherAI/gpt-j-6B"),
    "memit-gpt2xl-counterfact.yaml": ("test", "EditEvaluator", "CounterFactDataModule",
                                      "gpt2-xl"),
    "memit-gptj-counterfact.yaml": ("test", "EditEvaluator", "CounterFactDataModule",
                                    "EleutherAI/gpt-j-6B"),
    "rome-gpt2xl-zsre.yaml": ("test", "EditEvaluator", "ZsREDataModule", "gpt2-xl"),
    "mend-cf-gpt2xl.yaml": ("fit", "MENDModule", "CounterFactDataModule", "gpt2-xl"),
    "ke-cf-gpt2xl.yaml": ("fit", "KEModule", "CounterFactDataModule", "gpt2-xl"),
    "trace-gpt2xl-known.yaml": ("test", "CausalTracer", "KnownFactsDataModule", "gpt2-xl"),
}
#: the papers' hyperparameters each evaluation config must name (the preset, see presets/*.yaml)
PRESET = {"rome-gpt2xl-counterfact.yaml": ("rome", "gpt2-xl"),
          "rome-gptj-counterfact.yaml": ("rome", "gpt-j-6b"),
          "memit-gpt2xl-counterfact.yaml": ("memit", "gpt2-xl"),
          "memit-gptj-counterfact.yaml": ("memit", "gpt-j-6b"),
          "rome-gpt2xl-zsre.yaml": ("rome", "gpt2-xl")}


@pytest.fixture(scope="module")
def fact_model_path() -> str:
    from lightning_rome.testing import get_fact_model

    return str(get_fact_model().path)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder: the configs write to outputs/... relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _no_model_loading(monkeypatch):
    import lightning_rome.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded while only parsing a config")

    monkeypatch.setattr(loading, "load_model", refuse)


# ------------------------------------------------------------------------------ parsing
def test_every_preset_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(FULL)
    tiny = {p.name for p in (CONFIGS / "tiny").glob("*.yaml")}
    assert tiny == {"rome-counterfact.yaml", "memit-counterfact.yaml", "rome-zsre.yaml",
                    "mend-cf.yaml", "ke-cf.yaml", "trace-known.yaml",
                    "sequential-fact-alphaedit.yaml"}  # run by tests/evaluation/


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_config_parses_without_loading_the_model(name, monkeypatch, capsys):
    sub, module, data, hub = FULL[name]
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main([sub, "--config", str(CONFIGS / name), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    # Short class paths resolved to the package's classes.
    assert cfg["model"]["class_path"].startswith("lightning_rome.")
    assert cfg["model"]["class_path"].endswith("." + module)
    assert cfg["data"]["class_path"].endswith("." + data)
    assert cfg["model"]["init_args"]["model"] == hub
    if name in PRESET:
        method, preset = PRESET[name]
        assert cfg["model"]["init_args"]["editor"] == method
        assert cfg["model"]["init_args"]["hparams"] == preset


@pytest.mark.parametrize("name", ["mend-cf-gpt2xl.yaml", "ke-cf-gpt2xl.yaml"])
def test_hypernetwork_configs_name_the_published_settings(name, monkeypatch, capsys):
    from lightning_rome.editing.hypernet import KEHyperParams, MENDHyperParams

    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["init_args"]["hparams"] == "gpt2-xl"
    assert cfg["data"]["init_args"]["mode"] == "edit_train"
    hp = (MENDHyperParams if "mend" in name else KEHyperParams).from_preset("gpt2-xl")
    assert hp.layers == [45, 46, 47]  # the last three MLP layers of GPT-2 XL's 48
    if "mend" in name:
        assert (hp.rank, hp.lr, hp.lr_alpha, hp.edit_lr) == (1920, 1e-6, 1e-4, 1e-4)


def test_lightning_help_lists_the_package_classes(capsys):
    assert main(["test", "--model.help", "EditEvaluator"]) == 0
    out = capsys.readouterr().out
    for arg in ("--model.editor", "--model.hparams", "--model.results_dir", "--model.mode"):
        assert arg in out
    # Short: the arguments and their docs, not every torch.nn subclass that fits `model`.
    assert len(out.splitlines()) < 100 and "torch.nn.Identity" not in out
    assert "(default: 'independent')" in out and "--model.model: nn.Module | str (required)" in out
    assert main(["fit", "--trainer.callbacks.help", "ROMECallback"]) == 0
    assert "--trainer.callbacks.requests" in capsys.readouterr().out
    assert main(["test", "--data.help=KnownFactsDataModule"]) == 0
    assert "--data.limit" in capsys.readouterr().out
    assert main(["test", "--model.help", "NoSuchModule"]) == 2
    assert "unknown class 'NoSuchModule'" in capsys.readouterr().err


def test_a_python_tag_in_a_config_is_one_line(tmp_path, capsys):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model:\n  class_path: EditEvaluator\n  init_args:\n"
                    "    model: !!python/object/apply:os.system ['echo hi']\n")
    assert main(["test", "--config", str(evil)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "python/object" in err and "line 4" in err


def test_nested_hparams_overrides_merge_with_the_preset(monkeypatch, capsys):
    """``--model.init_args.hparams.FIELD VALUE`` replaces one field of the config's preset (the
    rest of the preset is kept) and reaches the module."""
    import lightning_rome.models.loading as loading
    import lightning_rome.modules.evaluator as ev

    seen = {}

    def fake_resolve_editor(editor, hparams=None):
        seen["hparams"] = hparams
        raise ValueError("stop here")

    monkeypatch.setattr(loading, "resolve_model", lambda model, tok=None: (None, None))
    monkeypatch.setattr(ev, "resolve_editor", fake_resolve_editor)
    assert main(["test", "--config", str(CONFIGS / "rome-gpt2xl-counterfact.yaml"),
                 "--config", str(CONFIGS / "tiny" / "rome-counterfact.yaml"),
                 "--model.init_args.hparams.fact_token", "last", "--model.hparams.layer=2"]) == 2
    assert "stop here" in capsys.readouterr().err
    from lightning_rome.editing.hparams import load_preset_file

    assert seen["hparams"] == {**load_preset_file("rome")["fact-model"], "fact_token": "last",
                               "layer": 2}
    assert main(["test", "--config", str(CONFIGS / "rome-gpt2xl-counterfact.yaml"),
                 "--model.init_args.hparams", "nope", "--model.hparams.layer", "1"]) == 2
    assert "unknown rome preset 'nope'" in capsys.readouterr().err


def test_a_missing_data_file_is_one_line(in_tmp, fact_model_path, capsys):
    rc = main(["test", "--config", str(CONFIGS / "rome-gpt2xl-counterfact.yaml"),
               "--config", str(CONFIGS / "tiny" / "rome-counterfact.yaml"),
               "--model.init_args.model", fact_model_path,
               "--data.init_args.path", str(in_tmp / "nope.json")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-rome test: error: FileNotFoundError")


# ------------------------------------------------------------------------------ tiny runs
def _run_tiny(full: str, tiny: str, model: str, *extra: str) -> None:
    sub = FULL[full][0]
    rc = main([sub, "--config", str(CONFIGS / full), "--config", str(CONFIGS / "tiny" / tiny),
               "--model.init_args.model", model, *extra])
    assert rc == 0


def _records(results: Path) -> list[dict]:
    lines = (results / "cases.rank0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _check_counterfact(results: Path, n: int) -> dict:
    summary = json.loads((results / "summary.json").read_text())
    assert summary["n_cases"] == n and summary["n_errors"] == 0
    for phase in ("pre", "post"):
        for key in ("ES", "PS", "NS", "S"):
            v = summary[phase][f"{phase}/{key}"]["mean"]
            assert 0.0 <= v <= 1.0
        for key in ("EM", "PM", "NM"):
            assert -1.0 <= summary[phase][f"{phase}/{key}"]["mean"] <= 1.0
    # ES recomputed from the per-case probabilities: P[o*] > P[o^c] on the rewrite prompt.
    records = _records(results)
    assert len(records) == n
    es = [sum(a > b for a, b in zip(r["post"]["rewrite"]["p_new"], r["post"]["rewrite"]["p_true"]))
          / len(r["post"]["rewrite"]["p_new"]) for r in records]
    assert summary["post"]["post/ES"]["mean"] == pytest.approx(sum(es) / n)
    norm = summary["edit"]["edit/patch_norm"]["mean"]
    assert math.isfinite(norm) and norm > 0
    return summary


def _events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list(logdir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    return acc


def _scalars(logdir: Path) -> dict[str, float]:
    acc = _events(logdir)
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("full", ["rome-gpt2xl-counterfact.yaml", "rome-gptj-counterfact.yaml"])
def test_tiny_rome_counterfact(full, in_tmp, fact_model_path):
    _run_tiny(full, "rome-counterfact.yaml", fact_model_path)
    out = in_tmp / "outputs" / full.removesuffix(".yaml")
    summary = _check_counterfact(out / "results", 3)
    assert summary["method"] == "rome"
    logged = _scalars(out / "tb")
    assert logged["post/ES"] == pytest.approx(summary["post"]["post/ES"]["mean"], abs=1e-6)
    assert "pre/NS" in logged and "edit/patch_norm" in logged
    # No clutter: no hp_metric placeholder, no per-batch scalars; the summary table as text.
    assert "hp_metric" not in logged and not any(t.endswith("_batch") for t in logged), logged
    assert any(t.startswith("summary/ROME") for t in _events(out / "tb").Tags()["tensors"])
    header = json.loads((out / "results" / "run.json").read_text())
    assert header["hparams"]["layer"] == 0  # the tiny override replaced the gpt2-xl preset


@pytest.mark.timeout(300)
@pytest.mark.parametrize("full", ["memit-gpt2xl-counterfact.yaml", "memit-gptj-counterfact.yaml"])
def test_tiny_memit_counterfact(full, in_tmp, fact_model_path):
    _run_tiny(full, "memit-counterfact.yaml", fact_model_path)
    results = in_tmp / "outputs" / full.removesuffix(".yaml") / "results"
    summary = _check_counterfact(results, 3)
    assert summary["method"] == "memit"
    for r in _records(results):  # MEMIT wrote both layers of R
        assert r["status"] == "ok"


@pytest.mark.timeout(300)
def test_tiny_rome_zsre(in_tmp, fact_model_path):
    _run_tiny("rome-gpt2xl-zsre.yaml", "rome-zsre.yaml", fact_model_path)
    results = in_tmp / "outputs" / "rome-gpt2xl-zsre" / "results"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["dataset"] == "zsre" and summary["n_cases"] == 3
    post = {k.removeprefix("post/"): v["mean"] for k, v in summary["post"].items()}
    assert {"efficacy", "paraphrase", "specificity"} <= set(post)
    for v in post.values():
        assert 0.0 <= v <= 1.0
    # Efficacy recomputed: the mean token accuracy of the new answer on the rewrite prompt.
    records = _records(results)
    acc = [sum(r["post"]["rewrite"]["correct_new"][0]) / len(r["post"]["rewrite"]["correct_new"][0])
           for r in records]
    assert post["efficacy"] == pytest.approx(sum(acc) / len(acc))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["mend", "ke"])
def test_tiny_hypernetwork_training_writes_a_usable_checkpoint(method, in_tmp, fact_model_path):
    from lightning_rome import EditRequest
    from lightning_rome.editing.hypernet import KE, MEND
    from lightning_rome.models import load_model

    full = f"{method}-cf-gpt2xl.yaml"
    _run_tiny(full, f"{method}-cf.yaml", fact_model_path,
              "--data.init_args.tokenizer", fact_model_path)
    out = in_tmp / "outputs" / full.removesuffix(".yaml")
    ckpts = sorted(out.rglob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in ckpts)
    logged = _scalars(out / "tb")
    assert math.isfinite(logged["train/loss"]) and math.isfinite(logged["val/loss"])
    # The checkpoint holds an editor for this model: it edits the two configured layers.
    model, tok = load_model(fact_model_path)
    ckpt = next(p for p in ckpts if p.name == "last.ckpt")
    editor = (MEND.from_checkpoint(ckpt, model) if method == "mend"
              else KE.from_checkpoint(ckpt, model, tok))
    patch = editor.edit(model, tok, [EditRequest("{} plays the", "Toko Yasuda", "piano",
                                                 "guitar")])
    assert sorted(patch.names) == ["transformer.h.2.mlp.c_proj.weight",
                                   "transformer.h.3.mlp.c_proj.weight"]
    assert all(math.isfinite(v) and v > 0 for v in patch.norms().values())


@pytest.mark.timeout(300)
def test_tiny_causal_trace_of_known_facts(in_tmp, fact_model_path):
    from lightning_rome.data import KnownFactsDataModule
    from lightning_rome.models import load_model

    _run_tiny("trace-gpt2xl-known.yaml", "trace-known.yaml", fact_model_path)
    out = in_tmp / "outputs" / "trace-gpt2xl-known"
    aggs = {k: json.loads((out / f"aggregate-{k}.json").read_text()) for k in ("hidden", "mlp")}
    for agg in aggs.values():
        assert agg["n_prompts"] == 3 and agg["window"] == 2
        assert agg["ate"] == pytest.approx(agg["high_score"] - agg["low_score"])
    # The clean probability, recomputed: the model's greedy next-token probability per fact.
    dm = KnownFactsDataModule(SHARED_DATA / "known_1000.json", limit=3)
    dm.setup("test")
    model, tok = load_model(fact_model_path)
    probs = []
    with torch.no_grad():
        for fact in dm.test_dataset:
            ids = tok(fact.prompt, return_tensors="pt").input_ids
            probs.append(float(model(ids).logits[0, -1].softmax(-1).max()))
    assert aggs["hidden"]["high_score"] == pytest.approx(sum(probs) / 3, rel=1e-4)
    logged = _scalars(out / "tb")
    assert logged["trace/mlp/ate"] == pytest.approx(aggs["mlp"]["ate"], rel=1e-5)
    assert 0 <= logged["trace/mlp/peak_layer"] < 4


def test_causal_tracer_takes_a_model_path_and_the_old_name_still_works(fact_model_path):
    from lightning_rome.callbacks.trace import CausalTracerModule
    from lightning_rome.modules import CausalTracer

    assert CausalTracerModule is CausalTracer  # configs written for the former subclass
    tracer = CausalTracer(fact_model_path, kinds=("hidden",), dtype="float64")
    assert tracer.model.dtype == torch.float64
    assert tracer.tokenizer("a b")["input_ids"]  # the model's own tokenizer was loaded
    with pytest.raises(ValueError, match="tokenizer is required"):
        CausalTracer(tracer.model)



@pytest.mark.timeout(300)
def test_predict_and_validate_subcommands_run_the_same_configs(in_tmp, fact_model_path):
    """``predict`` traces the known facts (CausalTracer.predict_step) and writes the same
    aggregates as ``test``; ``validate`` runs MEND-CF's validation loop."""
    rc = main(["predict", "--config", str(CONFIGS / "trace-gpt2xl-known.yaml"),
               "--config", str(CONFIGS / "tiny" / "trace-known.yaml"),
               "--model.init_args.model", fact_model_path,
               "--trainer.limit_predict_batches", "3"])
    assert rc == 0
    out = in_tmp / "outputs" / "trace-gpt2xl-known"
    agg = json.loads((out / "aggregate-hidden.json").read_text())
    assert agg["n_prompts"] == 3 and agg["ate"] == pytest.approx(agg["high_score"] - agg["low_score"])
    rc = main(["validate", "--config", str(CONFIGS / "mend-cf-gpt2xl.yaml"),
               "--config", str(CONFIGS / "tiny" / "mend-cf.yaml"),
               "--model.init_args.model", fact_model_path,
               "--data.init_args.tokenizer", fact_model_path])
    assert rc == 0
    logged = _scalars(in_tmp / "outputs" / "mend-cf-gpt2xl" / "tb")
    assert math.isfinite(logged["val/loss"])
