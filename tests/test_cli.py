"""The command line: one-shot commands on a tiny local model, and one-line errors."""

from __future__ import annotations

import pytest
import yaml
from testutils import SHARED_DATA, tiny_gpt2

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


# ---------------------------------------------------------------------------- defaults from the model
def _fake_model(**config):
    """A module with only a config: enough for choosing settings (no weights are touched)."""
    from torch import nn
    from transformers import GPT2Config

    class Fake(nn.Module):
        pass

    m = Fake()
    m.config = GPT2Config(**config)
    return m


def test_preset_chosen_by_family_and_size():
    from lightning_rome.editing.hparams import load_preset_file
    from lightning_rome.presets import choose

    xl = choose("rome", _fake_model(n_layer=48, n_embd=1600))
    assert xl.preset == "gpt2-xl" and xl.settings == load_preset_file("rome")["gpt2-xl"]
    assert "'gpt2-xl'" in xl.notice and "--hparams" in xl.notice and "\n" not in xl.notice
    assert choose("memit", _fake_model(n_layer=48, n_embd=1600)).settings["layers"] == [
        13, 14, 15, 16, 17]
    fact = choose("rome", _fake_model(n_layer=4, n_embd=96, n_head=4, vocab_size=2048))
    assert fact.preset == "fact-model"
    # Same depth and width with another vocabulary is not the fact model: derived settings.
    other = choose("rome", _fake_model(n_layer=4, n_embd=96, n_head=4, vocab_size=50257))
    assert other.preset is None and other.settings == {"layer": 1}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 12, 28, 80])
def test_derived_settings_fit_the_depth(n):
    from lightning_rome.presets import choose

    model = _fake_model(n_layer=n, n_embd=40, n_head=2)
    rome = choose("rome", model)
    assert rome.preset is None and 0 <= rome.settings["layer"] < n
    assert "derived from its depth" in rome.notice and f"{n} layers" in rome.notice
    for method in ("memit", "ft", "ft-l"):
        layers = choose(method, model).settings["layers"]
        assert layers and all(0 <= x < n for x in layers), (method, layers)
    memit = choose("memit", model).settings["layers"]
    assert memit == list(range(memit[0], memit[-1] + 1))  # contiguous, ending at ROME's layer
    assert memit[-1] == rome.settings["layer"]


def test_for_model_warns_one_notice():
    from lightning_rome.editing import ROME
    from lightning_rome.presets import PresetNotice, for_model

    model = tiny_gpt2(n_layer=3)
    with pytest.warns(PresetNotice) as rec:
        rome = ROME(for_model("rome", model))
    assert len(rec) == 1 and rome.hparams.layer == 1


def _edit(model_dir, *extra):
    return ["edit", "--model", str(model_dir), "--prompt", "{} plays the", "--subject",
            "Toko Yasuda", "--target", "piano", *extra]


def test_edit_without_hparams_uses_the_models_depth(model_dir, corpus, tmp_path, capsys):
    patch_file = tmp_path / "p.safetensors"
    rc = main(_edit(model_dir, "--stats-corpus", str(corpus), "--stats-samples", "60",
                    "--seed", "7", "--save", str(patch_file)))
    err = capsys.readouterr().err
    assert rc == 0, err
    notices = [line for line in err.splitlines() if "no hyperparameters given" in line]
    assert len(notices) == 1 and "layer 1" in notices[0] and "3 layers" in notices[0]
    patch = WeightPatch.load(patch_file)
    assert patch.names == ["transformer.h.1.mlp.c_proj.weight"]
    assert patch.hparams["seed"] == 7 and patch.hparams["mom2_n_samples"] == 60  # options used


@pytest.fixture(scope="module")
def memit_hparams(tmp_path_factory):
    p = tmp_path_factory.mktemp("hp") / "memit.yaml"
    p.write_text(yaml.safe_dump({"layers": [0, 1], "v_num_grad_steps": 2,
                                 "context_templates": ["{}"], "mom2_update_weight": 10.0}))
    return p


