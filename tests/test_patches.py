"""WeightPatch: apply/revert are exact and transactional, compose adds deltas, save/load round-trips
and detects corruption."""

from __future__ import annotations

import copy
import json
import random
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_rome.models import canonical_weight, get_layout
from lightning_rome.patches import LowRankDelta, PatchMismatchError, WeightPatch
from lightning_rome.requests import EditRequest
from lightning_rome.utils.io import CorruptFileError, tensor_checksum


class Toy(nn.Module):
    """A GPT-2-style Conv1D ([in, out] storage) and two nn.Linear ([out, in])."""

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = Conv1D(nf=6, nx=5)  # canonical (6, 5)
        nn.init.normal_(self.conv.weight, std=0.5)
        self.lin = nn.Linear(5, 7)  # (7, 5)
        self.lin2 = nn.Linear(7, 7)  # (7, 7)
        self.to(dtype)


SHAPES = {"conv.weight": (6, 5), "lin.weight": (7, 5), "lin2.weight": (7, 7), "lin.bias": (7,)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def canonical(model: nn.Module, name: str) -> torch.Tensor:
    """Independent of the package: Conv1D weights transposed by hand."""
    p = model.get_parameter(name)
    return p.T if name == "conv.weight" else p


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bit_identical(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, snap[n]) and p.dtype == snap[n].dtype
               for n, p in model.named_parameters())


def random_delta(rng: random.Random, shape: tuple[int, ...], gen: torch.Generator):
    scale = 10 ** rng.uniform(-3, 0)
    if len(shape) == 1 or rng.random() < 0.4:
        dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
        return (scale * torch.randn(shape, generator=gen)).to(dtype)
    r = rng.randint(1, 3)
    dtype = rng.choice([torch.float32, torch.float64])
    return LowRankDelta((scale * torch.randn(shape[0], r, generator=gen)).to(dtype),
                        torch.randn(r, shape[1], generator=gen).to(dtype))


def random_patch(rng: random.Random, gen: torch.Generator, names=None) -> WeightPatch:
    names = names or rng.sample(sorted(SHAPES), rng.randint(1, len(SHAPES)))
    return WeightPatch({n: random_delta(rng, SHAPES[n], gen) for n in names}, method="random")


def dense(d) -> torch.Tensor:
    """Independent densification (float64)."""
    if isinstance(d, LowRankDelta):
        return d.left.double() @ d.right.double()
    return d.double()


