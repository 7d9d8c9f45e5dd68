"""Batched teacher-forced scoring and generation, against unbatched runs and an independent
no-cache computation, with a tiny GPT-2 (real GPT-2 tokenizer) and a tiny Llama (a
SentencePiece-style tokenizer with BOS)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_factories import sentencepiece_tokenizer, tiny_model

from lightning_rome.hooks import module_hooks
from lightning_rome.models import get_layout
from lightning_rome.scoring import (
    candidate_nll,
    candidate_probs,
    forward_logits,
    generate,
    make_batch,
    pad_sequences,
)
from lightning_rome.tokens import continuation_ids, encode_prompt


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, gpt2_tokenizer):
    """(model, tokenizer): a wider init than the default gives peaked, non-uniform logits."""
    if request.param == "gpt2":
        tok = gpt2_tokenizer
    else:
        tok = sentencepiece_tokenizer("llama")
    model = tiny_model(request.param, vocab_size=len(tok), initializer_range=0.2,
                       max_position_embeddings=128, **(
                           {"n_positions": 128} if request.param == "gpt2" else {}))
    return model, tok


PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "Paris is the capital of",
    "Rome",
    "Who? Paris's Eiffel Tower (in Paris) is located in the city of",
    "The Eiffel Tower is in",
]
CANDIDATES = ["French", "the United States", "Italy", "Danielle Darrieux", "Paris"]


def reference_nll(model, tok, prompt: str, candidate: str) -> torch.Tensor:
    """Independent: tokenize prompt + " " + candidate as one text, run it without padding,
    and gather -log softmax at the candidate's tokens by hand."""
    full = encode_prompt(tok, prompt + " " + candidate)
    n_p = len(encode_prompt(tok, prompt))
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].double()  # (T, V)
    logp = logits.log_softmax(-1)
    return torch.stack([-logp[n_p - 1 + j, full[n_p + j]] for j in range(len(full) - n_p)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_candidate_nll_matches_independent_and_unbatched(lm, side):
    model, tok = lm
    prompts = [*PROMPTS, PROMPTS[2]]  # prompts and candidates of different lengths
    candidates = [*CANDIDATES, CANDIDATES[3]]
    nll = candidate_nll(model, tok, prompts, candidates, side=side)
    assert len(nll) == len(prompts)
    lengths = {len(n) for n in nll}
    assert max(lengths) >= 2 and len(lengths) > 1  # multi-token candidates of several lengths
    for i, (p, c) in enumerate(zip(prompts, candidates)):
        assert nll[i].dtype == torch.float32
        assert nll[i].shape == (len(continuation_ids(tok, c)),)
        ref = reference_nll(model, tok, p, c)
        torch.testing.assert_close(nll[i].double(), ref, rtol=1e-5, atol=1e-5)
        alone = candidate_nll(model, tok, [p], [c])[0]
        torch.testing.assert_close(nll[i], alone, rtol=1e-5, atol=1e-5)
        assert bool((nll[i] > 0).all())
    # Chunks of four give the same numbers as one batch; the papers' probability.
    probs = candidate_probs(model, tok, prompts, candidates, side=side, batch_size=4)
    torch.testing.assert_close(probs, torch.stack([torch.exp(-n.mean()) for n in nll]),
                               rtol=1e-5, atol=1e-7)
    assert bool(((probs > 0) & (probs < 1)).all())


def test_candidate_nll_edge_cases(lm):
    model, tok = lm
    assert candidate_nll(model, tok, [], []) == []
    assert candidate_probs(model, tok, [], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1 candidates"):
        candidate_nll(model, tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="empty or whitespace"):
        candidate_nll(model, tok, ["Paris is"], [" "])


def test_pad_sequences_layout():
    seqs = [[5, 6, 7], [8], [1, 2]]
    right = pad_sequences(seqs, pad_id=0, side="right")
    assert right.input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [1, 2, 0]]
    assert right.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert right.position_ids[:, :1].tolist() == [[0], [0], [0]]
    assert right.offsets.tolist() == [0, 0, 0] and right.lengths.tolist() == [3, 1, 2]
    left = pad_sequences(seqs, pad_id=9, side="left")
    assert left.input_ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 1, 2]]
    assert left.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert left.offsets.tolist() == [0, 2, 1]
    # Real tokens count from 0 whatever the padding.
    for b, s in zip((left, right), ("left", "right")):
        for i, seq in enumerate(seqs):
            real = b.attention_mask[i].bool()
            assert b.position_ids[i][real].tolist() == list(range(len(seq))), s
            assert b.input_ids[i][real].tolist() == seq
            assert b.input_ids[i, b.index(i, len(seq) - 1)] == seq[-1]
    with pytest.raises(ValueError, match="'middle'"):
        pad_sequences(seqs, 0, side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        pad_sequences([[1], []], 0)
    with pytest.raises(ValueError, match="empty"):
        pad_sequences([], 0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_logits_padded_equals_per_row(lm, side):
    model, tok = lm
    seqs = [encode_prompt(tok, p) for p in PROMPTS]
    batch = make_batch(tok, seqs, side=side)
    with torch.no_grad():
        logits = forward_logits(model, batch)  # (B, T, V)
        for i, s in enumerate(seqs):
            alone = model(torch.tensor([s])).logits[0]  # (n, V)
            rows = batch.attention_mask[i].bool()
            torch.testing.assert_close(logits[i, rows], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- generation
def independent_greedy(model, ids: list[int], n: int) -> list[int]:
    """Argmax decoding with no cache and no padding: the whole sequence each step."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
    return out


def generated_ids(model, tok, prompts, n, **kwargs) -> tuple[torch.Tensor, list[str]]:
    """Run ``generate`` for n + 1 tokens and read the first n generated ids off the embedding's
    inputs (every new token is fed back in; generation is prefix-consistent)."""
    fed: list[torch.Tensor] = []

    def record(x, name):
        fed.append(x.clone())
        return x

    embed = get_layout(model).name("embed")
    with module_hooks(model, [embed], edit_input=record):
        texts = generate(model, tok, prompts, max_new_tokens=n + 1, return_prompt=False,
                         **kwargs)
    assert len(fed) == n + 1 and fed[0].shape[0] == len(prompts)
    return torch.cat(fed[1:], dim=1), texts  # (B, n)


def test_greedy_equals_independent_no_cache_loop(lm):
    model, tok = lm
    n, prompts = 4, PROMPTS[:4]
    ids, texts = generated_ids(model, tok, prompts, n)
    for i, p in enumerate(prompts):
        expected = independent_greedy(model, encode_prompt(tok, p), n + 1)
        assert ids[i].tolist() == expected[:n]
        assert texts[i] == tok.decode(expected)
    # return_prompt=True gives prompt + continuation.
    full = generate(model, tok, PROMPTS[:2], max_new_tokens=n + 1)
    assert full == [PROMPTS[0] + texts[0], PROMPTS[1] + texts[1]]


def test_batched_greedy_equals_one_at_a_time(lm):
    model, tok = lm
    batched = generate(model, tok, PROMPTS, max_new_tokens=6)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    assert generate(model, tok, PROMPTS, max_new_tokens=6, top_k=1) == batched


def test_empty_prompt_starts_from_bos(lm):
    model, tok = lm
    start = tok.bos_token_id
    expected = independent_greedy(model, [start], 5)
    assert generate(model, tok, [""], max_new_tokens=5, return_prompt=False) == [
        tok.decode(expected)]


def test_top_k_samples_only_from_the_top_k(lm):
    model, tok = lm
    k, n, prompts = 3, 5, PROMPTS[:3]
    gen = torch.Generator().manual_seed(0)
    ids, _ = generated_ids(model, tok, prompts, n, top_k=k, generator=gen)
    not_argmax = 0
    with torch.no_grad():
        for i, p in enumerate(prompts):
            prefix = encode_prompt(tok, p)
            for j in range(n):
                logits = model(torch.tensor([prefix + ids[i, :j].tolist()])).logits[0, -1]
                top = set(logits.topk(k).indices.tolist())
                assert int(ids[i, j]) in top
                not_argmax += int(ids[i, j]) != int(logits.argmax())
    assert not_argmax > 0  # it did sample, not just take the argmax


def test_top_k_sampling_distribution(lm):
    """The first sampled token follows softmax over the top-k logits."""
    model, tok = lm
    prompt, k, n = "Rome", 2, 400
    with torch.no_grad():
        logits = model(torch.tensor([encode_prompt(tok, prompt)])).logits[0, -1]
    vals, idx = logits.topk(k)
    p = F.softmax(vals.double(), -1)
    gen = torch.Generator().manual_seed(1)
    fed = []

    def record(x, name):
        fed.append(x.clone())
        return x

    with module_hooks(model, [get_layout(model).name("embed")], edit_input=record):
        generate(model, tok, [prompt] * n, max_new_tokens=2, top_k=k, generator=gen)
    first = fed[1][:, 0]  # (n,)
    assert set(first.tolist()) <= set(idx.tolist())
    freq = (first == idx[0]).double().mean()
    sigma = float((p[0] * (1 - p[0]) / n).sqrt())
    assert abs(float(freq - p[0])) < 4 * sigma + 1e-9, (float(freq), float(p[0]))


def test_seeded_sampling_is_reproducible(lm):
    model, tok = lm

    def sample(seed):
        return generate(model, tok, PROMPTS[:3], max_new_tokens=5, top_k=5,
                        generator=torch.Generator().manual_seed(seed))

    assert sample(3) == sample(3)
    assert any(sample(3) != sample(s) for s in (4, 5, 6))


def test_stop_at_eos(lm):
    """Row 0 is forced to emit EOS at its third step; it stops there, the others go on as in
    ordinary greedy decoding."""
    model, tok = lm
    eos = tok.eos_token_id
    calls = []

    def force_eos(logits, name):  # (B, T, V)
        calls.append(1)
        if len(calls) == 3:
            logits = logits.clone()
            logits[0, -1, eos] = 1e4
        return logits

    head = get_layout(model).name("lm_head")
    with module_hooks(model, [head], edit_output=force_eos):
        texts = generate(model, tok, PROMPTS[:3], max_new_tokens=6, stop_at_eos=True,
                         return_prompt=False)
    greedy = generate(model, tok, PROMPTS[:3], max_new_tokens=6, return_prompt=False)
    expected0 = tok.decode(independent_greedy(model, encode_prompt(tok, PROMPTS[0]), 2))
    assert texts[0] == expected0
    assert texts[1:] == greedy[1:]


# ----------------------------------------------------------------------------------------------
# The teacher-forced row builder


# Token-id pairs (prompt, target): several prompt lengths, multi-token and empty targets, and a
# pair whose row is a prefix of another pair's row.
ID_PAIRS = [([11, 12, 13], [21, 22, 23]), ([14], [24]), ([11, 12, 13], [21, 22]),
            ([15, 16], [25, 26]), ([17, 18], [])]


def expected_layout(pairs, side, full_target):
    """Independent: each pair's own row, its padded width and offset, and the padded index of the
    logits predicting target token j (the token after position len(prompt) - 1 + j)."""
    seqs = [p + (t if full_target else t[:-1]) for p, t in pairs]
    T = max(len(s) for s in seqs)
    offsets = [T - len(s) if side == "left" else 0 for s in seqs]
    index = [[o + len(p) - 1 + j for j in range(len(t))] for (p, t), o in zip(pairs, offsets)]
    return seqs, T, offsets, index


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("full_target", [False, True])
def test_teacher_forced_rows_positions(gpt2_tokenizer, side, full_target):
    from lightning_rome.scoring import teacher_forced_rows

    pad = gpt2_tokenizer.eos_token_id  # GPT-2 has no pad token: the scoring pads with EOS
    tf = teacher_forced_rows(gpt2_tokenizer, [p for p, _ in ID_PAIRS], [t for _, t in ID_PAIRS],
                             side=side, full_target=full_target)
    seqs, T, offsets, index = expected_layout(ID_PAIRS, side, full_target)
    L = max(len(t) for _, t in ID_PAIRS)
    assert tf.batch.input_ids.shape == (len(ID_PAIRS), T)
    assert tf.predict_index.shape == tf.target_ids.shape == tf.target_mask.shape == (5, L)
    assert tf.row.tolist() == list(range(5))
    assert tf.prompt_lengths.tolist() == [3, 1, 3, 2, 2]
    assert tf.target_lengths.tolist() == [3, 1, 2, 2, 0]
    for i, ((p, t), s, o, q) in enumerate(zip(ID_PAIRS, seqs, offsets, index)):
        row = tf.batch.input_ids[i].tolist()
        assert row == [pad] * o + s + [pad] * (T - o - len(s))
        assert tf.batch.attention_mask[i].tolist() == [0] * o + [1] * len(s) + [0] * (
            T - o - len(s))
        n = len(t)
        assert tf.predict_index[i, :n].tolist() == q
        assert tf.target_ids[i, :n].tolist() == t
        assert tf.target_mask[i].tolist() == [True] * n + [False] * (L - n)
        assert int(tf.last_prompt_index[i]) == o + len(p) - 1
        if full_target:  # the target stands right after each position that predicts it
            assert [row[k + 1] for k in q] == t
    if full_target:
        labels, predict = tf.labels(), tf.predict_mask()
        for i, ((p, t), o, q) in enumerate(zip(ID_PAIRS, offsets, index)):
            want = [-100] * T
            for k, tok in zip(q, t):
                want[k + 1] = tok
            assert labels[i].tolist() == want
            marks = q if t else [o + len(p) - 1]  # a pair without target: its last prompt token
            assert predict[i].nonzero()[:, 0].tolist() == marks
    else:
        with pytest.raises(ValueError, match="whole target"):
            tf.labels()


def test_teacher_forced_rows_read_the_right_logits(gpt2_tokenizer):
    """token_logp on padded (left, right), prefix-shared and chunked rows equals each pair run
    alone without padding, read at positions counted by hand."""
    from lightning_rome.scoring import row_chunks, teacher_forced_rows

    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.2)
    pairs = [(p, t) for p, t in ID_PAIRS if t]
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]

    def alone(p, t):
        with torch.no_grad():
            logp = model(torch.tensor([p + t[:-1]])).logits[0].double().log_softmax(-1)
        return torch.stack([logp[len(p) - 1 + j, t[j]] for j in range(len(t))])

    want = [alone(p, t) for p, t in pairs]
    for side in ("left", "right"):
        for share in (False, True):
            tf = teacher_forced_rows(gpt2_tokenizer, prompts, targets, side=side,
                                     share_prefixes=share)
            with torch.no_grad():
                logp = forward_logits(model, tf.batch).double().log_softmax(-1)  # (N, T, V)
            got = tf.token_logp(logp)
            for i, w in enumerate(want):
                torch.testing.assert_close(got[i, : len(w)], w, rtol=1e-5, atol=1e-5)
                assert bool((got[i, len(w):] == 0).all())
            # The kept positions hold the same logits as the full pass.
            keep, slot = tf.kept_positions()
            kept = logp[torch.arange(len(tf.batch.input_ids))[:, None], keep]  # (N, K, V)
            m = tf.target_mask
            torch.testing.assert_close(kept[tf.row[:, None].expand_as(m)[m], slot[m]],
                                       logp[tf.row[:, None].expand_as(m)[m], tf.predict_index[m]])
    # Shared rows: pair 2's row (11 12 13 21) is a prefix of pair 0's (11 12 13 21 22).
    shared = teacher_forced_rows(gpt2_tokenizer, prompts, targets, share_prefixes=True)
    assert len(shared.batch.input_ids) == 3 and shared.row[0] == shared.row[2]
    with pytest.raises(ValueError, match="one row per pair"):
        shared.predict_mask()
    # Chunks of at most one row keep a pair with its host: the chunks rebuild the global rows.
    chunks = row_chunks(prompts, targets, 1, share_prefixes=True)
    assert sorted(i for c in chunks for i in c) == list(range(len(pairs)))
    rows = [teacher_forced_rows(gpt2_tokenizer, [prompts[i] for i in c],
                                [targets[i] for i in c], share_prefixes=True) for c in chunks]
    assert all(len(r.batch.input_ids) == 1 for r in rows)

    def tokens(b, n):
        return b.input_ids[n][b.attention_mask[n].bool()].tolist()

    assert [tokens(r.batch, 0) for r in rows] == [
        tokens(shared.batch, n) for n in range(len(shared.batch.input_ids))]


def test_teacher_forced_rows_refuses_bad_pairs(gpt2_tokenizer):
    from lightning_rome.scoring import teacher_forced_rows

    with pytest.raises(ValueError, match="empty prompt"):
        teacher_forced_rows(gpt2_tokenizer, [[1], []], [[2], [3]])
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        teacher_forced_rows(gpt2_tokenizer, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="no prompt/target pairs"):
        teacher_forced_rows(gpt2_tokenizer, [], [])


def test_generate_refuses_to_run_past_learned_positions(gpt2_tokenizer):
    """GPT-2's learned position embeddings end at n_positions: a generation that would feed a
    position past them is refused with the numbers (it was an IndexError inside the model),
    and one that uses the last position exactly runs."""
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), n_positions=16)
    prompt = "Paris is the capital of"  # 5 tokens
    n = len(encode_prompt(gpt2_tokenizer, prompt))
    fits = 16 - n + 1  # the last generated token is never fed back
    (text,) = generate(model, gpt2_tokenizer, [prompt], max_new_tokens=fits, return_prompt=False)
    assert len(encode_prompt(gpt2_tokenizer, text)) >= 1
    with pytest.raises(ValueError, match=rf"{n} tokens plus max_new_tokens={fits + 1} needs "
                                         rf"{n + fits} positions.*have 16"):
        generate(model, gpt2_tokenizer, [prompt], max_new_tokens=fits + 1)
    with pytest.raises(IndexError):  # the model itself, without the check
        model(torch.arange(17)[None] % 100)
