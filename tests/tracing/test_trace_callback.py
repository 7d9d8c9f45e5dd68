"""``CausalTraceCallback``: traces at chosen moments of a fit, logged to TensorBoard, without
disturbing training."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset
from tracing_helpers import peaked_gpt2

from lightning_rome import EditRequest
from lightning_rome.callbacks.trace import CausalTraceCallback
from lightning_rome.tracing import CausalTrace

PROMPTS = [("The {} is located in the city of", "Space Needle"),
           {"prompt": "Beats Music is owned by", "subject": "Beats Music"}]


class LM(pl.LightningModule):
    def __init__(self, tokenizer=None, seed: int = 0):
        super().__init__()
        self.model = peaked_gpt2(n_layer=2, seed=seed).train()
        self.tokenizer = tokenizer
        self.modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.modes.append(self.model.training)
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        ids = torch.randint(0, 50000, (4, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=2, shuffle=True)


def _fit(module, callbacks, tmp_path, epochs=2, logger=None):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger or False,
                         callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    trainer.fit(module)
    return trainer


def test_traces_at_the_chosen_moments_and_logs_images(gpt2_tokenizer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = CausalTraceCallback(PROMPTS, kinds=("hidden", "mlp"), window=2, samples=2,
                             trace_on_fit_start=True, dirpath=str(tmp_path / "traces"))
    logger = TensorBoardLogger(tmp_path, name="tb")
    pl.seed_everything(0)
    module = LM(gpt2_tokenizer)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = _fit(module, [cb], tmp_path, logger=logger)
    moments = [h["moment"] for h in cb.history if h["prompt"] == 0 and h["kind"] == "mlp"]
    assert moments == ["fit_start", "epoch=0", "epoch=1"]  # fit_end: same step as epoch=1
    assert [h["step"] for h in cb.history if h["prompt"] == 0 and h["kind"] == "mlp"] == [0, 2, 4]
    assert all(module.modes) and module.model.training  # train mode survives each trace
    # The latest traces are those of the trained model, the first of the initial one: the
    # answer and its clean probability are the model's own greedy next token and its softmax
    # probability, from a plain forward pass of each model.
    t = cb.latest[1]["mlp"]
    assert isinstance(t, CausalTrace) and t.prompt == "Beats Music is owned by"
    initial_model = peaked_gpt2(n_layer=2, seed=0)
    initial_model.load_state_dict(initial)
    first = [h for h in cb.history if h["prompt"] == 1 and h["kind"] == "mlp"]
    for m, entry, trace in ((module.model, first[-1], t), (initial_model, first[0], None)):
        ids = gpt2_tokenizer(t.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = m.eval()(ids).logits[0, -1].double().softmax(-1)  # (V,)
        top = int(probs.argmax())
        assert entry["answer"] == gpt2_tokenizer.decode([top])
        assert entry["high_score"] == pytest.approx(float(probs[top]), rel=1e-4)
        if trace is not None:
            assert trace.answer == entry["answer"] and trace.high_score == entry["high_score"]
    module.model.train()
    assert first[0]["high_score"] != first[-1]["high_score"]  # training moved the model
    assert CausalTrace.load(tmp_path / "traces" / "epoch=1" / "prompt1-mlp.json") == t
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["causal_trace/0", "causal_trace/1"]
    assert [e.step for e in acc.Images("causal_trace/0")] == [0, 2, 4]
    assert "causal_trace/0/mlp/peak_ie" in acc.Tags()["scalars"]
    assert trainer.global_step == 4


def test_tracing_does_not_change_training(gpt2_tokenizer, tmp_path):
    weights = []
    for callbacks in ([], [CausalTraceCallback(PROMPTS[:1], kinds=("hidden",), samples=2,
                                               log_images=False)]):
        pl.seed_everything(0)
        module = LM(gpt2_tokenizer)
        _fit(module, callbacks, tmp_path)
        weights.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_state_dict_and_state_key(gpt2_tokenizer, tmp_path):
    cb = CausalTraceCallback(PROMPTS[:1], kinds=("hidden",), samples=2, every_n_epochs=None,
                             trace_on_fit_end=True, tokenizer=gpt2_tokenizer)
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        _fit(LM(), [cb], tmp_path, epochs=1,
             logger=pl.loggers.CSVLogger(tmp_path))  # images on, but nowhere to log them
    assert [h["moment"] for h in cb.history] == ["fit_end"]
    other = CausalTraceCallback(PROMPTS[:1], kinds=("hidden",), log_images=False)
    other.load_state_dict(cb.state_dict())
    assert other.history == cb.history and other.state_key == cb.state_key
    assert CausalTraceCallback(PROMPTS[1:], log_images=False).state_key != cb.state_key
    # EditRequests work as prompts, with their true target as the answer.
    req = EditRequest("{} is located in the city of", "Space Needle", "Paris",
                      target_true="Seattle")
    given = CausalTraceCallback([req], kinds=("hidden",), samples=2, answer="given",
                                every_n_epochs=None, log_images=False, tokenizer=gpt2_tokenizer)
    with pytest.warns(UserWarning, match="does not complete"):
        _fit(LM(), [given], tmp_path, epochs=1)
    assert given.history[0]["answer"] == " Seattle"


def test_bad_configuration(gpt2_tokenizer, tmp_path):
    with pytest.raises(MisconfigurationException, match="at least one prompt"):
        CausalTraceCallback([])
    with pytest.raises(MisconfigurationException, match="every_n_epochs"):
        CausalTraceCallback(PROMPTS, every_n_epochs=-1)
    with pytest.raises(MisconfigurationException, match="answer"):
        CausalTraceCallback(PROMPTS, answer="given")  # the prompts have no answers
    with pytest.raises(ValueError, match="unknown trace kind"):
        CausalTraceCallback(PROMPTS, kinds=("neurons",))
    cb = CausalTraceCallback(PROMPTS[:1], kinds=("hidden", "mlp"), samples=2, log_images=False)
    with pytest.raises(MisconfigurationException, match="window=10 does not fit this 2-layer"):
        _fit(LM(gpt2_tokenizer), [cb], tmp_path, epochs=1)
    cb = CausalTraceCallback(PROMPTS[:1], kinds=("hidden",), samples=2, log_images=False)
    with pytest.raises(MisconfigurationException, match="tokenizer"):
        _fit(LM(tokenizer=None), [cb], tmp_path, epochs=1)
