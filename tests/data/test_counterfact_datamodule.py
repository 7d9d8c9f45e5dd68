"""CounterFactDataModule: real reduced files, ROME-schema fixtures, splits, malformed records,
offline behaviour and downloads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from cf_fixtures import many_rome_cases, rome_cases, write_json

from lightning_rome.data import (
    COUNTERFACT_URL,
    CounterFactDataModule,
    EditCase,
    MalformedRecordError,
    MalformedRecordWarning,
    RecordBatch,
    parse_split,
)
from lightning_rome.requests import EditRequest
from lightning_rome.utils.paths import DATA_ENV

TRAIN = "counterfact/counterfact-train.json"
VAL = "counterfact/counterfact-val.json"


def _setup(dm: CounterFactDataModule, stage: str = "test") -> CounterFactDataModule:
    dm.prepare_data()
    dm.setup(stage)
    return dm


# ----------------------------------------------------------------------------- real files
def test_real_reduced_files_counts_and_fields(shared_data):
    raw_train = json.loads((shared_data / TRAIN).read_text())
    raw_val = json.loads((shared_data / VAL).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", MalformedRecordWarning)
        dm = _setup(CounterFactDataModule(TRAIN, val_split=VAL, test_split=VAL), None)
    train, val = dm.train_dataset, dm.val_dataset
    assert train is None  # no train split configured
    assert len(val) == 1919 and len(dm.test_dataset) == 1919
    dm = _setup(CounterFactDataModule(TRAIN))
    cases = dm.test_dataset.records
    assert len(cases) == 10_000 == len(raw_train)
    assert dm.test_dataset.malformed == []
    # File order and ids survive; train and val files hold different cases.
    assert [c.case_id for c in cases] == [r["case_id"] for r in raw_train]
    assert not {c.case_id for c in cases} & {r["case_id"] for r in raw_val}

    # Case 2, field by field: "Toko Yasuda, the" guitar -> piano.
    c = cases[0]
    assert c == next(x for x in cases if x.case_id == 2)
    assert c.request == EditRequest(prompt="{}, the", subject="Toko Yasuda", target_new="piano",
                                    target_true="guitar", case_id=2)
    assert c.request.text == "Toko Yasuda, the"
    assert c.paraphrase_prompts == ("Toko Yasuda is incredible at",)
    assert c.neighborhood_prompts == ("John Lennon performs on the",)
    assert c.neighborhood_answers == ("guitar",)
    assert c.attribute_prompts == () and c.generation_prompts == ()
    assert c.relation_id is None and c.target_new_id is None and c.target_true_id is None
    assert c.source == "counterfact-reduced"
    assert c.rewrite_prompts == ("Toko Yasuda, the",)
    # Every case: the template filled with its subject gives back the file's prompt.
    for case, raw in zip(cases, raw_train):
        assert case.request.text == raw["prompt"]
        assert case.request.target_new == raw["target_new"]
        assert case.request.target_true == raw["ground_truth"]
        assert case.neighborhood_answers == (raw["locality_ground_truth"],)


def test_real_val_file_first_case(shared_data):
    dm = _setup(CounterFactDataModule(VAL, limit=2))
    a, b = dm.test_dataset.records
    assert a.to_dict() == {
        "case_id": 10,
        "request": {"prompt": "{}, by", "subject": "BBC One", "target_new": "Sega",
                    "target_true": "BBC", "case_id": 10},
        "paraphrase_prompts": ["BBC One is my favorite product out of everything owned by"],
        "neighborhood_prompts": ["BBC Radio, by"], "neighborhood_answers": ["BBC"],
        "attribute_prompts": [], "generation_prompts": [], "relation_id": None,
        "target_new_id": None, "target_true_id": None, "source": "counterfact-reduced"}
    raw = json.loads((shared_data / VAL).read_text())
    assert b.case_id == raw[1]["case_id"]


# ----------------------------------------------------------------------------- ROME's schema
def test_rome_schema_fixture_every_field(tmp_path):
    path = write_json(tmp_path / "counterfact.json", rome_cases())
    dm = _setup(CounterFactDataModule(path, cache_dir=tmp_path / "hf"))
    cases = dm.test_dataset.records
    assert [c.case_id for c in cases] == [0, 1, 2, 3, 4]
    c = cases[0]
    assert c.request == EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English",
                                    "French", case_id=0)
    assert c.paraphrase_prompts == (
        "Some context 0. The mother tongue of Danielle Darrieux is",
        "In short, The mother tongue of Danielle Darrieux is")
    assert c.neighborhood_prompts == tuple(f"Neighbor {k} of case 0 is" for k in range(3))
    assert c.neighborhood_answers == ("French",) * 3  # o^c is their true answer
    assert c.attribute_prompts == ("Attribute 0 of case 0 is", "Attribute 1 of case 0 is")
    assert c.generation_prompts == ("Danielle Darrieux is known for",
                                    "People say Danielle Darrieux")
    assert (c.relation_id, c.target_new_id, c.target_true_id) == ("P103", "Q1860", "Q150")
    assert c.source == "counterfact"
    assert cases[2].request.text == "Toko Yasuda, the"


def test_multi_counterfact_and_object_neighbors_and_jsonl(tmp_path):
    records = rome_cases(2)
    # MEMIT-style records, one with {"prompt", "target"} neighbors and no attribute prompts.
    records[1]["neighborhood_prompts"] = [{"prompt": "Pope Francis follows", "target": " Islam"}]
    del records[1]["attribute_prompts"], records[1]["generation_prompts"]
    path = tmp_path / "multi_counterfact.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    dm = _setup(CounterFactDataModule(path, url=None, cache_dir=tmp_path / "hf"))
    a, b = dm.test_dataset.records
    assert a.neighborhood_answers == ("French",) * 3
    assert b.neighborhood_prompts == ("Pope Francis follows",)
    assert b.neighborhood_answers == ("Islam",)
    assert b.attribute_prompts == () and b.generation_prompts == ()


# ----------------------------------------------------------------------------- splits
def test_case_id_range_splits_are_disjoint_and_exact(shared_data):
    raw_ids = [r["case_id"] for r in json.loads((shared_data / TRAIN).read_text())]
    dm = _setup(CounterFactDataModule(TRAIN, train_split="0:10000", val_split=(10000, 15000),
                                      test_split={"start": 15000}), None)
    train, val, test = (set(d.case_ids) for d in (dm.train_dataset, dm.val_dataset,
                                                   dm.test_dataset))
    assert train == {i for i in raw_ids if i < 10000}
    assert val == {i for i in raw_ids if 10000 <= i < 15000}
    assert test == {i for i in raw_ids if i >= 15000}
    assert not train & val and not train & test and not val & test
    assert len(train) + len(val) + len(test) == 10_000
    assert min(test) == min(i for i in raw_ids if i >= 15000)


def test_split_forms():
    assert parse_split("all") == parse_split(":") == parse_split({})
    assert parse_split("5:") == parse_split((5, None)) == parse_split({"start": 5})
    s = parse_split("10:20")
    assert (s.file, s.start, s.stop) == (None, 10, 20)
    assert s.contains(10) and s.contains(19) and not s.contains(20) and not s.contains(9)
    assert parse_split([10, 20]) == s == parse_split(range(10, 20))
    f = parse_split("counterfact/counterfact-val.json")
    assert (f.file, f.is_range) == ("counterfact/counterfact-val.json", False)
    assert parse_split(None) is None
    with pytest.raises(ValueError, match="empty case-id range"):
        parse_split("20:10")
    with pytest.raises(ValueError, match="unknown split key"):
        parse_split({"from": 3})
    with pytest.raises(ValueError, match="cannot read the split"):
        parse_split(3.5)


def test_shuffle_is_deterministic_and_seeded(shared_data):
    base = _setup(CounterFactDataModule(VAL)).test_dataset.case_ids
    a = _setup(CounterFactDataModule(VAL, shuffle=True, seed=1)).test_dataset.case_ids
    b = _setup(CounterFactDataModule(VAL, shuffle=True, seed=1)).test_dataset.case_ids
    c = _setup(CounterFactDataModule(VAL, shuffle=True, seed=2)).test_dataset.case_ids
    assert a == b
    assert a != c and a != base
    assert sorted(a) == sorted(c) == sorted(base)  # a permutation, nothing lost
    # limit takes the first cases of the (shuffled) order.
    lim = _setup(CounterFactDataModule(VAL, shuffle=True, seed=1, limit=7)).test_dataset
    assert lim.case_ids == a[:7]
    assert _setup(CounterFactDataModule(VAL, limit=5)).test_dataset.case_ids == base[:5]


def test_train_loader_reshuffles_per_epoch_but_reproducibly(shared_data):
    dm = _setup(CounterFactDataModule(VAL, train_split="all", limit=40, batch_size=8), "fit")

    def order(dm):
        loader = dm.train_dataloader()
        return [cid for _ in range(2) for batch in loader for cid in batch.case_ids]

    first = order(dm)
    assert sorted(first[:40]) == sorted(dm.train_dataset.case_ids)
    assert first[:40] != first[40:]  # a new order each epoch
    dm2 = _setup(CounterFactDataModule(VAL, train_split="all", limit=40, batch_size=8), "fit")
    assert order(dm2) == first


# ----------------------------------------------------------------------------- malformed records
def _malformed_records():
    good = rome_cases(2)
    no_subject = rome_cases(3)[2]
    del no_subject["requested_rewrite"]["subject"]
    no_brace = rome_cases(4)[3]
    no_brace["requested_rewrite"]["prompt"] = "A prompt without the slot"
    empty_target = rome_cases(5)[4]
    empty_target["requested_rewrite"]["target_new"]["str"] = " "
    dup = rome_cases(1)[0]
    missing_list = rome_cases(1)[0]
    missing_list["case_id"] = 7
    del missing_list["neighborhood_prompts"]
    return [*good, no_subject, no_brace, empty_target, dup, missing_list]


def test_malformed_records_skipped_with_warning(tmp_path):
    path = write_json(tmp_path / "bad.json", _malformed_records())
    dm = CounterFactDataModule(path, cache_dir=tmp_path / "hf")
    dm.prepare_data()
    with pytest.warns(MalformedRecordWarning) as rec:
        dm.setup("test")
    msg = str(rec[0].message)
    assert "skipped 5 malformed record(s)" in msg
    for cid in (2, 3, 4, 0, 7):
        assert f"case {cid}:" in msg
    assert dm.test_dataset.case_ids == [0, 1]
    reasons = dict(dm.test_dataset.malformed)
    assert "subject" in reasons[2]
    assert "'{}' exactly once" in reasons[3]
    assert "target_new is empty" in reasons[4]
    assert "duplicate case id 0" in reasons[0]
    assert "neighborhood_prompts" in reasons[7]


def test_malformed_records_strict_raises_at_setup(tmp_path):
    path = write_json(tmp_path / "bad.json", _malformed_records())
    dm = CounterFactDataModule(path, strict=True, cache_dir=tmp_path / "hf")
    dm.prepare_data()  # no validation there: nothing is assigned
    with pytest.raises(MalformedRecordError) as err:
        dm.setup("test")
    assert sorted(c for c, _ in err.value.problems) == [0, 2, 3, 4, 7]
    assert "case 2:" in str(err.value) and "case 7:" in str(err.value)
    assert dm.test_dataset is None


def test_reduced_schema_malformed(tmp_path):
    ok = {"case_id": 1, "prompt": "Toko Yasuda, the", "subject": "Toko Yasuda",
          "target_new": "piano", "ground_truth": "guitar", "rephrase_prompt": "x",
          "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"}
    not_in_prompt = dict(ok, case_id=2, subject="Yoko Ono")
    empty_target = dict(ok, case_id=3, target_new="")
    missing = {k: v for k, v in ok.items() if k != "ground_truth"} | {"case_id": 4}
    no_id = {k: v for k, v in ok.items() if k != "case_id"}
    path = write_json(tmp_path / "r.json", [ok, not_in_prompt, empty_target, missing, no_id])
    dm = CounterFactDataModule(path, cache_dir=tmp_path / "hf")
    with pytest.warns(MalformedRecordWarning, match="skipped 4"):
        dm.setup("test")
    reasons = dict(dm.test_dataset.malformed)
    assert "'Yoko Ono' is not in the prompt" in reasons[2]
    assert "'target_new' is empty" in reasons[3]
    assert "ground_truth" in reasons[4]
    assert "case_id" in reasons["#4"]  # no id: named by its position in the file
    with pytest.raises(MalformedRecordError, match="case 2: subject 'Yoko Ono'"):
        CounterFactDataModule(path, strict=True, cache_dir=tmp_path / "hf").setup("test")


def test_malformed_outside_the_split_range_is_not_reported(tmp_path):
    recs = many_rome_cases(6)
    recs[5]["requested_rewrite"]["target_new"]["str"] = ""
    path = write_json(tmp_path / "c.json", recs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MalformedRecordWarning)
        dm = CounterFactDataModule(path, test_split="0:5", strict=True,
                                   cache_dir=tmp_path / "hf")
        dm.setup("test")
    assert dm.test_dataset.case_ids == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- where data lives
def test_offline_without_path_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("LIGHTNING_ROME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = CounterFactDataModule()
    for call in (dm.prepare_data, lambda: dm.setup("test")):
        with pytest.raises(FileNotFoundError) as err:
            call()
        msg = str(err.value)
        assert DATA_ENV in msg and "path=" in msg and "HF_DATASETS_OFFLINE" in msg


def test_shared_folder_without_counterfact_json_uses_the_val_split(monkeypatch, tmp_path,
                                                                  shared_data):
    """The offline folder has counterfact-val.json (no release counterfact.json): it is used;
    a folder holding none of the default files is an error naming them."""
    monkeypatch.setenv("LIGHTNING_ROME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert not (Path(shared_data) / "counterfact" / "counterfact.json").exists()
    assert "counterfact/counterfact-val.json" in CounterFactDataModule.default_files
    dm = CounterFactDataModule(data_dir=shared_data, limit=3)
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_dataset) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of"):
        CounterFactDataModule(data_dir=tmp_path / "empty").prepare_data()


def test_no_network_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("LIGHTNING_ROME_CACHE", str(tmp_path / "cache"))
    for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(v, "0")
    dm = CounterFactDataModule(url="http://127.0.0.1:9/counterfact.json")  # a closed port
    with pytest.raises(FileNotFoundError, match=f"could not download.*{DATA_ENV}"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="call prepare_data"):
        dm.setup("test")


def test_download_in_prepare_data_then_setup_reads_it(monkeypatch, tmp_path):
    src = write_json(tmp_path / "release.json", rome_cases())
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("LIGHTNING_ROME_CACHE", str(tmp_path / "cache"))
    for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(v, "0")
    dm = CounterFactDataModule(url=src.as_uri(), cache_dir=tmp_path / "hf")
    assert not dm.datasets
    with pytest.raises(FileNotFoundError, match="call prepare_data"):
        dm.setup("test")
    dm.prepare_data()
    assert not dm.datasets  # prepare_data assigns no state
    downloaded = list((tmp_path / "cache" / "data").glob("*-release.json"))
    assert len(downloaded) == 1 and json.loads(downloaded[0].read_text()) == rome_cases()
    dm.setup("test")
    assert dm.test_dataset.case_ids == [0, 1, 2, 3, 4]
    # Once downloaded, offline use works.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm2 = CounterFactDataModule(url=src.as_uri(), cache_dir=tmp_path / "hf")
    dm2.prepare_data()
    dm2.setup("test")
    assert dm2.test_dataset.case_ids == [0, 1, 2, 3, 4]


def test_corrupt_download_is_not_kept(monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"')
    monkeypatch.setenv("LIGHTNING_ROME_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(DATA_ENV, raising=False)
    for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(v, "0")
    with pytest.raises(ValueError, match="not JSON"):
        CounterFactDataModule(url=bad.as_uri()).prepare_data()
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_default_file_under_data_dir_and_relative_paths(tmp_path, monkeypatch):
    write_json(tmp_path / "counterfact.json", rome_cases(2))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = _setup(CounterFactDataModule(data_dir=tmp_path, cache_dir=tmp_path / "hf"))
    assert dm.test_dataset.case_ids == [0, 1]
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    dm = _setup(CounterFactDataModule("counterfact.json", cache_dir=tmp_path / "hf"))
    assert dm.test_dataset.source == str(tmp_path / "counterfact.json")
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        CounterFactDataModule("nope.json").setup("test")
    assert COUNTERFACT_URL.endswith("/counterfact.json")


# ----------------------------------------------------------------------------- loaders
class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[RecordBatch] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        return (self.w ** 2).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def test_step(self, batch, batch_idx):
        assert isinstance(batch, RecordBatch)
        self.batches.append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_trainer_test_gets_cases_with_variable_length_lists(tmp_path):
    recs = rome_cases()
    recs[1]["paraphrase_prompts"] = ["only one"]
    recs[2]["neighborhood_prompts"] = [f"n{k} is" for k in range(7)]
    path = write_json(tmp_path / "c.json", recs)
    dm = CounterFactDataModule(path, batch_size=2, cache_dir=tmp_path / "hf")
    model = _Recorder()
    _trainer().test(model, datamodule=dm)
    assert [b.case_ids for b in model.batches] == [[0, 1], [2, 3], [4]]
    b = model.batches[0]
    assert [len(c.paraphrase_prompts) for c in b] == [2, 1]
    assert len(model.batches[1][0].neighborhood_prompts) == 7
    assert all(isinstance(c, EditCase) for c in b)
    assert b.requests[0].subject == "Danielle Darrieux"


def test_fit_without_val_split_skips_validation(tmp_path):
    path = write_json(tmp_path / "c.json", many_rome_cases(6))
    model = _Recorder()
    _trainer(max_epochs=1).fit(model, datamodule=CounterFactDataModule(
        path, train_split="0:4", batch_size=2, cache_dir=tmp_path / "hf"))
    assert model.val_batches == 0
    model = _Recorder()
    _trainer(max_epochs=1, num_sanity_val_steps=0).fit(model, datamodule=CounterFactDataModule(
        path, train_split="0:4", val_split="4:", batch_size=2, cache_dir=tmp_path / "hf"))
    assert model.val_batches == 1


def test_unconfigured_split_and_bad_arguments(tmp_path):
    path = write_json(tmp_path / "c.json", many_rome_cases(3))
    dm = _setup(CounterFactDataModule(path, cache_dir=tmp_path / "hf"))
    with pytest.raises(Exception, match="train_split"):
        dm.train_dataloader()
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="limit"):
        CounterFactDataModule(path, limit=0)
    with pytest.raises(Exception, match="tokenizer"):
        CounterFactDataModule(path, mode="edit_train")
    with pytest.raises(ValueError, match="no valid record"):
        CounterFactDataModule(path, test_split="100:200", cache_dir=tmp_path / "hf").setup("test")
