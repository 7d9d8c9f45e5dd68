"""The command line: one-shot commands on a tiny local model, and one-line errors."""

from __future__ import annotations

import pytest
import yaml
from testutils import tiny_gpt2

from lightning_rome import WeightPatch
from lightning_rome.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = "the a of city river music plays lives works piano guitar Paris Rome".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(80)]
    p.write_text("\n".join(lines))
    return p


@pytest.fixture(scope="module")
def hparams(tmp_path_factory):
    p = tmp_path_factory.mktemp("hp") / "rome.yaml"
    p.write_text(yaml.safe_dump({"layer": 1, "v_num_grad_steps": 3,
                                 "context_templates": ["{}", "Some text. {}"]}))
    return p


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "edit", "apply-patch", "trace", "evaluate",
                "demo"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        main(["edit", "--help"])
    assert e.value.code == 0
    assert "--subject" in capsys.readouterr().out


def test_edit_then_apply_patch(model_dir, corpus, hparams, tmp_path, capsys):
    patch_file = tmp_path / "p.safetensors"
    rc = main(["edit", "--model", str(model_dir), "--prompt", "{} plays the", "--subject",
               "Toko Yasuda", "--target", "piano", "--hparams", str(hparams), "--stats-corpus",
               str(corpus), "--stats-samples", "60", "--save", str(patch_file)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "saved" in out
    patch = WeightPatch.load(patch_file)
    assert patch.method == "rome" and patch.requests[0].subject == "Toko Yasuda"
    out_dir = tmp_path / "edited"
    assert main(["apply-patch", "--model", str(model_dir), "--patch", str(patch_file), "--out",
                 str(out_dir)]) == 0
    from lightning_rome.models import load_model

    edited, _ = load_model(out_dir)
    name = patch.names[0]
    base = tiny_gpt2(n_layer=3)
    patch.apply(base)
    assert (edited.get_parameter(name) == base.get_parameter(name)).all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "no slot", "--subject", "x", "--target", "y"], "exactly once"),
        (["--prompt", "{} plays", "--subject", "x", "--target", " "], "target_new"),
        (["--prompt", "{} plays", "--subject", "x", "--target", "y", "--layer", "9"],
         "out of range"),
    ],
)
def test_user_errors_are_one_line(model_dir, hparams, argv, message, capsys):
    rc = main(["edit", "--model", str(model_dir), "--hparams", str(hparams), *argv])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-rome edit: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_missing_and_corrupt_files(model_dir, tmp_path, capsys):
    assert main(["apply-patch", "--model", str(model_dir), "--patch",
                 str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a patch")
    assert main(["apply-patch", "--model", str(model_dir), "--patch", str(bad)]) == 2
    assert "CorruptFileError" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