# ------------------------------------------------------------------------------ LowRankDelta
def test_low_rank_delta():
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen)
    d = LowRankDelta(left, right)
    assert d.shape == (6, 5) and d.rank == 2
    torch.testing.assert_close(d.dense(torch.float64), left.double() @ right.double())
    assert d.norm() == pytest.approx(float(torch.linalg.norm(left.double() @ right.double())),
                                     rel=1e-12)
    with pytest.raises(ValueError, match=r"\(out, r\) and \(r, in\)"):
        LowRankDelta(torch.randn(6, 2), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\(out, r\) and \(r, in\)"):
        LowRankDelta(torch.randn(6), torch.randn(1, 5))
    with pytest.raises(TypeError, match="must be a Tensor or LowRankDelta"):
        WeightPatch({"a.weight": [[1.0]]})  # type: ignore[dict-item]
    patch = WeightPatch({"a": d, "b": torch.ones(3, 4)})
    assert patch.norms() == pytest.approx({"a": d.norm(), "b": 12 ** 0.5})
    assert patch.names == ["a", "b"]
    assert "rank 2" in repr(patch) and "dense" in repr(patch)


# ------------------------------------------------------------------------------ apply / revert
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_adds_canonical_delta(dtype):
    model = Toy(dtype)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(1)
    patch = WeightPatch.from_model(model, {
        "conv.weight": LowRankDelta(torch.randn(6, 1, generator=gen), torch.randn(1, 5,
                                                                                  generator=gen)),
        "lin.weight": torch.randn(7, 5, generator=gen)})
    patch.apply(model)
    assert patch.is_applied(model)
    for name in ("conv.weight", "lin.weight"):
        w0 = before[name].T if name == "conv.weight" else before[name]
        expected = (w0.float() + dense(patch.deltas[name]).float()).to(dtype)  # cast(W + Δ)
        assert torch.equal(canonical(model, name), expected)
    assert torch.equal(model.lin2.weight, before["lin2.weight"])
    if dtype == torch.float32:  # the module output moves by x Δᵀ
        x = torch.randn(3, 5, generator=gen)
        base = x @ before["conv.weight"] + before["conv.bias"]
        torch.testing.assert_close(model.conv(x) - base,
                                   x @ dense(patch.deltas["conv.weight"]).float().T)
    patch.revert(model)
    assert not patch.is_applied(model)
    assert bit_identical(model, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_apply_revert_sequences_are_bit_exact(dtype):
    """Random interleavings of apply and revert of several patches (sharing parameters) on
    Conv1D and Linear weights. At every step each weight is cast(W + Σ active Δ); when no patch
    is active on a parameter it is bit-identical to the original."""
    rng = random.Random(f"seq-{dtype}")
    gen = torch.Generator().manual_seed(0)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    n_sequences = 70 if dtype == torch.float32 else 65
    for seq in range(n_sequences):
        model = Toy(dtype, seed=seq)
        original = snapshot(model)
        patches = [random_patch(rng, gen) for _ in range(rng.randint(1, 4))]
        active: list[WeightPatch] = []
        for _ in range(rng.randint(2, 10)):
            idle = [p for p in patches if p not in active]
            if idle and (not active or rng.random() < 0.55):
                p = rng.choice(idle)
                p.apply(model)
                active.append(p)
            else:
                p = rng.choice(active)
                p.revert(model)
                active.remove(p)
            for name in SHAPES:
                on = [q for q in active if name in q.deltas]
                w0 = original[name].T if name == "conv.weight" else original[name]
                if not on:
                    assert torch.equal(canonical(model, name), w0), (seq, name)
                    continue
                expected = w0.double() + sum(dense(q.deltas[name]) for q in on)
                torch.testing.assert_close(canonical(model, name).double(), expected,
                                           rtol=tol, atol=tol)
        for p in rng.sample(active, len(active)):  # the rest, in random order
            p.revert(model)
        assert bit_identical(model, original), seq


def test_apply_twice_and_revert_twice_raise():
    model = Toy()
    before = snapshot(model)
    patch = WeightPatch.from_model(model, {"lin.weight": torch.ones(7, 5)})
    patch.apply(model)
    applied = snapshot(model)
    with pytest.raises(PatchMismatchError, match="already applied"):
        patch.apply(model)
    with pytest.raises(PatchMismatchError, match="already applied"):
        patch.apply(model, force=True)
    assert bit_identical(model, applied)
    patch.revert(model)
    assert bit_identical(model, before)
    with pytest.raises(PatchMismatchError, match="not applied"):
        patch.revert(model)
    assert bit_identical(model, before)


def test_checksum_mismatch_leaves_weights_untouched():
    source, target = Toy(seed=0), Toy(seed=1)
    patch = WeightPatch.from_model(source, {"conv.weight": torch.ones(6, 5),
                                            "lin.weight": torch.ones(7, 5)})
    assert patch.checksums == {n: tensor_checksum(source.get_parameter(n))
                               for n in ("conv.weight", "lin.weight")}
    before = snapshot(target)
    with pytest.raises(PatchMismatchError, match=r"'conv\.weight' does not match the checksum"):
        patch.apply(target)
    assert bit_identical(target, before) and not patch.is_applied(target)
    patch.apply(target, force=True)
    assert torch.equal(target.lin.weight, before["lin.weight"] + 1)
    patch.revert(target)
    assert bit_identical(target, before)


@pytest.mark.parametrize("bad", ["shape", "missing", "nan", "inf", "nan_low_rank"])
def test_bad_second_delta_writes_nothing(bad):
    model = Toy()
    before = snapshot(model)
    second = {
        "shape": ("lin.weight", torch.ones(5, 7)),  # the stored, not canonical, orientation
        "missing": ("lin3.weight", torch.ones(7, 5)),
        "nan": ("lin.weight", torch.full((7, 5), float("nan"))),
        "inf": ("lin.weight", torch.full((7, 5), float("inf"))),
        "nan_low_rank": ("lin.weight", LowRankDelta(torch.ones(7, 1),
                                                    torch.full((1, 5), float("nan")))),
    }[bad]
    patch = WeightPatch({"conv.weight": torch.ones(6, 5), second[0]: second[1]})
    message = {"shape": r"shape \(5, 7\), the model's weight is \(7, 5\)",
               "missing": "no parameter 'lin3.weight'", "nan": "NaN or inf",
               "inf": "NaN or inf", "nan_low_rank": "NaN or inf"}[bad]
    with pytest.raises(PatchMismatchError, match=message):
        patch.apply(model)
    assert bit_identical(model, before)
    assert not patch.is_applied(model)
    with pytest.raises(PatchMismatchError, match=message):
        patch.apply(model, force=True)
    assert bit_identical(model, before)
    # A good patch still applies and reverts exactly afterwards.
    good = WeightPatch({"conv.weight": torch.ones(6, 5)})
    good.apply(model)
    good.revert(model)
    assert bit_identical(model, before)


@pytest.mark.parametrize("how", ["optimizer", "data"])
def test_revert_after_outside_change_raises_unless_forced(how):
    model = Toy()
    before = snapshot(model)
    delta = 0.1 * torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    patch = WeightPatch.from_model(model, {"lin.weight": delta})
    patch.apply(model)
    if how == "optimizer":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.lin(torch.ones(2, 5)).sum().backward()
        opt.step()
    else:  # writes through .data do not bump the version counter; the checksum catches them
        model.lin.weight.data.add_(0.5)
    changed = snapshot(model)
    assert not torch.equal(changed["lin.weight"], before["lin.weight"] + delta)
    with pytest.raises(PatchMismatchError, match="changed since the patch was applied"):
        patch.revert(model)
    assert bit_identical(model, changed)
    assert patch.is_applied(model)
    patch.revert(model, force=True)  # subtracts the delta from the current weights
    torch.testing.assert_close(model.lin.weight, changed["lin.weight"] - delta, rtol=0,
                               atol=1e-6)
    assert not patch.is_applied(model)
    # A new patch starts from the changed weights.
    again = WeightPatch.from_model(model, {"lin.weight": delta})
    state = snapshot(model)
    again.apply(model)
    again.revert(model)
    assert bit_identical(model, state)


def test_forced_apply_over_outside_change_keeps_other_patches_revertible():
    """A on lin and conv; lin is changed by something else; B is forced onto lin. Reverting A
    must remove A's delta from lin too (it used to stay, silently)."""
    model = Toy()
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    a = WeightPatch({"lin.weight": torch.randn(7, 5, generator=gen),
                     "conv.weight": torch.randn(6, 5, generator=gen)})
    b = WeightPatch({"lin.weight": torch.randn(7, 5, generator=gen)})
    e = torch.randn(7, 5, generator=gen)
    a.apply(model)
    with torch.no_grad():
        model.lin.weight.add_(e)  # an outside change
    with pytest.raises(PatchMismatchError, match="changed outside its patches"):
        b.apply(model)
    b.apply(model, force=True)
    a.revert(model)
    assert torch.equal(model.conv.weight, before["conv.weight"])
    torch.testing.assert_close(model.lin.weight, before["lin.weight"] + e + b.deltas["lin.weight"])
    b.revert(model)
    torch.testing.assert_close(model.lin.weight, before["lin.weight"] + e)


def test_revert_by_subtraction_of_a_loaded_patch(tmp_path):
    """A patch saved in one process and loaded in another reverts an edited model by
    subtracting its deltas."""
    model = Toy()
    before = snapshot(model)
    patch = WeightPatch.from_model(model, {"lin.weight": torch.full((7, 5), 0.25)})
    patch.apply(model)
    patch.save(tmp_path / "p.safetensors")
    other = Toy(seed=5)
    other.load_state_dict(model.state_dict())  # the edited weights, elsewhere
    loaded = WeightPatch.load(tmp_path / "p.safetensors")
    assert not loaded.is_applied(other)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        loaded.revert(other)
    torch.testing.assert_close(other.lin.weight, before["lin.weight"], rtol=0, atol=1e-6)
    with pytest.raises(PatchMismatchError, match="not applied"):
        WeightPatch.load(tmp_path / "p.safetensors").revert(Toy())  # an unedited model
    bad = WeightPatch({"lin.weight": torch.ones(5, 7)})
    state = snapshot(other)
    with pytest.raises(PatchMismatchError, match="shape"):
        bad.revert(other)
    assert bit_identical(other, state)


def test_apply_on_a_real_gpt2_conv1d_moves_the_mlp_output(tiny_model):
    layout = get_layout(tiny_model)
    name = layout.name("mlp_out", 1)
    module = tiny_model.get_submodule(name)
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(32, 1, generator=gen), torch.randn(1, 128, generator=gen)
    patch = WeightPatch.from_model(tiny_model, {f"{name}.weight": LowRankDelta(u, v)},
                                   method="rome")
    k = torch.randn(4, 128, generator=gen)
    with torch.no_grad():
        y0 = module(k)
        patch.apply(tiny_model)
        y1 = module(k)
        patch.revert(tiny_model)
        y2 = module(k)
    torch.testing.assert_close(y1 - y0, k @ (u @ v).T, rtol=1e-5, atol=1e-5)  # Δ k = u (v·k)
    assert torch.equal(y2, y0)
    assert tuple(canonical_weight(module).shape) == (32, 128)


# ------------------------------------------------------------------------------ compose
def test_compose_sums_deltas():
    gen = torch.Generator().manual_seed(0)
    a = WeightPatch({"lin.weight": LowRankDelta(torch.randn(7, 1, generator=gen),
                                                torch.randn(1, 5, generator=gen)),
                     "conv.weight": torch.randn(6, 5, generator=gen)}, method="rome",
                    requests=[EditRequest("{} is in", "Paris", "Rome")],
                    checksums={"lin.weight": "a" * 64})
    b = WeightPatch({"lin.weight": LowRankDelta(torch.randn(7, 1, generator=gen),
                                                torch.randn(1, 5, generator=gen)),
                     "lin2.weight": torch.randn(7, 7, generator=gen)}, method="rome",
                    requests=[EditRequest("{} is in", "Rome", "Paris")],
                    checksums={"lin.weight": "b" * 64, "lin2.weight": "c" * 64})
    c = a.compose(b)
    assert set(c.names) == {"lin.weight", "conv.weight", "lin2.weight"}
    # (rank 2 on a 7×5 weight: 2·(7 + 5) ≤ 35 elements, so the factors concatenate)
    assert isinstance(c.deltas["lin.weight"], LowRankDelta) and c.deltas["lin.weight"].rank == 2
    torch.testing.assert_close(dense(c.deltas["lin.weight"]),
                               dense(a.deltas["lin.weight"]) + dense(b.deltas["lin.weight"]))
    assert torch.equal(c.deltas["conv.weight"], a.deltas["conv.weight"])
    assert c.method == "rome" and len(c.requests) == 2
    assert c.checksums == {"lin.weight": "a" * 64, "lin2.weight": "c" * 64}
    # other's checksum of a parameter self changes is of edited weights: never kept.
    no_sums = WeightPatch(a.deltas).compose(b)
    assert no_sums.checksums == {"lin2.weight": "c" * 64}
    # Mixed low-rank + dense becomes dense.
    mixed = a.compose(WeightPatch({"lin.weight": torch.ones(7, 5)}, method="ft"))
    assert mixed.method == "rome+ft"
    torch.testing.assert_close(dense(mixed.deltas["lin.weight"]),
                               dense(a.deltas["lin.weight"]) + 1)
    # Applying the composition is applying both.
    m1, m2 = Toy(), Toy()
    a_ = WeightPatch(a.deltas)
    b_ = WeightPatch(b.deltas)
    a_.apply(m1)
    b_.apply(m1)
    WeightPatch(c.deltas).apply(m2)
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match=r"cannot compose deltas of 'lin\.weight'"):
        a.compose(WeightPatch({"lin.weight": torch.ones(5, 7)}))


def _low_rank_patches(n: int, shape: tuple[int, int], rank: int = 1, device: str = "cpu",
                      seed: int = 0) -> list[WeightPatch]:
    g = torch.Generator().manual_seed(seed)
    make = ((lambda *s: torch.empty(*s, device="meta")) if device == "meta"
            else (lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)))
    return [WeightPatch({"w": LowRankDelta(make(shape[0], rank), make(rank, shape[1]))},
                        method="memit") for _ in range(n)]


