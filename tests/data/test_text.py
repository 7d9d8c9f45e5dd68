"""Text corpora: files, Hugging Face datasets, iterables, named corpora, sharding, DataModule."""

from __future__ import annotations

import itertools

import datasets
import pytest
import torch

from lightning_rome.data.text import (
    HFTextCorpus,
    IterableTextCorpus,
    TextCorpusDataModule,
    TextFileCorpus,
    as_corpus,
    is_heading,
)

RAW = """ = Alpha =

 First paragraph about alpha .
 = = Beta section = =
 Second paragraph , with a comma .

 \t
 Third one = not a heading
 = = = Gamma = = =
 Fourth paragraph .
"""
EXPECTED = ["First paragraph about alpha .", "Second paragraph , with a comma .",
            "Third one = not a heading", "Fourth paragraph ."]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(RAW, encoding="utf-8")
    return path


def test_is_heading():
    assert is_heading(" = Homarus gammarus = ")
    assert is_heading(" = = Description = = ")
    assert is_heading("= = = Deep = = =")
    assert not is_heading("Third one = not a heading")
    assert not is_heading("=")
    assert not is_heading("a = b")


def test_text_file_corpus_skips_blank_and_heading_lines(text_file):
    corpus = TextFileCorpus(text_file)
    assert list(corpus) == EXPECTED
    assert list(corpus) == EXPECTED  # re-iterable
    kept = list(TextFileCorpus(text_file, skip_headings=False))
    assert kept == ["= Alpha =", EXPECTED[0], "= = Beta section = =", EXPECTED[1], EXPECTED[2],
                    "= = = Gamma = = =", EXPECTED[3]]


def test_text_file_identity_tracks_content_and_options(tmp_path, text_file):
    a = TextFileCorpus(text_file).identity
    assert a == TextFileCorpus(text_file).identity
    assert a != TextFileCorpus(text_file, skip_headings=False).identity
    other = tmp_path / "corpus.txt"
    other.write_text(RAW + " Fifth .\n", encoding="utf-8")
    assert TextFileCorpus(other).identity != a


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "absent.txt"
    with pytest.raises(FileNotFoundError, match=r"absent\.txt"):
        TextFileCorpus(missing)
    with pytest.raises(FileNotFoundError, match=r"absent\.txt"):
        as_corpus(str(missing))
    with pytest.raises(FileNotFoundError, match="directory"):
        TextFileCorpus(tmp_path)


def test_local_wikitext(shared_data):
    corpus = as_corpus("wikitext-2")
    texts = list(corpus)
    assert texts[0].startswith("Homarus gammarus , known as the European lobster")
    assert not any(is_heading(t) for t in texts)
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    assert len(texts) == sum(1 for ln in lines if ln.strip() and not is_heading(ln))
    assert len(texts) == 1841
    assert as_corpus("wikitext").identity == corpus.identity  # local copy when the env var is set
    test_texts = list(as_corpus("wikitext-2-test").take(1))
    assert test_texts[0].startswith("Robert <unk> is an English film , television and theatre")


def test_wikitext_without_local_data_or_network(monkeypatch):
    monkeypatch.delenv("LIGHTNING_ROME_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="LIGHTNING_ROME_DATA"):
        as_corpus("wikitext")
    with pytest.raises(FileNotFoundError, match="LIGHTNING_ROME_DATA"):
        as_corpus("wikitext-2")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a named corpus"):
        as_corpus("no-such-corpus")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_complete_and_deterministic(world_size):
    texts = [f"text {i}" for i in range(23)]
    corpus = IterableTextCorpus(texts).take(17)
    shards = [list(corpus.shard(r, world_size)) for r in range(world_size)]
    assert shards == [list(corpus.shard(r, world_size)) for r in range(world_size)]
    flat = [t for s in shards for t in s]
    assert sorted(flat) == sorted(texts[:17]) and len(flat) == 17
    for r, shard in enumerate(shards):
        assert shard == texts[r:17:world_size]


def test_shard_of_shard_and_bad_arguments():
    corpus = IterableTextCorpus([str(i) for i in range(12)])
    assert list(corpus.shard(1, 2).shard(0, 3)) == ["1", "7"]
    with pytest.raises(ValueError, match="rank"):
        corpus.shard(2, 2)
    with pytest.raises(ValueError, match="world_size"):
        corpus.shard(0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        corpus.take(-1)


def test_iterable_corpus_variants():
    texts = ["  a  ", "", "b", "   "]
    assert list(IterableTextCorpus(texts)) == ["a", "b"]
    ident = IterableTextCorpus(texts).identity
    assert ident == IterableTextCorpus(list(texts)).identity
    assert ident != IterableTextCorpus(["a", "c"]).identity
    factory = IterableTextCorpus(lambda: iter(["x", "y"]))
    assert list(factory) == list(factory) == ["x", "y"]
    assert factory.identity is None
    assert IterableTextCorpus(lambda: iter(["x"]), name="mine").identity == "iterable:mine"
    once = IterableTextCorpus(t for t in ["p", "q"])
    assert list(once) == ["p", "q"]
    with pytest.raises(RuntimeError, match="one-shot"):
        list(once)
    with pytest.raises(TypeError, match="must be str"):
        list(IterableTextCorpus([1, 2]))
    with pytest.raises(TypeError, match="single str"):
        IterableTextCorpus("abc")
    assert as_corpus(["u", "v"]).take(1).shard(0, 1).identity.endswith("|take=1")


def test_hf_dataset_objects():
    ds = datasets.Dataset.from_dict({"text": [" = Head = ", "one", "", "two"], "x": [1, 2, 3, 4]})
    assert list(HFTextCorpus(ds)) == ["= Head =", "one", "two"]
    assert list(HFTextCorpus(ds, skip_headings=True)) == ["one", "two"]
    assert list(as_corpus(ds)) == ["= Head =", "one", "two"]
    assert HFTextCorpus(ds).identity.startswith("hf-fingerprint:")
    it = ds.to_iterable_dataset()
    assert list(as_corpus(it).shard(1, 2)) == ["one"]  # stream positions 1 (and 3 is blank)
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([1])})
    assert list(as_corpus(dd, split="validation")) == ["one"]
    with pytest.raises(KeyError, match="split"):
        as_corpus(dd)
    with pytest.raises(KeyError, match="no text column 'body'"):
        HFTextCorpus(ds, text_column="body")


