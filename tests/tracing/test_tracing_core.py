"""``trace``/``trace_all``: the probabilities against independent computations, exact
properties of the grid, noise options, reproducibility and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from tracing_helpers import PROMPT, SUBJECT, peaked_gpt2

from lightning_rome.scoring import candidate_probs
from lightning_rome.tokens import SubjectNotFoundError, encode_prompt, fill, subject_span
from lightning_rome.tracing import (
    AnswerMismatchWarning,
    GaussianNoise,
    SubjectReplacement,
    UniformNoise,
    as_template,
    subject_embedding_std,
    trace,
    trace_all,
)

TEXT = fill(PROMPT, SUBJECT)[0]


def _probs_from_embeds(model, embeds, answer_id):
    with torch.no_grad():
        logits = model(inputs_embeds=embeds).logits[:, -1]
    return F.softmax(logits.float(), -1)[:, answer_id]


def test_clean_and_corrupted_probabilities_are_right(gpt2_model, gpt2_tokenizer):
    with pytest.warns(AnswerMismatchWarning, match="Paris"):  # not this random model's guess
        t = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, "hidden", samples=4, noise=2.0,
                  seed=7, answer="Paris")
    # P[o]: the foundation's scoring of the one-token answer " Paris".
    assert t.answer == " Paris"
    p_clean = float(candidate_probs(gpt2_model, gpt2_tokenizer, [TEXT], ["Paris"])[0])
    assert t.high_score == pytest.approx(p_clean, abs=1e-6)
    # P*[o]: rebuild the four noise draws from the same seed and run the model on embeddings.
    ids = torch.tensor(encode_prompt(gpt2_tokenizer, TEXT))
    b, e = subject_span(gpt2_tokenizer, PROMPT, SUBJECT)
    eps = 2.0 * torch.randn((4, e - b, 32), generator=torch.Generator().manual_seed(7))
    embeds = gpt2_model.transformer.wte.weight[ids].detach()[None].repeat(4, 1, 1)
    embeds[:, b:e] += eps
    p_corrupt = _probs_from_embeds(gpt2_model, embeds, t.answer_id).mean()
    assert t.low_score == pytest.approx(float(p_corrupt), abs=1e-6)
    assert t.noise == {"type": "gaussian", "nu": 2.0, "k": None}


def test_grid_structure(gpt2_model, gpt2_tokenizer):
    traces = trace_all(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, window=3, samples=3)
    T = len(encode_prompt(gpt2_tokenizer, TEXT))
    b, e = subject_span(gpt2_tokenizer, PROMPT, SUBJECT)
    assert list(traces) == ["hidden", "mlp", "attn"]
    h = traces["hidden"]
    assert h.scores.shape == (T, 4) and h.subject_range == (b, e) and len(h.tokens) == T
    assert h.tokens[b:e] == [" Space", " Need", "le"]
    # Restoring h at the last layer of the last token is the clean run.
    assert float(h.scores[-1, -1]) == pytest.approx(h.high_score, abs=1e-6)
    # Tokens before the subject are untouched by the noise: restoring them changes nothing.
    for t in traces.values():
        assert torch.equal(t.scores[:b], torch.full((b, 4), t.low_score))
    # Default answer: the model's own greedy prediction, which the corruption makes less likely.
    assert h.correct and h.answer == h.predicted
    assert h.low_score < 0.5 * h.high_score
    with torch.no_grad():
        logits = gpt2_model(torch.tensor([encode_prompt(gpt2_tokenizer, TEXT)])).logits[0, -1]
    assert h.answer_id == int(logits.argmax())


def test_template_and_full_text_give_the_same_trace(gpt2_model, gpt2_tokenizer):
    kw = dict(kind="mlp", window=2, samples=2, seed=1)
    a = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, **kw)
    b = trace(gpt2_model, gpt2_tokenizer, TEXT, SUBJECT, **kw)
    assert a == b
    assert as_template("Paris is in France, Paris", "Paris") == "{} is in France, Paris"


def test_seeded_and_reproducible(gpt2_model, gpt2_tokenizer):
    kw = dict(kind="hidden", samples=3)
    a = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, seed=5, **kw)
    rng = torch.get_rng_state()
    b = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not touched
    c = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, seed=6, **kw)
    assert torch.equal(a.scores, b.scores) and a.low_score == b.low_score
    assert not torch.equal(a.scores, c.scores)


def test_zero_noise_changes_nothing(gpt2_model, gpt2_tokenizer):
    t = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, "attn", window=2, samples=2,
              noise=0.0)
    assert t.low_score == pytest.approx(t.high_score, abs=1e-7)
    torch.testing.assert_close(t.scores, torch.full_like(t.scores, t.high_score),
                               rtol=0, atol=1e-6)


def test_severing_changes_the_mlp_mediated_effect(gpt2_model, gpt2_tokenizer):
    traces = trace_all(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT,
                       ["hidden", "hidden/sever=mlp", "hidden/sever=attn"], samples=3, noise=2.0)
    h, sm, sa = (traces[k] for k in ("hidden", "hidden/sever=mlp", "hidden/sever=attn"))
    b, e = h.subject_range
    # At the last layer nothing comes later, so severing is a no-op there.
    torch.testing.assert_close(sm.scores[:, -1], h.scores[:, -1], rtol=0, atol=1e-6)
    # Earlier, at the subject, it changes the effect.
    assert float((sm.scores[b:e, :-1] - h.scores[b:e, :-1]).abs().max()) > 1e-4
    assert float((sa.scores[b:e, :-1] - h.scores[b:e, :-1]).abs().max()) > 1e-4
    assert sm.label == "hidden/sever=mlp" and sm.sever == "mlp"


def test_eval_mode_is_restored(gpt2_tokenizer):
    model = peaked_gpt2(n_layer=2)
    model.train()
    model.transformer.h[0].eval()  # a deliberately frozen submodule keeps its own flag
    trace(model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2)
    assert model.training and model.transformer.h[1].training
    assert not model.transformer.h[0].training


# ------------------------------------------------------------------------------ noise
def test_subject_embedding_std(gpt2_model, gpt2_tokenizer):
    subjects = ["Space Needle", "Vinson Massif", "Beats Music"]
    rows = [gpt2_model.transformer.wte.weight.detach()[gpt2_tokenizer(s, add_special_tokens=False)
                                              ["input_ids"]] for s in subjects]
    expected = float(torch.cat(rows).double().std())
    assert subject_embedding_std(gpt2_model, gpt2_tokenizer, subjects) == pytest.approx(expected)
    noise = GaussianNoise.from_subjects(gpt2_model, gpt2_tokenizer, subjects)
    assert noise.nu == pytest.approx(3 * expected)
    with pytest.raises(ValueError, match="at least one"):
        subject_embedding_std(gpt2_model, gpt2_tokenizer, [])


def test_default_noise_is_three_sigma_of_the_subject(gpt2_model, gpt2_tokenizer):
    t = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2)
    sigma = subject_embedding_std(gpt2_model, gpt2_tokenizer, [SUBJECT])
    assert t.noise["type"] == "gaussian" and t.noise["nu"] == pytest.approx(3 * sigma)


def test_uniform_noise_is_bounded(gpt2_model, gpt2_tokenizer):
    c = UniformNoise(nu=0.5).draw(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, 50,
                                  torch.Generator().manual_seed(0))
    assert c.values.shape == (50, 3, 32) and not c.replace
    assert float(c.values.abs().max()) <= 0.5 and float(c.values.abs().max()) > 0.45
    assert abs(float(c.values.mean())) < 0.02
    t = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2, noise=UniformNoise(nu=2.0))
    assert t.noise["type"] == "uniform"


def test_subject_replacement_equals_the_other_prompt(gpt2_model, gpt2_tokenizer):
    # " Space Need le" and " Statue of Liberty" take 3 tokens, " Golden Gate" takes 2.
    same, other = "Statue of Liberty", "Golden Gate"
    assert subject_span(gpt2_tokenizer, PROMPT, same) == subject_span(gpt2_tokenizer, PROMPT,
                                                                      SUBJECT) == (1, 4)
    t = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2,
              noise=SubjectReplacement([same, other, SUBJECT]))
    assert t.noise == {"type": "replace", "subjects": [same, same]}
    # The corrupted run is exactly the prompt about the other subject.
    ids = torch.tensor([encode_prompt(gpt2_tokenizer, fill(PROMPT, same)[0])])
    with torch.no_grad():
        p = F.softmax(gpt2_model(ids).logits[0, -1], -1)[t.answer_id]
    assert t.low_score == pytest.approx(float(p), abs=1e-6)
    with pytest.raises(ValueError, match="same 3 token"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2,
              noise=SubjectReplacement([other]))


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused(gpt2_model, gpt2_tokenizer):
    with pytest.raises(SubjectNotFoundError, match="Eiffel"):
        trace(gpt2_model, gpt2_tokenizer, TEXT, "Eiffel Tower")
    with pytest.raises(ValueError, match="window must be an integer between 1 and 4"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, "mlp", window=5)
    with pytest.raises(ValueError, match="window"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, "attn", window=0)
    with pytest.raises(ValueError, match="window"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, "hidden", window=0)
    with pytest.raises(ValueError, match="unknown trace kind 'neurons'"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, "neurons")
    with pytest.raises(ValueError, match="sever"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, "mlp", window=2, sever="attn")
    with pytest.raises(ValueError, match="samples"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=0)
    with pytest.raises(ValueError, match="engine"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, engine="fast")
    with pytest.raises(ValueError, match="nu"):
        GaussianNoise(nu=-1.0)
    with pytest.raises(ValueError, match="empty"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, "")
    with pytest.raises(ValueError, match="duplicates"):
        trace_all(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, ["hidden", "hidden"])


def test_unexpected_answer_warns_with_the_clean_probability(gpt2_model, gpt2_tokenizer):
    greedy = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2)
    wrong = "Paris" if greedy.answer.strip() != "Paris" else "London"
    with pytest.warns(AnswerMismatchWarning, match="clean probability") as rec:
        t = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2, answer=wrong)
    assert f"{t.high_score:.4g}" in str(rec[0].message)
    assert rec[0].filename == __file__  # reported at the caller's line
    assert not t.correct and t.answer.strip() == wrong
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2,
                     answer=greedy.answer_id)
    assert same == greedy
    with pytest.raises(ValueError, match="token id"):
        trace(gpt2_model, gpt2_tokenizer, PROMPT, SUBJECT, samples=2, answer=10**6)