def test_composed_low_rank_switches_to_dense_beyond_the_dense_size():
    m, n = 7, 5  # r·(m + n) ≤ m·n up to r = 2 (24 ≤ 35); r = 3 would store 36 > 35 numbers
    ps = _low_rank_patches(3, (m, n))
    two = ps[0].compose(ps[1])
    assert isinstance(two.deltas["w"], LowRankDelta) and two.deltas["w"].rank == 2
    three = two.compose(ps[2])
    all_at_once = ps[0].compose(ps[1], ps[2])
    want = sum(dense(p.deltas["w"]) for p in ps)
    for c in (three, all_at_once):
        d = c.deltas["w"]
        assert isinstance(d, torch.Tensor) and d.shape == (m, n) and d.dtype == torch.float64
        torch.testing.assert_close(d, want, rtol=1e-12, atol=1e-12)
        assert len(c.requests) == 0 and c.method == "memit"
    # A dense delta composed with more low-rank ones stays dense and keeps the sum.
    more = three.compose(*_low_rank_patches(2, (m, n), seed=1))
    torch.testing.assert_close(more.deltas["w"], want + sum(
        dense(p.deltas["w"]) for p in _low_rank_patches(2, (m, n), seed=1)))


@pytest.mark.parametrize("all_at_once", [True, False])
def test_ten_thousand_edits_on_a_gpt2_xl_layer_stay_at_most_dense(all_at_once):
    """10,000 rank-one edits of a 1600×6400 weight (GPT-2 XL's W_out): the composed patch
    stores at most the 10.24 M numbers of a dense delta (factors alone would be 80 M). Meta
    tensors: shapes only, no memory."""
    m, n, edits = 1600, 6400, 10_000
    ps = _low_rank_patches(edits, (m, n), device="meta")
    if all_at_once:
        total = ps[0].compose(*ps[1:])
    else:
        total, largest = ps[0], 0
        for p in ps[1:]:
            total = total.compose(p)
            d = total.deltas["w"]
            largest = max(largest, d.numel())
        assert largest <= m * n
    d = total.deltas["w"]
    assert isinstance(d, torch.Tensor) and tuple(d.shape) == (m, n)
    assert d.numel() <= m * n < edits * (m + n)
    # Just below the switch the factors are kept: 1,280 rank-one edits store 1280·8000 = m·n.
    r = m * n // (m + n)
    kept = ps[0].compose(*ps[1:r])
    assert isinstance(kept.deltas["w"], LowRankDelta) and kept.deltas["w"].numel() <= m * n
    assert isinstance(ps[0].compose(*ps[1:r + 1]).deltas["w"], torch.Tensor)


