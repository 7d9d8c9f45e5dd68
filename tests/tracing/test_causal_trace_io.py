"""``CausalTrace``: validation, derived values, and atomic, validated JSON / safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lightning_rome.tracing import CausalTrace
from lightning_rome.utils.io import CorruptFileError


def make_trace(**overrides) -> CausalTrace:
    kw = dict(scores=torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.5, 0.3], [0.1, 0.4, 0.9],
                                   [0.1, 0.2, 0.9]]),
              high_score=0.9, low_score=0.1, tokens=["The", " Space", " Needle", " is"],
              input_ids=[464, 4687, 39949, 318], subject_range=(1, 3), answer=" Seattle",
              answer_id=7312, kind="mlp", window=10, prompt="The Space Needle is",
              subject="Space Needle", predicted=" Seattle", noise={"type": "gaussian", "nu": 0.3},
              samples=10, seed=0)
    kw.update(overrides)
    return CausalTrace(**kw)


def test_derived_values():
    t = make_trace()
    assert t.n_tokens == 4 and t.n_layers == 3 and t.label == "mlp"
    assert t.total_effect == pytest.approx(0.8)
    torch.testing.assert_close(t.indirect_effect, t.scores - 0.1)
    assert t.peak() == (2, 2, pytest.approx(0.8))
    assert t.correct
    assert make_trace(kind="hidden", sever="attn").label == "hidden/sever=attn"


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_save_load_roundtrip_is_exact(tmp_path, suffix):
    t = make_trace(scores=torch.rand(4, 3, generator=torch.Generator().manual_seed(0)))
    path = t.save(tmp_path / f"trace{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"trace{suffix}"]  # no temp files
    back = CausalTrace.load(path)
    assert back == t and torch.equal(back.scores, t.scores)
    assert back.subject_range == (1, 3) and back.noise == {"type": "gaussian", "nu": 0.3}


@pytest.mark.parametrize("field,value,match", [
    ("scores", torch.zeros(3, 3), "3 token rows"),
    ("scores", torch.zeros(4), "grid"),
    ("subject_range", (2, 9), "subject_range"),
    ("subject_range", (2, 2), "subject_range"),
    ("kind", "neurons", "kind"),
    ("window", 0, "window"),
    ("high_score", 1.5, "high_score"),
    ("low_score", float("nan"), "low_score"),
    ("scores", torch.full((4, 3), float("nan")), "finite"),
    ("sever", "mlp", "sever"),  # only hidden traces may be severed
])
def test_inconsistent_traces_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        make_trace(**{field: value})


def test_load_validates(tmp_path):
    t = make_trace()
    good = t.to_dict()
    cases = {
        "notjson.json": "{not json",
        "format.json": json.dumps({**good, "format": "something.else"}),
        "version.json": json.dumps({**good, "version": 99}),
        "missing.json": json.dumps({k: v for k, v in good.items() if k != "scores"}),
        "shape.json": json.dumps({**good, "scores": [[0.1, 0.2]]}),
        "kind.json": json.dumps({**good, "kind": "both"}),
        "ragged.json": json.dumps({**good, "scores": [[0.1], [0.1, 0.2]]}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(CorruptFileError, match=name):
            CausalTrace.load(tmp_path / name)
    # A truncated safetensors file, and one that is not a trace.
    full = t.save(tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(full[: len(full) // 2])
    with pytest.raises(CorruptFileError):
        CausalTrace.load(tmp_path / "cut.safetensors")
    save_file({"scores": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"),
              metadata={"format": "else"})
    with pytest.raises(CorruptFileError, match="format"):
        CausalTrace.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        CausalTrace.load(tmp_path / "absent.json")
    with pytest.raises(ValueError, match=r"\.json or \.safetensors"):
        t.save(tmp_path / "trace.pt")


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = make_trace().save(tmp_path / "t.json")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(OSError, match="disk full"):
        make_trace(high_score=0.5).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
