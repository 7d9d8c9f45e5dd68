"""Tokenized MEND/KE training batches: shapes, label masks, locality from other cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cf_fixtures import rome_cases, write_json
from lightning.fabric.utilities.apply_func import move_data_to_device
from testutils import GPT2_TOKENIZER, tiny_gpt2

from lightning_rome.data import (
    IGNORE_INDEX,
    CounterFactDataModule,
    EditCase,
    EditTrainingBatch,
    EditTrainingCollator,
    LabeledBatch,
    RecordBatch,
    ZsREDataModule,
    labeled_batch,
    parse_counterfact_record,
)
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import candidate_nll


@pytest.fixture(scope="module")
def val_cases():
    dm = CounterFactDataModule("counterfact/counterfact-val.json", limit=16)
    dm.setup("test")
    return dm.test_dataset.records


def _check_rows(tok, lb: LabeledBatch) -> None:
    """Each row against an independent tokenization of ``prompt + " " + target``."""
    pad = tok.pad_token_id
    for i, (prompt, target) in enumerate(zip(lb.prompts, lb.targets)):
        text = prompt if target is None else f"{prompt} {target}"
        expect = tok(text)["input_ids"]
        row = lb.input_ids[i][lb.attention_mask[i].bool()].tolist()
        assert row == expect
        n = int(lb.attention_mask[i].sum())
        assert (lb.input_ids[i][n:] == pad).all()  # right padding
        labelled = lb.labels[i][lb.labels[i] != IGNORE_INDEX]
        if target is None:
            assert labelled.numel() == 0
            assert lb.predict_mask[i].nonzero().flatten().tolist() == [n - 1]
        else:
            assert tok.decode(labelled) == " " + target  # labels cover the target only
            n_t = int(lb.target_lengths[i])
            assert n_t == labelled.numel() and int(lb.prompt_lengths[i]) + n_t == n
            assert (lb.labels[i][: n - n_t] == IGNORE_INDEX).all()
            assert (lb.labels[i][n:] == IGNORE_INDEX).all()
            # predict_mask marks the positions right before each labelled token.
            pos = lb.predict_mask[i].nonzero().flatten()
            assert torch.equal(lb.input_ids[i][pos + 1], labelled)


def test_shapes_labels_and_masks(gpt2_tokenizer, val_cases):
    tok = gpt2_tokenizer
    batch = EditTrainingCollator(tok, seed=0, pool=val_cases)(val_cases[:4])
    assert isinstance(batch, EditTrainingBatch) and len(batch) == 4
    B = 4
    for lb, n in ((batch.edit, B), (batch.equiv, B), (batch.loc, B)):
        T = lb.input_ids.shape[1]
        assert lb.input_ids.shape == lb.attention_mask.shape == lb.labels.shape == (n, T)
        assert lb.predict_mask.shape == (n, T) and lb.predict_mask.dtype == torch.bool
        assert lb.case_index.tolist() == list(range(B))
        assert int(lb.attention_mask.sum(1).max()) == T
        _check_rows(tok, lb)
    c = val_cases[0]
    assert batch.edit.prompts[0] == "BBC One, by" and batch.edit.targets[0] == "Sega"
    assert tok.decode(batch.edit.labels[0][batch.edit.labels[0] != -100]) == " Sega"
    assert batch.equiv.prompts[0] == c.paraphrase_prompts[0]
    # Reduced CF: each case's own locality prompt with its true answer.
    assert batch.loc.prompts == [x.neighborhood_prompts[0] for x in val_cases[:4]]
    assert batch.loc.targets == [x.neighborhood_answers[0] for x in val_cases[:4]]
    assert batch.loc.source_case_ids == [x.case_id for x in val_cases[:4]]
    assert batch.cases.case_ids == [x.case_id for x in val_cases[:4]]


def test_labels_match_the_scoring_routine(gpt2_tokenizer, val_cases):
    """The HF loss over our labels equals the mean NLL from lightning_rome.scoring."""
    model = tiny_gpt2()
    batch = EditTrainingCollator(gpt2_tokenizer, pool=val_cases)(val_cases[:3])
    lb = batch.edit
    logits = model(input_ids=lb.input_ids, attention_mask=lb.attention_mask,
                   position_ids=lb.position_ids).logits  # (B, T, V)
    nll = candidate_nll(model, gpt2_tokenizer, lb.prompts, lb.targets)
    for i in range(3):
        ours = F.cross_entropy(logits[i, :-1], lb.labels[i, 1:], ignore_index=-100)
        assert torch.allclose(ours, nll[i].mean(), atol=1e-5)
        sel = F.cross_entropy(logits[i][lb.predict_mask[i]], lb.labels[i][lb.labels[i] != -100],
                              reduction="none")  # (n_target,)
        assert torch.allclose(sel, nll[i], atol=1e-5)


def test_original_schema_paraphrases_and_locality_sampling(gpt2_tokenizer, tmp_path):
    cases = [parse_counterfact_record(r) for r in rome_cases()]
    batch = EditTrainingCollator(gpt2_tokenizer, n_loc=2, seed=0)(cases[:3])
    # Every paraphrase (2 per case), in case order.
    assert batch.equiv.case_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.equiv.prompts[:2] == list(cases[0].paraphrase_prompts)
    assert set(batch.equiv.targets[:2]) == {"English"}
    # Two distinct neighborhood prompts per case, answered with the true object o^c.
    assert batch.loc.case_index.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(3):
        rows = [j for j in range(6) if batch.loc.case_index[j] == i]
        ps = [batch.loc.prompts[j] for j in rows]
        assert len(set(ps)) == 2 and set(ps) <= set(cases[i].neighborhood_prompts)
        assert {batch.loc.targets[j] for j in rows} == {cases[i].request.target_true}
    _check_rows(gpt2_tokenizer, batch.loc)
    _check_rows(gpt2_tokenizer, batch.equiv)
    one = EditTrainingCollator(gpt2_tokenizer, n_equiv=1, loc_answers=False, seed=0)(cases[:3])
    assert one.equiv.case_index.tolist() == [0, 1, 2]
    assert one.loc.targets == [None] * 3 and (one.loc.labels == -100).all()
    assert one.loc.predict_mask.sum(1).tolist() == [1, 1, 1]
    _check_rows(gpt2_tokenizer, one.loc)


def test_locality_drawn_from_other_cases(gpt2_tokenizer, val_cases):
    by_id = {c.case_id: c for c in val_cases}
    coll = EditTrainingCollator(gpt2_tokenizer, locality="other", n_loc=3, pool=val_cases, seed=1)
    batch = coll(val_cases[:4])
    assert len(batch.loc) == 12
    for j in range(12):
        own = val_cases[int(batch.loc.case_index[j])]
        src = by_id[batch.loc.source_case_ids[j]]
        assert src.case_id != own.case_id
        assert batch.loc.prompts[j] in src.neighborhood_prompts
        assert batch.loc.targets[j] == src.neighborhood_answers[0]
    # Drawn from a pool of 16 cases, several distinct sources appear.
    assert len(set(batch.loc.source_case_ids)) > 3
    # Without a pool: from the rest of the batch.
    b2 = EditTrainingCollator(gpt2_tokenizer, locality="other", seed=0)(val_cases[:2])
    assert b2.loc.source_case_ids == [val_cases[1].case_id, val_cases[0].case_id]
    with pytest.raises(ValueError, match="no other case"):
        EditTrainingCollator(gpt2_tokenizer, locality="other")(val_cases[:1])


def test_case_without_neighbors_draws_from_another(gpt2_tokenizer, val_cases):
    lonely = EditCase(EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar", case_id=99))
    batch = EditTrainingCollator(gpt2_tokenizer, pool=val_cases[:5], seed=0)(
        [lonely, val_cases[0]])
    assert batch.loc.source_case_ids[0] in {c.case_id for c in val_cases[:5]}
    assert batch.loc.source_case_ids[1] == val_cases[0].case_id  # has its own
    # No paraphrase: the edit prompt stands in for the equivalence input.
    assert batch.equiv.prompts[0] == "Toko Yasuda plays the"


def test_seeded_sampling_is_reproducible(gpt2_tokenizer, val_cases):
    def run(seed):
        c = EditTrainingCollator(gpt2_tokenizer, locality="other", pool=val_cases, seed=seed)
        return [c(val_cases[:4]).loc.source_case_ids for _ in range(3)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_left_padding(gpt2_tokenizer, val_cases):
    lb = EditTrainingCollator(gpt2_tokenizer, side="left", pool=val_cases)(val_cases[:3]).edit
    for i in range(3):
        n = int(lb.attention_mask[i].sum())
        assert lb.attention_mask[i, -n:].all()
        labelled = lb.labels[i][lb.labels[i] != -100]
        assert gpt2_tokenizer.decode(labelled) == " " + lb.targets[i]
        pos = lb.predict_mask[i].nonzero().flatten()
        assert torch.equal(lb.input_ids[i][pos + 1], labelled)
        assert lb.position_ids[i, -n:].tolist() == list(range(n))


def test_datamodule_edit_train_mode(tmp_path):
    path = write_json(tmp_path / "c.json", rome_cases())
    dm = CounterFactDataModule(path, train_split="0:4", val_split="4:", batch_size=2,
                               mode="edit_train", tokenizer=str(GPT2_TOKENIZER),
                               collator_kwargs={"locality": "other", "seed": 0},
                               cache_dir=tmp_path / "hf")
    dm.setup("fit")
    dm.setup("test")
    batches = list(dm.train_dataloader())
    assert [len(b) for b in batches] == [2, 2]
    ids = sorted(i for b in batches for i in b.cases.case_ids)
    assert ids == [0, 1, 2, 3]
    for b in batches:  # other cases come from the train split only
        assert set(b.loc.source_case_ids) <= {0, 1, 2, 3}
        assert all(s != b.cases.case_ids[k] for s, k in zip(b.loc.source_case_ids,
                                                             b.loc.case_index.tolist()))
    with pytest.raises(ValueError, match="no other case"):
        next(iter(dm.val_dataloader()))  # the val split has one case only
    test_batch = next(iter(dm.test_dataloader()))
    assert isinstance(test_batch, RecordBatch)  # evaluation always gets cases
    # Lightning's device transfer keeps the structure and moves the tensors.
    moved = move_data_to_device(batches[0], torch.device("cpu"))
    assert isinstance(moved, EditTrainingBatch) and moved.cases == batches[0].cases
    assert torch.equal(moved.edit.labels, batches[0].edit.labels)
    assert move_data_to_device(test_batch, "cpu") is test_batch


def test_zsre_edit_train_includes_loc_answer(gpt2_tokenizer):
    dm = ZsREDataModule("zsre/zsre_mend_train_1k.json", train_split="0:8", batch_size=4,
                        mode="edit_train", tokenizer=gpt2_tokenizer)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    for j in range(4):
        case = b.cases[int(b.loc.case_index[j])]
        assert b.loc.prompts[j] == case.neighborhood_prompts[0]
        assert b.loc.targets[j] == case.neighborhood_answers[0]
    _check_rows(gpt2_tokenizer, b.loc)
    _check_rows(gpt2_tokenizer, b.edit)


def test_labeled_batch_function(gpt2_tokenizer):
    lb = labeled_batch(gpt2_tokenizer, ["Toko Yasuda, the", "The capital of France is"],
                       ["piano", None])
    expect = gpt2_tokenizer("Toko Yasuda, the piano")["input_ids"]
    assert lb.input_ids[0].tolist() == expect
    assert lb.labels[0].tolist() == [-100] * (len(expect) - 1) + [expect[-1]]
    assert (lb.labels[1] == -100).all()
    n1 = len(gpt2_tokenizer("The capital of France is")["input_ids"])
    assert lb.predict_mask[1].nonzero().flatten().tolist() == [n1 - 1]
    assert lb.case_index.tolist() == [0, 1] and lb.source_case_ids == [None, None]
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        labeled_batch(gpt2_tokenizer, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="has no tokens"):
        labeled_batch(gpt2_tokenizer, [""], ["c"])
    with pytest.raises(ValueError, match="empty"):
        labeled_batch(gpt2_tokenizer, ["a"], [" "])