@pytest.mark.parametrize("rank", [1, 5, 64, 65, 200])
def test_low_rank_norm_matches_the_dense_norm(rank):
    g = torch.Generator().manual_seed(rank)
    d = LowRankDelta(torch.randn(90, rank, generator=g), torch.randn(rank, 70, generator=g))
    want = float((d.left.double() @ d.right.double()).norm())
    assert d.norm() == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------ save / load
def _full_patch(dtype=torch.float32) -> WeightPatch:
    gen = torch.Generator().manual_seed(0)
    model = Toy()
    return WeightPatch.from_model(model, {
        "lin.weight": LowRankDelta(torch.randn(7, 1, generator=gen).to(dtype),
                                   torch.randn(1, 5, generator=gen).to(dtype)),
        "conv.weight": torch.randn(6, 5, generator=gen).to(dtype),
    }, method="rome", hparams={"layers": [5], "v_lr": 0.5, "fact_token": "subject_last"},
        requests=[EditRequest("{} is in", "Paris", "Rome", "France", case_id=3)],
        model_name="toy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    patch = _full_patch(dtype)
    path = patch.save(tmp_path / "edit.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]  # no temp file left
    loaded = WeightPatch.load(path)
    assert loaded.method == "rome" and loaded.model_name == "toy"
    assert loaded.hparams == patch.hparams
    assert loaded.requests == patch.requests
    assert loaded.checksums == patch.checksums
    assert set(loaded.names) == set(patch.names)
    for n in patch.names:
        a, b = patch.deltas[n], loaded.deltas[n]
        assert type(a) is type(b)
        if isinstance(a, LowRankDelta):
            assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
            assert b.left.dtype == dtype
        else:
            assert torch.equal(a, b) and b.dtype == dtype
    header = loaded.header()
    assert header["format_version"] == 1 and header["format"] == "lightning_rome.weight_patch"
    # The file is plain safetensors with a JSON header.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lightning_rome"])
        assert meta["method"] == "rome" and meta["model_name"] == "toy"
        assert meta["requests"][0]["subject"] == "Paris"
        assert set(meta["checksums"]) == {"lin.weight", "conv.weight"}
    # The loaded patch applies exactly like the original.
    m1, m2 = Toy(), Toy()
    patch.apply(m1)
    loaded.apply(m2)
    assert bit_identical(m2, snapshot(m1))


def test_truncated_file_is_corrupt(tmp_path):
    path = _full_patch().save(tmp_path / "edit.safetensors")
    raw = path.read_bytes()
    for cut in (0, 4, 8, 50, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CorruptFileError):
            WeightPatch.load(path)


def test_every_flipped_byte_is_detected(tmp_path):
    """Flipping any single byte (or bit) of a patch file raises CorruptFileError, including
    bytes inside the header's strings and numbers (method, hyperparameters, requests)."""
    path = tmp_path / "edit.safetensors"
    raw = _full_patch().save(path).read_bytes()
    assert len(raw) > 1000
    for i in range(len(raw)):
        corrupt = bytearray(raw)
        corrupt[i] ^= 0x01 if i % 2 else 0xFF  # a low bit, or the whole byte
        path.write_bytes(bytes(corrupt))
        with pytest.raises(CorruptFileError):
            WeightPatch.load(path)


def test_wrong_format_version_and_foreign_files(tmp_path, monkeypatch):
    import lightning_rome.patches as patches_module

    monkeypatch.setattr(patches_module, "FORMAT_VERSION", 2)
    path = _full_patch().save(tmp_path / "v2.safetensors")
    monkeypatch.setattr(patches_module, "FORMAT_VERSION", 1)
    with pytest.raises(CorruptFileError, match="format version 2; this version reads 1"):
        WeightPatch.load(path)
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CorruptFileError, match="no valid lightning_rome header"):
        WeightPatch.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptFileError):
        WeightPatch.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        WeightPatch.load(tmp_path / "missing.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = _full_patch().save(tmp_path / "edit.safetensors")
    good = path.read_bytes()

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lightning_rome.patches.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _full_patch().save(path)
    assert path.read_bytes() == good  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]


