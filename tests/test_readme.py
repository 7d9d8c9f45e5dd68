"""The README's own commands and code, extracted from README.md (not copied) and run offline.

Every fenced ``bash`` and ``python`` block is read from the README text. Model names are
replaced by local test models through :data:`SUBSTITUTIONS`, the only changes made:

* ``--model gpt2-xl`` and ``load_model("gpt2-xl")``: the synthetic fact model's cached folder
  (``lightning_rome.testing.get_fact_model``), a 4-layer GPT-2; ``--limit 100``: ``--limit 2``;
* ``lightning-rome test/fit --config FULL.yaml``: the same command with ``--print_config``
  (the full configs name GPT-2 XL or GPT-J; their tiny offline variants run in test_configs.py);
* ``make demo`` / ``make test`` (they install into a venv) are not run.

The default suite runs the commands that need no model work (help, configs); the ones that edit,
trace or evaluate run under ``-m slow`` (about two minutes on a quiet CPU).
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
from testutils import REPO

from lightning_rome.cli import main

README = REPO / "README.md"

#: (pattern, replacement) applied to each command or code block; ``{model}`` is the local model.
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"--model gpt2-xl(?=\s|$)", "--model {model}"),
    (r'load_model\("gpt2-xl"\)', 'load_model("{model}")'),
    (r"--limit 100\b", "--limit 2"),
]


def blocks(lang: str) -> list[str]:
    """The README's fenced blocks of ``lang``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuations joined, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def substitute(text: str, model: str) -> str:
    for pattern, repl in SUBSTITUTIONS:
        text = re.sub(pattern, repl.replace("{model}", model), text)
    return text


def run(cmd: str, capsys) -> tuple[int, str, str]:
    words = shlex.split(cmd)
    assert words[0] == "lightning-rome", cmd
    try:
        rc = main(words[1:])
    except SystemExit as e:  # --help and --print_config exit like the console script
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def fact_model_path() -> str:
    from lightning_rome.testing import get_fact_model

    return str(get_fact_model().path)


def test_the_readme_has_the_blocks_this_test_runs():
    bash = [c for b in blocks("bash") for c in commands(b)]
    assert any(c.startswith("lightning-rome edit ") for c in bash)
    assert any(c.startswith("lightning-rome test --config configs/") for c in bash)
    assert len(blocks("python")) == 1 and "ROME(hparams)" in blocks("python")[0]
    assert commands('a \\\n  b "x y"  # note\n') == ["a b 'x y'"]
    assert substitute("--model gpt2-xl --out gpt2-xl-edited --limit 100", "/m") == (
        "--model /m --out gpt2-xl-edited --limit 2")


# ------------------------------------------------------------------------- fast: no model work
def test_readme_help_commands(capsys):
    lines = [c for b in blocks("bash") for c in commands(b)]
    helps = [c for c in lines if "--help" in c or ".help" in c]
    assert helps, "the README shows no help command"
    for cmd in helps:
        rc, out, err = run(cmd, capsys)
        assert rc == 0, (cmd, err)
        assert "--model.editor" in out and len(out.splitlines()) < 100
    rc, out, _ = run("lightning-rome --help", capsys)  # named in the text below the block
    assert rc == 0 and "evaluate" in out
    for sub in ("edit", "apply-patch", "trace", "evaluate", "demo"):
        rc, out, _ = run(f"lightning-rome {sub} --help", capsys)
        assert rc == 0 and "(default:" in out, sub


def test_readme_configs_parse(monkeypatch, capsys):
    import lightning_rome.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    configs = [c for b in blocks("bash") for c in commands(b) if "--config configs/" in c]
    assert len(configs) >= 6
    for cmd in configs:
        path = REPO / shlex.split(cmd)[shlex.split(cmd).index("--config") + 1]
        assert path.is_file(), cmd
        rc, out, err = run(f"{cmd} --print_config", capsys)
        assert rc == 0, (cmd, err)
        assert "class_path: lightning_rome." in out


# ------------------------------------------------------------------------- slow: real runs
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_command_line_block(fact_model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    [block] = [b for b in blocks("bash") if "lightning-rome edit " in b]
    for cmd in commands(block):
        if cmd == "lightning-rome demo":
            continue  # test_readme_demo
        cmd = substitute(cmd, fact_model_path)
        rc, out, err = run(cmd, capsys)
        assert rc == 0, (cmd, err)
        sub = shlex.split(cmd)[1]
        if sub == "edit":
            assert "before" in out and "after" in out and (tmp_path / "toko.safetensors").is_file()
            assert len([x for x in err.splitlines() if "no hyperparameters given" in x]) == 1
        elif sub == "apply-patch":
            assert "applied" in out and (tmp_path / "gpt2-xl-edited" / "config.json").is_file()
        elif sub == "trace":
            for kind in ("hidden", "mlp", "attn"):
                assert (tmp_path / f"trace-{kind}.png").stat().st_size > 0
            assert "using 4 (the model has 4 layers" in err
        elif sub == "evaluate":
            summary = json.loads((tmp_path / "outputs/evaluate/summary.json").read_text())
            assert summary["n_cases"] == 2 and summary["method"] == "rome"
            assert "counterfact-val.json" in err  # which offline file it read


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_python_example(fact_model_path, tmp_path, monkeypatch, capsys):
    import torch

    from lightning_rome import load_model
    from lightning_rome.presets import PresetNotice

    monkeypatch.chdir(tmp_path)
    [code] = blocks("python")
    ns: dict = {}
    with pytest.warns(PresetNotice, match="preset 'fact-model'"):
        exec(compile(substitute(code, fact_model_path), "README.md", "exec"), ns)
    printed = capsys.readouterr().out
    assert printed.startswith("[(") and (tmp_path / "eiffel.safetensors").is_file()
    fresh, _ = load_model(fact_model_path)
    for (name, p), q in zip(ns["model"].named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name  # reverted bit-exactly
    assert ns["hparams"]["layer"] == 0  # the fact model's preset, chosen by for_model


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_readme_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run("lightning-rome demo", capsys)
    assert rc == 0, err
    assert (tmp_path / "outputs/demo/summary.json").is_file() and "| ROME" in out
