"""Long runs of apply/revert: 1,000 random cycles of rank-one (ROME-style), multi-layer low-rank
(MEMIT-style) and dense patches, on float32/float16/bfloat16 weights, end bit-identical; and
composing and reverting patches in any order restores the original."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from testutils import tiny_gpt2

from lightning_rome import EditRequest, WeightPatch
from lightning_rome.editing import MEMIT, ROME
from lightning_rome.patches import LowRankDelta

from .helpers import CONTEXTS, assert_unchanged, second_moment, snapshot

NAMES = [f"transformer.h.{i}.mlp.c_proj.weight" for i in range(3)]  # canonical (32, 128)


def _random_patch(model, kind: str, g: torch.Generator) -> WeightPatch:
    if kind == "rome":  # rank one on one layer
        n = NAMES[int(torch.randint(0, 3, (1,), generator=g))]
        d = LowRankDelta(torch.randn(32, 1, generator=g), torch.randn(1, 128, generator=g) / 50)
        return WeightPatch.from_model(model, {n: d}, method="rome")
    if kind == "memit":  # rank r on every layer
        deltas = {n: LowRankDelta(torch.randn(32, 3, generator=g) / 10,
                                  torch.randn(3, 128, generator=g) / 10) for n in NAMES}
        return WeightPatch.from_model(model, deltas, method="memit")
    deltas = {n: torch.randn(32, 128, generator=g) / 30 for n in NAMES[:2]}
    return WeightPatch.from_model(model, deltas, method="ft")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_thousand_random_apply_revert_cycles(dtype):
    model = tiny_gpt2(n_layer=3).to(dtype)
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    active: list[WeightPatch] = []
    for _ in range(1000):
        # Apply a fresh patch (computed on the current weights) or revert a random active one.
        if not active or (len(active) < 6 and rng.random() < 0.55):
            p = _random_patch(model, rng.choice(["rome", "memit", "dense"]), g)
            p.apply(model)
            active.append(p)
        else:
            active.pop(rng.randrange(len(active))).revert(model)
        if not active:
            assert_unchanged(model, before)
    for p in rng.sample(active, len(active)):
        p.revert(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compose_and_revert_in_every_order(dtype):
    model = tiny_gpt2(n_layer=3).to(dtype)
    before = snapshot(model)
    g = torch.Generator().manual_seed(1)
    patches = [_random_patch(model, k, g) for k in ("rome", "memit", "dense", "rome")]
    for p in patches:  # all computed on the original weights, so checksums drop for reuse
        p.checksums = {}
    # Applying in any order then reverting in any order restores the bits.
    for apply_order in itertools.permutations(range(4)):
        for p in (patches[i] for i in apply_order):
            p.apply(model)
        for i in reversed(apply_order) if apply_order[0] % 2 else apply_order:
            patches[i].revert(model)
        assert_unchanged(model, before)
    # A composition equals the sequence within float tolerance and reverts bit-exactly.
    total = patches[0].compose(patches[1]).compose(patches[2]).compose(patches[3])
    for p in patches:
        p.apply(model)
    seq = {n: model.get_parameter(n).detach().float().clone() for n in NAMES}
    for p in reversed(patches):
        p.revert(model)
    total.apply(model)
    for n in NAMES:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(model.get_parameter(n).detach().float(), seq[n], atol=tol,
                                   rtol=tol)
    total.revert(model)
    assert_unchanged(model, before)
    # Interleaving a composition with single patches, reverted out of order.
    pair = patches[1].compose(patches[2])
    for p in (patches[0], pair, patches[3]):
        p.apply(model)
    for p in (pair, patches[3], patches[0]):
        p.revert(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_real_rome_and_memit_patches_cycle_exactly(dtype, gpt2_tokenizer):
    model = tiny_gpt2(n_layer=3).to(dtype)
    before = snapshot(model)
    reqs = [EditRequest("{} plays the", "Toko Yasuda", "piano"),
            EditRequest("{} is located in", "Eiffel Tower", "Rome")]
    rome = ROME({"layer": 1, "v_num_grad_steps": 2, "context_templates": CONTEXTS},
                second_moment=second_moment).edit(model, gpt2_tokenizer, reqs[0])
    memit = MEMIT({"layers": [1, 2], "v_num_grad_steps": 2, "context_templates": CONTEXTS,
                   "mom2_update_weight": 1.0},  # representable in fp16 (see test_low_precision)
                  second_moment=second_moment).edit(model, gpt2_tokenizer, reqs)
    rome.checksums = memit.checksums = {}  # each is also applied on top of the other below
    rng = random.Random(0)
    active: list[WeightPatch] = []
    for _ in range(200):
        free = [p for p in (rome, memit) if p not in active]
        if free and (not active or rng.random() < 0.5):
            p = rng.choice(free)
            p.apply(model)
            active.append(p)
        else:
            active.pop(rng.randrange(len(active))).revert(model)
    for p in active:
        p.revert(model)
    assert_unchanged(model, before)