def test_save_with_shared_delta_tensors(tmp_path):
    shared = torch.ones(7, 5)
    patch = WeightPatch({"lin.weight": shared, "lin2.weight": torch.ones(7, 7),
                         "conv.weight": LowRankDelta(torch.ones(6, 1), shared[:1])})
    loaded = WeightPatch.load(patch.save(tmp_path / "p.safetensors"))
    for n in patch.names:
        assert torch.equal(loaded.dense(n), patch.dense(n))


def test_to_and_copy_keep_provenance():
    patch = _full_patch()
    moved = patch.to(torch.float64)
    assert moved.deltas["conv.weight"].dtype == torch.float64
    assert moved.checksums == patch.checksums and moved.requests == patch.requests
    clone = copy.deepcopy(patch)
    assert clone.hparams == patch.hparams


# ------------------------------------------------------------------------------ transactions
class _FailingWrite:
    """Makes the first ``Tensor.copy_`` into one parameter's storage raise (a write failure in
    the middle of a multi-parameter patch), then lets every later write through."""

    def __init__(self, monkeypatch, param: torch.Tensor) -> None:
        self.ptr = param.untyped_storage().data_ptr()
        self.fired = False
        original = torch.Tensor.copy_

        def copy_(t, *args, **kwargs):
            if not self.fired and t.untyped_storage().data_ptr() == self.ptr:
                self.fired = True
                raise RuntimeError("injected write failure")
            return original(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "copy_", copy_)


