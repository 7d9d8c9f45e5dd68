"""Security: nothing a user might receive is unpickled, patch files are validated before any
tensor touches a model, and no path from a config reaches a shell."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from testutils import REPO, tiny_gpt2

from lightning_rome import WeightPatch
from lightning_rome.patches import HEADER_CHECKSUM_KEY, HEADER_KEY, LowRankDelta
from lightning_rome.utils.io import CorruptFileError

from .helpers import assert_unchanged, snapshot

PACKAGE = REPO / "lightning_rome"
SOURCES = sorted(PACKAGE.rglob("*.py"))
NAME = "transformer.h.1.mlp.c_proj.weight"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unsafe_deserialisation_or_shell(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            for m in mods:
                assert m.split(".")[0] not in ("pickle", "cPickle", "dill", "marshal", "shelve"), (
                    f"{path}:{node.lineno} imports {m}")
    for call, func in _calls(tree):
        where = f"{path}:{call.lineno}: {ast.unparse(call)[:120]}"
        kw = {k.arg: k.value for k in call.keywords}
        if func.endswith("torch.load") or (func == "load" and "weights_only" in kw):
            assert "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) and (
                kw["weights_only"].value is True), f"torch.load without weights_only=True: {where}"
        if func.endswith(("np.load", "numpy.load")):
            assert "allow_pickle" in kw and kw["allow_pickle"].value is False, where
        assert func not in ("os.system", "os.popen", "eval", "exec", "pickle.load",
                            "pickle.loads"), f"forbidden call {where}"
        assert not func.startswith("subprocess."), f"subprocess in the package: {where}"
        if "shell" in kw:
            assert not (isinstance(kw["shell"], ast.Constant) and kw["shell"].value), where
        if func.endswith("yaml.load") or func == "yaml.unsafe_load":
            raise AssertionError(f"yaml.load (not safe_load): {where}")


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scanner itself fails on a torch.load without weights_only and a pickle import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nx = torch.load('f')\n")
    with pytest.raises(AssertionError, match="imports pickle"):
        test_no_unsafe_deserialisation_or_shell(bad)
    bad.write_text("import torch\nx = torch.load('f', weights_only=False)\n")
    with pytest.raises(AssertionError, match="weights_only"):
        test_no_unsafe_deserialisation_or_shell(bad)
    bad.write_text("import subprocess\nsubprocess.run(f'ls {p}', shell=True)\n")
    with pytest.raises(AssertionError, match="subprocess"):
        test_no_unsafe_deserialisation_or_shell(bad)


# ----------------------------------------------------------------------------- patch files
@pytest.fixture
def saved(tmp_path):
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    delta = LowRankDelta(torch.randn(32, 1, generator=g), torch.randn(1, 128, generator=g))
    patch = WeightPatch.from_model(model, {NAME: delta}, method="rome")
    return model, patch.save(tmp_path / "p.safetensors")


def _rewrite(path: Path, out: Path, *, header=None, tensors=None, fix_checksum=True,
             meta=None) -> Path:
    with safe_open(str(path), framework="pt") as f:
        m = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    h = json.loads(m[HEADER_KEY])
    if header is not None:
        header(h)
    if tensors is not None:
        tensors(ts)
    text = json.dumps(h, sort_keys=True)
    m[HEADER_KEY] = text
    if fix_checksum:
        import hashlib

        m[HEADER_CHECKSUM_KEY] = hashlib.sha256(text.encode()).hexdigest()
    if meta is not None:
        meta(m)
    save_file(ts, str(out), metadata=m)
    return out


def _set(key, value):
    def f(h):
        if value is _DEL:
            h.pop(key)
        else:
            h[key] = value
    return f


_DEL = object()


def _reshape(ts):
    k = next(k for k in ts if k.endswith("::left"))
    ts[k] = torch.randn(16, 1)


def _swap_tensor(ts):
    k = next(iter(ts))
    ts[k] = ts[k] + 1


TAMPERED = {
    "missing-version": (dict(header=_set("format_version", _DEL)), "format version None"),
    "wrong-version": (dict(header=_set("format_version", 99)), "format version 99"),
    "string-version": (dict(header=_set("format_version", "1")), "format version '1'"),
    "wrong-format": (dict(header=_set("format", "something.else")), "not a lightning_rome"),
    "header-edited-no-checksum": (dict(header=_set("method", "evil"), fix_checksum=False),
                                  "fails its checksum"),
    "no-header": (dict(meta=lambda m: m.pop(HEADER_KEY)), "no valid lightning_rome header"),
    "tensor-shape": (dict(tensors=_reshape), "fails its checksum|shape"),
    "tensor-values": (dict(tensors=_swap_tensor), "fails its checksum"),
    "entry-kind": (dict(header=lambda h: h["entries"][NAME].update(kind="exec")),
                   "do not match|unknown delta kind|malformed"),
    "extra-tensor": (dict(tensors=lambda ts: ts.update(extra=torch.zeros(1))), "do not match"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_patch_file_is_refused_before_touching_the_model(saved, tmp_path, case):
    model, path = saved
    kwargs, match = TAMPERED[case]
    bad = _rewrite(path, tmp_path / f"{case}.safetensors", **kwargs)
    before = snapshot(model)
    with pytest.raises(CorruptFileError, match=match):
        WeightPatch.load(bad).apply(model)
    assert_unchanged(model, before)


def test_consistent_header_with_wrong_shape_is_refused_at_apply(saved, tmp_path):
    """A well-formed file whose delta does not fit this model: refused by apply, untouched."""
    model, _ = saved
    g = torch.Generator().manual_seed(0)
    p = WeightPatch({NAME: LowRankDelta(torch.randn(16, 1, generator=g),
                                        torch.randn(1, 128, generator=g))})
    loaded = WeightPatch.load(p.save(tmp_path / "shape.safetensors"))
    before = snapshot(model)
    from lightning_rome.patches import PatchMismatchError

    with pytest.raises(PatchMismatchError, match=r"shape \(16, 128\).*\(32, 128\)"):
        loaded.apply(model)
    missing = WeightPatch({"transformer.h.9.mlp.c_proj.weight": torch.zeros(32, 128)})
    with pytest.raises(PatchMismatchError, match="no parameter"):
        WeightPatch.load(missing.save(tmp_path / "missing.safetensors")).apply(model)
    nan = WeightPatch({NAME: torch.full((32, 128), float("nan"))})
    with pytest.raises(PatchMismatchError, match="NaN or inf"):
        WeightPatch.load(nan.save(tmp_path / "nan.safetensors")).apply(model)
    assert_unchanged(model, before)


def test_pickle_file_posing_as_a_patch_is_not_executed(tmp_path):
    """A pickle (here a torch.save file) named like a patch: refused, nothing unpickled."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.safetensors"
    import pickle  # the test builds the malicious file; the package never imports pickle

    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CorruptFileError, match="not a readable safetensors"):
        WeightPatch.load(path)
    assert not marker.exists()