@pytest.mark.parametrize("streaming", [False, True])
def test_load_dataset_by_name_offline(text_file, tmp_path, streaming):
    corpus = HFTextCorpus("text", data_files=str(text_file), streaming=streaming,
                          skip_headings=True, cache_dir=str(tmp_path / "hf"))
    assert list(corpus) == EXPECTED
    assert list(corpus.shard(0, 2)) == EXPECTED[0::2]
    before = corpus.identity
    assert before is not None  # cacheable: a content fingerprint of the local file
    if streaming:
        text_file.write_text(RAW + " More .\n", encoding="utf-8")
        changed = HFTextCorpus("text", data_files=str(text_file), streaming=True,
                               skip_headings=True)
        assert changed.identity != before


def test_load_dataset_failure_is_explained(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load the Hugging Face dataset"):
        as_corpus("hf:definitely-not-a-local-dataset-xyz")


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------

TEXTS = [f"Paragraph number {i} talks about topic {i % 7} at some length." for i in range(40)]


def test_datamodule_chunks_are_the_concatenated_stream(gpt2_tokenizer):
    dm = TextCorpusDataModule(TEXTS, gpt2_tokenizer, seq_len=16, batch_size=4, mode="chunks")
    dm.setup("fit")
    eos = gpt2_tokenizer.eos_token_id
    stream = [t for text in TEXTS for t in gpt2_tokenizer(text)["input_ids"] + [eos]]
    batches = list(dm.predict_dataloader())
    rows = torch.cat([b["input_ids"] for b in batches])  # (N, 16)
    assert rows.shape == (len(stream) // 16, 16)
    assert rows.reshape(-1).tolist() == stream[: rows.numel()]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    assert torch.equal(batches[0]["labels"], batches[0]["input_ids"])
    shuffled = torch.cat([b["input_ids"] for b in dm.train_dataloader()])
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, rows.tolist()))


def test_datamodule_texts_mode_pads_and_masks(gpt2_tokenizer):
    dm = TextCorpusDataModule(TEXTS[:5], gpt2_tokenizer, seq_len=6, batch_size=5, mode="texts")
    (batch,) = list(dm.predict_dataloader())
    lengths = [min(6, len(gpt2_tokenizer(t)["input_ids"])) for t in TEXTS[:5]]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0].tolist() == gpt2_tokenizer(TEXTS[0])["input_ids"][:6]
    assert bool((batch["labels"][batch["attention_mask"] == 0] == -100).all())


def test_datamodule_corpus_sharding_matches_one_rank(gpt2_tokenizer):
    class FakeTrainer:
        def __init__(self, rank, world):
            self.global_rank, self.world_size = rank, world

    def rows(rank, world):
        dm = TextCorpusDataModule(TEXTS, gpt2_tokenizer, seq_len=5, batch_size=3, mode="texts",
                                  shard_by="corpus", n_samples=31)
        dm.trainer = FakeTrainer(rank, world)
        return [tuple(r[m.bool()].tolist()) for b in dm.predict_dataloader()
                for r, m in zip(b["input_ids"], b["attention_mask"])]

    whole = rows(0, 1)
    parts = [rows(r, 3) for r in range(3)]
    assert len(whole) == 31
    assert sorted(itertools.chain(*parts)) == sorted(whole)
    assert parts[1] == whole[1::3]


def test_datamodule_trains_a_tiny_model(gpt2_tokenizer, tmp_path):
    import lightning as L
    from testutils import tiny_gpt2

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2(n_layer=1, n_embd=16)
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = TextCorpusDataModule(TEXTS, gpt2_tokenizer, seq_len=16, batch_size=4)
    lm = LM()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(lm, datamodule=dm)
    assert len(lm.losses) == 2
    # a random model over a 50k vocabulary: the loss is about log(50257) = 10.8
    assert all(9.0 < v < 12.5 for v in lm.losses)


def test_datamodule_bad_settings(gpt2_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        TextCorpusDataModule(TEXTS, gpt2_tokenizer, mode="words")
    with pytest.raises(ValueError, match="tokenizer"):
        TextCorpusDataModule(TEXTS)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n = Only a heading = \n\n", encoding="utf-8")
    dm = TextCorpusDataModule(str(empty), gpt2_tokenizer, seq_len=8)
    with pytest.raises(ValueError, match="empty or too short"):
        dm.setup("fit")