def _two_param_patch() -> WeightPatch:
    g = torch.Generator().manual_seed(3)
    return WeightPatch({"conv.weight": LowRankDelta(torch.randn(6, 1, generator=g),
                                                    torch.randn(1, 5, generator=g)),
                        "lin.weight": torch.randn(7, 5, generator=g)}, method="two")


@pytest.mark.parametrize("others", [False, True])
def test_apply_failing_on_the_second_parameter_leaves_the_model_untouched(monkeypatch, others):
    model = Toy()
    if others:  # another patch already active on the first parameter
        WeightPatch({"conv.weight": torch.ones(6, 5)}).apply(model)
    before = snapshot(model)
    patch = _two_param_patch()
    failing = _FailingWrite(monkeypatch, model.get_parameter("lin.weight"))
    with pytest.raises(RuntimeError, match="injected write failure"):
        patch.apply(model)
    assert failing.fired
    assert bit_identical(model, before)
    assert not patch.is_applied(model)
    # The registry matches the weights: the patch applies and reverts exactly afterwards.
    patch.apply(model)
    assert not bit_identical(model, before)
    patch.revert(model)
    assert bit_identical(model, before)


@pytest.mark.parametrize("others", [False, True])
def test_revert_failing_on_the_second_parameter_keeps_the_patch_applied(monkeypatch, others):
    model = Toy()
    pristine = snapshot(model)
    other = WeightPatch({"lin.weight": torch.ones(7, 5)})
    if others:
        other.apply(model)
    before = snapshot(model)
    patch = _two_param_patch()
    patch.apply(model)
    edited = snapshot(model)
    failing = _FailingWrite(monkeypatch, model.get_parameter("lin.weight"))
    with pytest.raises(RuntimeError, match="injected write failure"):
        patch.revert(model)
    assert failing.fired
    assert bit_identical(model, edited)  # nothing half-reverted
    assert patch.is_applied(model)
    patch.revert(model)  # and it can still be reverted, exactly
    assert bit_identical(model, before)
    if others:
        other.revert(model)
    assert bit_identical(model, pristine)


def test_revert_by_subtraction_failing_midway_writes_nothing(monkeypatch):
    model = Toy()
    patch = _two_param_patch()
    patch.apply(model)
    loaded = WeightPatch(patch.deltas, method="two")  # not applied in this process
    edited = snapshot(model)
    _FailingWrite(monkeypatch, model.get_parameter("lin.weight"))
    with pytest.raises(RuntimeError, match="injected write failure"):
        loaded.revert(model)
    assert bit_identical(model, edited)


