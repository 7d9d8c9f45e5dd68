"""The command line prints only its own progress and results: no deprecation warnings from our
calls into transformers, Lightning or torch, no Lightning tips, our own notices once each.

The commands run in a fresh interpreter with Python's default warning filters, as a user runs
them, and every line they print is checked."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

from lightning_rome.utils.console import quiet_console

ROOT = Path(__file__).resolve().parents[1]
#: Words that mark a line as noise rather than a command's own output.
NOISE = ("Warning", "warning", "deprecated", "💡", "GPU available", "TPU available")


def _run(code: str, timeout: int = 600) -> list[str]:
    """Run ``code`` in a fresh interpreter (default warning filters) and return its output's
    lines (stdout and stderr together)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-40:])
    return lines


def _noise(lines: list[str]) -> list[str]:
    return [line for line in lines if any(word in line for word in NOISE)]


@pytest.fixture(scope="module")
def files(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    words = "the a of city river music plays lives works piano guitar Paris Rome".split()
    (d / "corpus.txt").write_text("\n".join(
        " ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(80)))
    (d / "hp.yaml").write_text(yaml.safe_dump(
        {"layer": 1, "v_num_grad_steps": 3, "context_templates": ["{}", "Some text. {}"]}))
    return {"model": str(model_dir), "corpus": str(d / "corpus.txt"),
            "hp": str(d / "hp.yaml"), "out": str(d)}


def test_trace_and_edit_print_only_their_results(files, capfd):
    """``trace`` (the prefix engine: blocks called directly, the cache keyword), ``edit``
    (ROME: statistics, value optimisation) and greedy generation (the KV cache) print no
    warning under the default filters; the one notice of ours (the model does not predict the
    given answer) comes once, though all three traces see it."""
    from lightning_rome.cli import main
    from lightning_rome.models import load_model
    from lightning_rome.scoring import generate

    f = files
    common = ["--model", f["model"], "--prompt", "{} plays the", "--subject", "Toko Yasuda"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a user sees: each warning once per place
        assert main(["trace", *common, "--samples", "2", "--window", "2", "--answer", " the",
                     "--out", f["out"] + "/t.png"]) == 0
        assert main(["edit", *common, "--target", "piano", "--hparams", f["hp"],
                     "--stats-corpus", f["corpus"], "--stats-samples", "60"]) == 0
        model, tok = load_model(f["model"])
        generate(model, tok, ["Toko Yasuda plays the"], max_new_tokens=3)
    out, err = capfd.readouterr()
    lines = (out + err).splitlines()
    assert any(line.startswith("  attn:") for line in lines), lines  # all three traces ran
    assert any(line.startswith("  after") for line in lines), lines
    assert _noise(lines) == []
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert len(messages) == 1 and messages[0].startswith("AnswerMismatchWarning"), messages


def _host():
    """A LightningModule with one validation step (Lightning is imported here only)."""
    import lightning.pytorch as pl

    class Host(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def validation_step(self, batch, batch_idx):
            self.log("val", self.layer(batch).sum(), batch_size=len(batch))

    return Host()


def _validate_once() -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(_host(), DataLoader(torch.zeros(4, 2), batch_size=2), verbose=False)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("lightning_info", [False, True])
def test_quiet_console_drops_lightning_tips_and_its_pytree_deprecation(lightning_info):
    """A Trainer run logs a tip and the device summary and (Lightning 2.6 with torch >= 2.13)
    warns about ``LeafSpec``; inside :func:`quiet_console` the tip and that one deprecation are
    gone (and the device summary with ``lightning_info=False``), our own messages stay, and
    everything is back afterwards."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    handler = _Records()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as outside:
            warnings.simplefilter("always")
            _validate_once()
        assert any(m.startswith("💡") for m in handler.messages)  # the test can fail
        handler.messages.clear()
        with warnings.catch_warnings(record=True) as inside:
            warnings.simplefilter("always")
            with quiet_console(lightning_info=lightning_info):
                _validate_once()
                rank_zero_info("ours: still shown")
        msgs = handler.messages
        assert not any(m.startswith("💡") for m in msgs), msgs
        assert any("GPU available" in m for m in msgs) == lightning_info, msgs
        assert "ours: still shown" in msgs
        assert not [w for w in inside if "LeafSpec" in str(w.message)]
        if any("LeafSpec" in str(w.message) for w in outside):  # the filter is restored
            handler.messages.clear()
            with warnings.catch_warnings(record=True) as after:
                warnings.simplefilter("always")
                _validate_once()
            assert any("LeafSpec" in str(w.message) for w in after)
        assert any(m.startswith("💡") for m in handler.messages)
    finally:
        logger.removeHandler(handler)


@pytest.mark.slow
def test_evaluate_with_a_trainer_prints_only_its_results(files, shared_data):
    """``evaluate`` (a Trainer, ROME, generation metrics): no tip, no device lines, no
    deprecation."""
    f = files
    data = str(Path(shared_data) / "counterfact" / "counterfact-val.json")
    code = f"""
from lightning_rome.cli import main
assert main(["evaluate", "--model", {f["model"]!r}, "--method", "rome", "--hparams", {f["hp"]!r},
             "--limit", "2", "--path", {data!r}, "--stats-corpus", {f["corpus"]!r},
             "--stats-samples", "60", "--generation", "--out", {f["out"] + "/ev"!r}]) == 0
"""
    lines = _run(code)
    assert any("rome (pre-edit)" in line for line in lines), lines
    assert _noise(lines) == []


@pytest.mark.slow
def test_demo_prints_only_its_progress_and_results(tmp_path):
    """``lightning-rome demo`` (on the cached COUNTERFACT model, a small MEMIT batch)."""
    code = f"""
from lightning_rome.cli import main
assert main(["demo", "--out", {str(tmp_path / "demo")!r}, "--memit", "5"]) == 0
"""
    lines = _run(code, timeout=900)
    assert any(line.startswith("total") for line in lines), lines
    assert _noise(lines) == []


class _FakeBar:
    """Records what a loop does with its bar."""

    made: ClassVar[list[_FakeBar]] = []

    def __init__(self, total=None, desc="", **kwargs) -> None:
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        _FakeBar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_progress_bars_on_a_terminal_only(monkeypatch, tmp_path, gpt2_tokenizer):
    """Statistics and value optimisation (ROME's v, MEMIT's z) drive a bar with a total (so
    tqdm shows an ETA) when stderr is a terminal, and no tqdm at all otherwise."""
    import tqdm.auto
    from testutils import tiny_gpt2

    from lightning_rome import EditRequest
    from lightning_rome.editing import ROME
    from lightning_rome.stats import get_second_moment
    from lightning_rome.utils.progress import progress_bar

    monkeypatch.setattr(tqdm.auto, "tqdm", _FakeBar)
    _FakeBar.made = []
    model = tiny_gpt2(n_layer=2)
    texts = [f"text number {i} about the city" for i in range(12)]

    def run() -> None:
        get_second_moment(model, gpt2_tokenizer, 0, corpus=texts, n_samples=10, cache=False)
        rome = ROME({"layer": 1, "v_num_grad_steps": 3, "context_templates": ["{}"]},
                    second_moment=lambda m, t, n: torch.eye(128))
        rome.edit(model, gpt2_tokenizer, [EditRequest("{} plays the", "Toko Yasuda", "piano")])

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    run()
    assert _FakeBar.made == []
    assert progress_bar(5, "x").__class__.__name__ == "_NoBar"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    run()
    by_desc = {b.desc: b for b in _FakeBar.made}
    stats = by_desc["second moments"]
    assert stats.total == 10 and stats.n == 10 and stats.closed
    (v,) = [b for d, b in by_desc.items() if d.startswith("optimising v")]
    assert v.total == 3 and 1 <= v.n <= 3 and v.closed