def test_memit_layer_option_edits_only_that_layer(model_dir, corpus, memit_hparams, tmp_path,
                                                  capsys):
    patch_file = tmp_path / "m.safetensors"
    rc = main(_edit(model_dir, "--method", "memit", "--hparams", str(memit_hparams), "--layer",
                    "1", "--stats-corpus", str(corpus), "--stats-samples", "60", "--save",
                    str(patch_file)))
    assert rc == 0, capsys.readouterr().err
    assert WeightPatch.load(patch_file).names == ["transformer.h.1.mlp.c_proj.weight"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "ft", "--layer", "5"], "--layer 5 is out of range: this model has 3 layers"),
        (["--layer", "7"], "--layer 7 is out of range"),
        (["--hparams", "gpt2-xl"], "preset 'gpt2-xl' (--hparams) edits layer 17, which is out "
                                   "of range: this model has 3 layers"),
        (["--stats-samples", "0"], "argument --stats-samples: must be at least 1, got 0"),
        (["--method", "ft", "--stats-samples", "10"], "--stats-samples does not apply to ft"),
        (["--layer", "0", "--layer", "1"], "ROME edits one layer"),
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--top-k", "-1"], "argument --top-k: must be at least 1, got -1"),
        (["--top-k", "1000000"], "--top-k 1000000 must be between 1 and the vocabulary size"),
    ],
)
def test_refused_options_are_one_line_errors(model_dir, extra, message, capsys):
    rc = main(_edit(model_dir, *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err, err
    assert "\n" not in err and "Traceback" not in err


def test_cuda_on_a_cpu_build_is_one_line(model_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_edit(model_dir, "--device", "cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert "--device cuda: CUDA is not available" in err and "\n" not in err


def test_missing_model_folder_is_named(tmp_path, capsys):
    assert main(_edit(tmp_path / "no-such-model")) == 2
    err = capsys.readouterr().err.strip()
    assert "no such model folder" in err and "no-such-model" in err and "Repo id" not in err
    (tmp_path / "empty").mkdir()
    assert main(_edit(tmp_path / "empty")) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_python_yaml_tag_and_binary_corpus_are_one_line(model_dir, tmp_path, capsys):
    evil = tmp_path / "evil.yaml"
    evil.write_text("layer: !!python/object/apply:os.system ['echo hi']\n")
    assert main(_edit(model_dir, "--hparams", str(evil))) == 2
    err = capsys.readouterr().err.strip()
    assert "evil.yaml: not valid safe YAML" in err and "python/object" in err and "line 1" in err
    assert "\n" not in err
    binary = tmp_path / "corpus.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    assert main(_edit(model_dir, "--stats-corpus", str(binary))) == 2
    err = capsys.readouterr().err.strip()
    assert "corpus.bin" in err and "binary file" in err and "\n" not in err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert main(_edit(model_dir, "--stats-corpus", str(latin))) == 2
    assert "latin1.txt: not UTF-8 text (byte 0xe9" in capsys.readouterr().err


def test_one_shot_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: counterfact)" in out and "(default: outputs/evaluate)" in out
    assert "--resume, --no-resume" in out
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: rome)" in out and "(default: 5)" in out and "--seed" in out


def test_flag_hints_replace_python_arguments():
    from lightning_rome.cli import _one_line

    msg = _one_line("apply-patch", ValueError("checksum mismatch; pass force=True to apply"))
    assert msg == "checksum mismatch; pass --force to apply"
    msg = _one_line("evaluate", ValueError("results differ; pass resume=False to start afresh"))
    assert "--no-resume" in msg and "resume=False" not in msg
    kept = "pass resume=False (CLI: --no-resume)"
    assert _one_line("evaluate", ValueError(kept)) == kept


def test_evaluate_passes_resume_seed_and_the_offline_file(model_dir, monkeypatch, capsys):
    import lightning_rome.modules.evaluator as ev

    seen = {}

    class Stop(Exception):
        pass

    def fake(model, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(ev, "EditEvaluator", fake)
    monkeypatch.setenv("LIGHTNING_ROME_DATA", str(SHARED_DATA))
    with pytest.raises(Stop):
        main(["evaluate", "--model", str(model_dir), "--method", "none", "--no-resume",
              "--seed", "3"])
    assert seen["resume"] is False and seen["seed"] == 3 and seen["editor"] is None
    assert "data: " in capsys.readouterr().err
    assert main(["evaluate", "--model", str(model_dir), "--method", "none", "--layer", "1"]) == 2
    assert "cannot be used with --method none" in capsys.readouterr().err


def test_evaluate_finds_the_offline_counterfact_file(monkeypatch):
    from lightning_rome.cli import _data_file
    from lightning_rome.data import CounterFactDataModule

    monkeypatch.setenv("LIGHTNING_ROME_DATA", str(SHARED_DATA))
    assert _data_file("counterfact", None) == str(SHARED_DATA / "counterfact/counterfact-val.json")
    assert _data_file("zsre", None) == str(SHARED_DATA / "zsre/zsre_mend_train_1k.json")
    assert _data_file("counterfact", "x.json") == "x.json"
    dm = CounterFactDataModule(limit=2, url=None)  # configs without a path, offline
    dm.setup("test")
    assert dm.test_dataset.source == str(SHARED_DATA / "counterfact/counterfact-val.json")


def test_trace_window_defaults_to_depth_and_validates_before_writing(model_dir, tmp_path,
                                                                    capsys):
    base = ["trace", "--model", str(model_dir), "--prompt", "{} plays the", "--subject",
            "Toko Yasuda", "--samples", "2", "--kind", "hidden", "--kind", "mlp"]
    assert main([*base, "--window", "20", "--out", str(tmp_path / "a.png")]) == 2
    assert "--window 20 must be between 1 and the model's 3 layers" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert main([*base, "--out", str(tmp_path / "b.png")]) == 0
    err = capsys.readouterr().err
    assert "using 3 (the model has 3 layers" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-hidden.png", "b-mlp.png"]
    assert main([*base, "--out", str(tmp_path / "c.xyz")]) == 2
    assert "unknown image type" in capsys.readouterr().err


def test_evaluate_runs_the_trainer_on_the_given_device():
    from lightning_rome.cli import _trainer_device

    assert _trainer_device(None) == {"accelerator": "auto", "devices": 1}
    assert _trainer_device("cpu") == {"accelerator": "cpu", "devices": 1}
    assert _trainer_device("cuda:1") == {"accelerator": "gpu", "devices": [1]}
    assert _trainer_device("cuda") == {"accelerator": "gpu", "devices": [0]}