# ------------------------------------------------------------------------------ torch.compile
def test_compiled_wrapper_and_inner_module_share_one_patch_state():
    model = Toy()
    before = snapshot(model)
    compiled = torch.compile(model)  # only constructed: the wrapper has _orig_mod
    assert compiled._orig_mod is model
    patch = _two_param_patch()
    patch.apply(compiled)
    assert patch.is_applied(model) and patch.is_applied(compiled)
    with pytest.raises(PatchMismatchError, match="already applied"):
        patch.apply(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "reverted by subtracting" warning
        patch.revert(model)
    assert bit_identical(model, before)
    # And the other way round, with from_model's checksums taken through the wrapper.
    p2 = WeightPatch.from_model(compiled, {"lin.weight": torch.full((7, 5), 0.3)})
    p2.apply(model)
    p2.revert(compiled)
    assert bit_identical(model, before)


# ------------------------------------------------------------------------------ EditTransaction
def _patches(n: int, seed: int = 0) -> list[WeightPatch]:
    """``n`` patches that overlap on lin.weight (so the order of reverting matters)."""
    g = torch.Generator().manual_seed(seed)
    return [WeightPatch({"lin.weight": LowRankDelta(torch.randn(7, 1, generator=g),
                                                    torch.randn(1, 5, generator=g)),
                         "conv.weight" if i % 2 else "lin2.weight": torch.randn(
                             *(SHAPES["conv.weight"] if i % 2 else SHAPES["lin2.weight"]),
                             generator=g)}, method=f"p{i}") for i in range(n)]


@pytest.mark.parametrize("k", [0, 1, 3])
def test_transaction_error_in_the_kth_edit_restores_every_bit(k):
    from lightning_rome.patches import EditTransaction

    model = Toy()
    before = snapshot(model)
    patches = _patches(4)
    seen = []
    with pytest.raises(RuntimeError, match="edit 3 failed"), EditTransaction(model) as tx:
        for i, p in enumerate(patches):
            if i == k:
                raise RuntimeError("edit 3 failed")
            tx.apply(p)
            seen.append(snapshot(model))  # each edit sees the model edited so far
    assert bit_identical(model, before)
    assert not any(p.is_applied(model) for p in patches)
    assert len(seen) == k
    # A patch that cannot apply (here: bad shape) midway writes nothing, and the others revert.
    bad = WeightPatch({"lin.weight": torch.ones(5, 7)})
    with pytest.raises(PatchMismatchError), EditTransaction(model) as tx:
        tx.apply(patches[0])
        tx.apply(bad)
    assert bit_identical(model, before)


def test_transaction_without_commit_restores_and_with_commit_keeps_all():
    from lightning_rome.patches import EditTransaction

    model = Toy()
    before = snapshot(model)
    patches = _patches(3)
    with EditTransaction(model) as tx:
        for p in patches:
            tx.apply(p)
        total = tx.composed()
        assert tx.composed() is total
    assert bit_identical(model, before) and not total.is_applied(model)
    # The composed patch is every delta: apply them one by one on a twin, compare.
    twin = Toy()
    for p in _patches(3):
        p.apply(twin)
    with EditTransaction(model) as tx:
        for p in _patches(3):
            tx.apply(p)
        total = tx.composed(requests=[EditRequest("{} is in", "Paris", "Rome")])
        tx.commit()
    assert total.is_applied(model) and len(total.requests) == 1
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=n)
    total.revert(model)  # one revert undoes them all, bit-exactly
    assert bit_identical(model, before)
    # compose=False leaves the separate patches applied; one patch is kept as itself.
    ps = _patches(2)
    with EditTransaction(model) as tx:
        for p in ps:
            tx.apply(p)
        tx.commit(compose=False)
    assert all(p.is_applied(model) for p in ps)
    for p in reversed(ps):
        p.revert(model)
    assert bit_identical(model, before)
    one = _patches(1)[0]
    with EditTransaction(model) as tx:
        tx.apply(one)
        assert tx.composed() is one
        tx.commit()
    assert one.is_applied(model)
    one.revert(model)
    # An error after commit, still inside the block, undoes the committed edits too.
    with pytest.raises(KeyError), EditTransaction(model) as tx:
        for p in _patches(2):
            tx.apply(p)
        tx.commit()
        raise KeyError("later")
    assert bit_identical(model, before)


def test_transaction_misuse_is_refused():
    from lightning_rome.patches import EditTransaction

    model = Toy()
    tx = EditTransaction(model)
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        tx.apply(_patches(1)[0])
    with tx, pytest.raises(ValueError, match="applied no patch"):
        tx.composed()
    with pytest.raises(RuntimeError, match="used once"), tx:
        pass
    with EditTransaction(model) as tx2, pytest.raises(TypeError, match="expected a WeightPatch"):
        tx2.apply("not a patch")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the registry
