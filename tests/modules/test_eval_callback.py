"""``EditEvaluation`` during ``fit``: the evaluator's per-case code, periodically, weights left
bit-identical, metrics logged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_evaluator import CASES, FixedEditor, fixed_delta, make_case, one_thread  # noqa: F401
from tiny_factories import tiny_model
from torch.utils.data import DataLoader, TensorDataset

from lightning_rome.callbacks.evaluation import EditEvaluation, load_cases
from lightning_rome.modules.evaluator import evaluate_cases, make_metrics, model_checksum
from lightning_rome.patches import LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest

PARAM = "transformer.h.1.mlp.c_proj.weight"


class LM(pl.LightningModule):
    """Language modelling on random token ids; ``lr=0`` keeps the weights fixed."""

    def __init__(self, model, tokenizer, lr: float = 0.0) -> None:
        super().__init__()
        self.model, self.tokenizer, self.lr = model.train(), tokenizer, lr
        self.modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.modes.append(self.model.training)
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def _loader(self):
        ids = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=2)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


@pytest.fixture
def lm(gpt2_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.2,
                       n_positions=128)
    return model, gpt2_tokenizer


def fit(tmp_path, module, callbacks, epochs=2, **kw):
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=1, callbacks=callbacks, **kw)
    trainer.fit(module)
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    return trainer, rows


def test_evaluates_every_epoch_and_leaves_weights_unchanged(lm, tmp_path):
    model, tok = lm
    start = model_checksum(model)
    cb = EditEvaluation(CASES[:2], FixedEditor(scale=3.0), every_n_epochs=1)
    module = LM(model, tok, lr=0.0)
    _, rows = fit(tmp_path, module, [cb], epochs=2)
    assert model_checksum(model) == start  # lr=0 and every edit reverted, bit for bit
    assert all(module.modes)  # training mode restored after each evaluation
    assert [h["epoch"] for h in cb.history] == [0, 1]  # not during the sanity check
    # The logged values are those of the evaluator's per-case code on the same model.
    metrics = {"pre": make_metrics("counterfact", "pre/"),
               "post": make_metrics("counterfact", "post/")}
    evaluate_cases(model, tok, CASES[:2], FixedEditor(scale=3.0), metrics=metrics)
    logged = [r for r in rows if r.get("edit_eval/post/ES")]
    assert len(logged) == 2
    for key in ("ES", "EM", "PS", "NS", "S"):
        want = float(metrics["post"][key].compute())
        assert float(logged[-1][f"edit_eval/post/{key}"]) == pytest.approx(want, rel=1e-5)
        assert cb.history[-1]["results"][f"post/{key}"]["mean"] == pytest.approx(want, rel=1e-6)
    assert "edit_eval/pre/ES" in logged[-1]  # baseline on by default with an editor


def test_every_n_epochs_and_checkpoint_state(lm, tmp_path):
    model, tok = lm
    cb = EditEvaluation(CASES[:1], None, every_n_epochs=2, when="train_epoch_end")
    module = LM(model, tok)
    fit(tmp_path, module, [cb], epochs=3)
    assert [h["epoch"] for h in cb.history] == [1]
    assert len(module.modes) == 6 and all(module.modes)  # train mode restored after it ran
    other = EditEvaluation(CASES[:1], None)
    other.load_state_dict(cb.state_dict())
    assert json.dumps(other.history) == json.dumps(cb.history)  # (NaN intervals for one case)
    assert cb.state_key != EditEvaluation(CASES[:2], None).state_key


class ApplyAtStart(Callback):
    """An edit made earlier in the run (as an edit callback would)."""

    def __init__(self, patch_fn) -> None:
        self.patch_fn = patch_fn

    def on_fit_start(self, trainer, pl_module):
        self.patch_fn(pl_module.model).apply(pl_module.model)


def test_watches_an_earlier_edit_through_training(lm, tmp_path):
    """editor=None measures the live model: an edit applied at fit start shows up in the first
    evaluation, and further training (lr > 0) moves the numbers."""
    model, tok = lm
    case = CASES[0]

    def patch_fn(m):
        left, right = fixed_delta(case.request.subject, scale=3.0)
        return WeightPatch.from_model(m, {PARAM: LowRankDelta(left, right)})

    probe = tiny_model("gpt2", vocab_size=len(tok), initializer_range=0.2, n_positions=128)
    probe.load_state_dict(model.state_dict())
    patch_fn(probe).apply(probe)
    (edited,) = evaluate_cases(probe, tok, [case], None)
    # The edit is applied by hand (no edit callback to see), so the user names it: post.
    cb = EditEvaluation([case], None, at_fit_start=True, phase="post")
    assert cb.options.baseline is False
    fit(tmp_path, LM(model, tok, lr=0.5), [ApplyAtStart(patch_fn), cb], epochs=1)
    first, last = cb.history[0]["results"], cb.history[-1]["results"]
    assert [h["phase"] for h in cb.history] == ["post", "post"]
    p = edited["post"]["rewrite"]
    want_em = p["p_new"][0] - p["p_true"][0]
    assert first["post/EM"]["mean"] == pytest.approx(want_em, rel=1e-6)
    assert last["post/EM"]["mean"] != first["post/EM"]["mean"]


def test_load_cases_and_bad_settings(tmp_path):
    cases = load_cases([EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar"),
                        {"prompt": "{} is in", "subject": "X", "target_new": "Y",
                         "target_true": "Z"}])
    assert [c.request.subject for c in cases] == ["Toko Yasuda", "X"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([
        {"case_id": i, "prompt": f"Subject{i} plays the", "subject": f"Subject{i}",
         "target_new": "piano", "ground_truth": "guitar",
         "rephrase_prompt": f"Subject{i} is good at the"} for i in range(4)]))
    cf = load_cases(path, limit=3)
    assert len(cf) == 3 and cf[0].source == "counterfact-reduced"
    assert cf[2].paraphrase_prompts == ("Subject2 is good at the",)
    with pytest.raises(MisconfigurationException, match="every_n_epochs"):
        EditEvaluation(CASES[:1], every_n_epochs=0)
    with pytest.raises(MisconfigurationException, match="when"):
        EditEvaluation(CASES[:1], when="test_end")
    with pytest.raises(TypeError, match="EditCase"):
        load_cases([3])
    with pytest.raises(ValueError, match="mix"):
        zs = make_case(9, "Q", "What is {}?", "a", "b")
        zs = type(zs)(zs.request, source="zsre")
        EditEvaluation([CASES[0], zs])


class NoValLM(LM):
    """The same module without a validation loop."""

    validation_step = pl.LightningModule.validation_step
    val_dataloader = pl.LightningModule.val_dataloader


@pytest.mark.parametrize(("module_cls", "extra", "why"), [
    (NoValLM, {}, "NoValLM has no validation_step"),
    (LM, {"limit_val_batches": 0}, "limit_val_batches=0"),
])
def test_default_when_is_refused_in_a_fit_without_validation(lm, tmp_path, module_cls, extra,
                                                             why):
    model, tok = lm
    cb = EditEvaluation(CASES[:1], FixedEditor(scale=3.0))
    with pytest.raises(MisconfigurationException, match=f"never run.*{why}.*train_epoch_end"):
        fit(tmp_path, module_cls(model, tok), [cb], epochs=1, **extra)
    # when="train_epoch_end" runs in the same fit.
    cb = EditEvaluation(CASES[:1], FixedEditor(scale=3.0), when="train_epoch_end")
    fit(tmp_path, module_cls(model, tok), [cb], epochs=1, **extra)
    assert [h["epoch"] for h in cb.history] == [0]


def test_without_an_editor_the_names_say_what_was_measured(lm, tmp_path):
    """editor=None names the one measurement after the model measured: post/ while an edit
    callback of the Trainer holds its edit, pre/ while none does (here: before the callback
    applies its edit at train_end), each with the values of that model."""
    from lightning_rome.callbacks import EditorCallback

    model, tok = lm
    case = CASES[0]
    start = model_checksum(model)
    pre = {"post": make_metrics("counterfact", "x/")}
    evaluate_cases(model, tok, [case], None, metrics=pre)
    probe = tiny_model("gpt2", vocab_size=len(tok), initializer_range=0.2, n_positions=128)
    probe.load_state_dict(model.state_dict())
    FixedEditor(scale=3.0).edit(probe, tok, [case.request]).apply(probe)
    post = {"post": make_metrics("counterfact", "x/")}
    evaluate_cases(probe, tok, [case], None, metrics=post)
    want_pre, want_post = (float(m["post"]["EM"].compute()) for m in (pre, post))
    assert want_pre != want_post

    # The edit callback applies its edit when fit starts (and reverts it at the end): post/.
    edit = EditorCallback([case.request], FixedEditor(scale=3.0), revert=True,
                          log_efficacy=False)
    cb = EditEvaluation([case], None, when="train_epoch_end")
    _, rows = fit(tmp_path / "a", LM(model, tok), [edit, cb], epochs=1)
    (res,) = [h["results"] for h in cb.history]
    assert cb.history[0]["phase"] == "post" and not any(k.startswith("pre/") for k in res)
    assert res["post/EM"]["mean"] == pytest.approx(want_post, rel=1e-6)
    assert any(r.get("edit_eval/post/EM") for r in rows)
    assert not any(r.get("edit_eval/pre/EM") for r in rows)
    assert model_checksum(model) == start  # reverted at fit end

    # The edit comes at train_end, after the epoch's evaluation: the model measured is the
    # unedited one, named pre/.
    edit = EditorCallback([case.request], FixedEditor(scale=3.0), apply_on="train_end",
                          revert=True, log_efficacy=False)
    cb = EditEvaluation([case], None, when="train_epoch_end")
    _, rows = fit(tmp_path / "b", LM(model, tok), [edit, cb], epochs=1)
    (res,) = [h["results"] for h in cb.history]
    assert cb.history[0]["phase"] == "pre" and not any(k.startswith("post/") for k in res)
    assert res["pre/EM"]["mean"] == pytest.approx(want_pre, rel=1e-6)
    assert any(r.get("edit_eval/pre/EM") for r in rows)
    assert model_checksum(model) == start


def test_phase_and_baseline_settings_that_cannot_be_honest_are_refused():
    with pytest.raises(MisconfigurationException, match="phase='pre' names the measured model"):
        EditEvaluation(CASES[:1], FixedEditor(), phase="pre")
    with pytest.raises(MisconfigurationException, match="baseline=True needs an editor"):
        EditEvaluation(CASES[:1], None, baseline=True)
    with pytest.raises(MisconfigurationException, match="phase must be"):
        EditEvaluation(CASES[:1], None, phase="edited")
    with pytest.raises(MisconfigurationException, match="on_error"):
        EditEvaluation(CASES[:1], None, on_error="ignore")


def _texts(log_dir) -> dict[str, str]:
    """Every text summary in a TensorBoard folder: {tag: markdown} (the last of each tag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            proto = acc.Tensors(tag)[-1].tensor_proto
            out[tag.removesuffix("/text_summary")] = proto.string_val[0].decode()
    return out


def test_generations_go_to_tensorboard_as_text(lm, tmp_path):
    """With generation on, each evaluation logs a table of the prompt and the continuation the
    model wrote before and after the edit: the texts of the evaluation's own records."""
    from lightning.pytorch.loggers import TensorBoardLogger

    model, tok = lm
    case = make_case(5, "Toko Yasuda", "{} plays the", "piano", "guitar",
                     gen=("Toko Yasuda is known for", "Music is"))
    cb = EditEvaluation([case], FixedEditor(scale=3.0), when="train_epoch_end",
                        generation=True, generation_kwargs={"max_new_tokens": 4})
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[cb])
    trainer.fit(LM(model, tok))
    table = _texts(logger.log_dir)["edit_eval/generations"]
    (rec,) = cb.last_records
    lines = table.splitlines()
    assert lines[0] == "| case | prompt | before | after |"
    for i, prompt in enumerate(case.generation_prompts):
        before = rec["pre"]["generation"]["texts"][i][len(prompt):]
        after = rec["post"]["generation"]["texts"][i][len(prompt):]
        assert before != after  # the edit changed what the model writes
        cells = [c.strip() for c in lines[2 + i].strip("|").split(" | ")]
        assert cells == ["5", prompt, " ".join(before.split()), " ".join(after.split())]
    # Without generation nothing is logged as text.
    cb = EditEvaluation([case], FixedEditor(scale=3.0), when="train_epoch_end")
    logger = TensorBoardLogger(tmp_path, name="tb2")
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=logger, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False,
               callbacks=[cb]).fit(LM(model, tok))
    assert "edit_eval/generations" not in _texts(logger.log_dir)