def test_registry_lives_on_the_model_and_survives_a_state_dict_round_trip(tmp_path):
    from lightning_rome.patches import load_registry_state, registered_patch, registry_state

    model = Toy(torch.bfloat16)  # bf16: reverting by subtraction would not be bit-exact
    original = snapshot(model)
    a, b = _patches(2)
    a.apply(model)
    b.apply(model)
    assert registry_state(Toy()) is None  # another model: its own (empty) registry
    torch.save({"model": model.state_dict(), "patches": registry_state(model)}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)  # tensors and strings only
    fresh = Toy(torch.bfloat16, seed=5)
    fresh.load_state_dict(ckpt["model"])
    restored = load_registry_state(fresh, ckpt["patches"])
    assert set(restored) == {a.uid, b.uid}
    assert load_registry_state(fresh, ckpt["patches"]) == restored  # twice: a no-op
    assert registered_patch(fresh, a.uid) is restored[a.uid]
    # The loaded copies revert in any order, bit-exactly, without a subtraction warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored[a.uid].revert(fresh)
        restored[b.uid].revert(fresh)
    assert bit_identical(fresh, original)
    # A registry for other shapes or dtypes is refused, and nothing is registered.
    other = Toy(torch.float32)
    with pytest.raises(PatchMismatchError, match="original of"):
        load_registry_state(other, ckpt["patches"])
    assert registry_state(other) is None
    # A weight changed after the state was taken is detected at revert time.
    changed = Toy(torch.bfloat16, seed=5)
    changed.load_state_dict(ckpt["model"])
    with torch.no_grad():
        changed.lin.weight[0, 0] += 1
    patches = load_registry_state(changed, ckpt["patches"])
    with pytest.raises(PatchMismatchError, match="changed since the patch was applied"):
        patches[b.uid].revert(changed)


def test_patch_state_round_trip_keeps_everything():
    patch = _full_patch()
    back = WeightPatch.from_state(patch.to_state())
    assert back.uid == patch.uid and back.to("cpu").uid == patch.uid
    assert back.header() == patch.header()
    for n in patch.names:
        assert torch.equal(back.dense(n), patch.dense(n))
    assert WeightPatch(patch.deltas).uid != patch.uid


# ------------------------------------------------------------------------------ weight digests
@pytest.fixture
def sha_calls(monkeypatch):
    """Counts the SHA-256 computations of ``weight_digest``."""
    from lightning_rome.utils import io

    calls = []
    real = io.tensor_checksum

    def counted(t):
        calls.append(1)
        return real(t)

    monkeypatch.setattr(io, "tensor_checksum", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
def test_weight_digest_hashes_once_per_version_of_the_bits(sha_calls, dtype):
    from lightning_rome.utils.io import weight_digest

    p = nn.Parameter((torch.randn(40, 30) * 10).to(dtype), requires_grad=False)
    d0 = weight_digest(p, on_device=True)  # the accelerator path, run on the CPU here
    assert d0 == tensor_checksum(p) and len(sha_calls) == 1
    for _ in range(3):  # unchanged: only the fingerprint is computed
        assert weight_digest(p, on_device=True) == d0
    assert len(sha_calls) == 1
    with torch.no_grad():
        p[3, 4] += 1  # an ordinary in-place write
    d1 = weight_digest(p, on_device=True)
    assert d1 != d0 and d1 == tensor_checksum(p) and len(sha_calls) == 2
    version = p._version
    p.data[0, 0] += 2  # through .data: the version counter does not move
    assert p._version == version
    d2 = weight_digest(p, on_device=True)
    assert d2 not in (d0, d1) and d2 == tensor_checksum(p) and len(sha_calls) == 3
    # On the CPU (the default there) the SHA-256 is computed at every call.
    n = len(sha_calls)
    assert weight_digest(p) == weight_digest(p) == d2 and len(sha_calls) == n + 2


def test_weight_digest_sees_casts_and_reordered_elements(sha_calls):
    from lightning_rome.utils.io import tensor_fingerprint, weight_digest

    lin = nn.Linear(6, 4)
    d = weight_digest(lin.weight, on_device=True)
    lin.half()  # same Parameter object, new dtype and storage
    assert weight_digest(lin.weight, on_device=True) == tensor_checksum(lin.weight) != d
    x = torch.randn(64)
    fp = tensor_fingerprint(x)
    swapped = x.clone()
    swapped[[3, 40]] = swapped[[40, 3]]
    flipped = x.clone()
    flipped.view(torch.int32)[7] ^= 1  # one bit of one element
    assert len({fp, tensor_fingerprint(swapped), tensor_fingerprint(flipped)}) == 3
    assert tensor_fingerprint(x.clone()) == fp  # a function of the bits alone
    # The fingerprint is summed in chunks: chunking does not change it.
    from lightning_rome.utils import io

    big = torch.randn(1000)
    whole = tensor_fingerprint(big)
    old, io._FP_CHUNK = io._FP_CHUNK, 7
    try:
        assert tensor_fingerprint(big) == whole
    finally:
        io._FP_CHUNK = old
