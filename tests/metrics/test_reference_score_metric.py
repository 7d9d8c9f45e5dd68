"""RS and its TF-IDF table against scikit-learn, and ROME's file formats on fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lightning_rome.metrics import AttributeSnippets, ReferenceScore, TfidfTable
from lightning_rome.metrics.functional import reference_score
from lightning_rome.utils.io import CorruptFileError

sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")

CORPUS = [
    "Danielle Darrieux was a French actress, singer and dancer.",
    "The mother tongue of Danielle Darrieux is French.",
    "Toko Yasuda is a guitar player from Japan; the guitar is her instrument.",
    "John Lennon performs on the guitar and piano. John sang.",
    "Paris is the capital and most populous city of France.",
    "The Eiffel Tower is located in Paris, France's capital city.",
    "Rome is the capital city of Italy, with 2,860,009 residents.",
]

# ROME's snippet format: records per (relation_id, target_id) with samples {name, text}
SNIPPETS = [
    {
        "name": "Danielle Darrieux",
        "relation_id": "P103",
        "target_id": "Q150",
        "samples": [
            {"name": "Danielle Darrieux", "text": CORPUS[0]},
            {"name": "Danielle Darrieux", "text": CORPUS[1]},
        ],
    },
    {
        "name": "Toko Yasuda",
        "relation_id": "P1303",
        "target_id": "Q6607",
        "samples": [{"name": "Toko Yasuda", "text": CORPUS[2]}],
    },
    {
        "name": "John Lennon",
        "relation_id": "P1303",
        "target_id": "Q6607",
        "samples": [{"name": "John Lennon", "text": CORPUS[3]}],
    },
    {
        "name": "Eiffel Tower",
        "relation_id": "P131",
        "target_id": "Q90",
        "samples": [
            {"name": "Paris", "text": CORPUS[4]},
            {"name": "Eiffel Tower", "text": CORPUS[5]},
        ],
    },
]


def sklearn_cosine(vec, a, b):
    """ROME's tfidf_similarity, with a fitted scikit-learn vectorizer."""
    enc = vec.transform([a, b]).toarray()
    return float(enc[0] @ enc[1] / np.linalg.norm(enc[0]) / np.linalg.norm(enc[1]))


@pytest.fixture(scope="module")
def sk_vec():
    return sklearn_text.TfidfVectorizer().fit(CORPUS)


def test_fit_matches_sklearn(sk_vec):
    table = TfidfTable.fit(CORPUS)
    assert table.vocab == {k: int(v) for k, v in sk_vec.vocabulary_.items()}
    np.testing.assert_allclose(table.idf, sk_vec.idf_, rtol=1e-12)
    pairs = [
        ("The guitar of John Lennon.", CORPUS[3]),
        ("Paris, France", CORPUS[5]),
        ("French French actress", CORPUS[0] + " " + CORPUS[1]),
        (CORPUS[6], CORPUS[4]),
    ]
    for a, b in pairs:
        assert table.similarity(a, b) == pytest.approx(sklearn_cosine(sk_vec, a, b), abs=1e-12)


def write_rome_files(tmp_path, sk_vec):
    """idf.npy (1-D float array), tfidf_vocab.json (term -> index), attribute_snippets.json."""
    np.save(tmp_path / "idf.npy", sk_vec.idf_)
    (tmp_path / "tfidf_vocab.json").write_text(
        json.dumps({k: int(v) for k, v in sk_vec.vocabulary_.items()}, indent=1)
    )
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(SNIPPETS))


def test_rome_files_and_snippet_lookup(tmp_path, sk_vec):
    write_rome_files(tmp_path, sk_vec)
    table = TfidfTable.from_dir(tmp_path)
    assert len(table) == len(sk_vec.vocabulary_)
    snips = AttributeSnippets.load(tmp_path / "attribute_snippets.json")
    assert snips.texts("P1303", "Q6607") == [CORPUS[2], CORPUS[3]]
    assert snips.texts("P1303", "Q1") == []
    assert len(snips.documents()) == 6

    generated = [
        ["Danielle Darrieux speaks French.", "She is a French singer."],
        ["He plays the guitar in Japan."],
    ]
    m = ReferenceScore(tfidf=tmp_path, snippets=tmp_path / "attribute_snippets.json")
    m.update(
        generated_texts=generated, relation_ids=["P103", "P1303"], target_new_ids=["Q150", "Q6607"]
    )
    expected = [
        sklearn_cosine(sk_vec, " ".join(generated[0]), " ".join([CORPUS[0], CORPUS[1]])),
        sklearn_cosine(sk_vec, " ".join(generated[1]), " ".join([CORPUS[2], CORPUS[3]])),
    ]
    assert m.compute().item() == pytest.approx(np.mean(expected), abs=1e-6)
    ci = m.compute_with_ci()
    se = np.std(expected, ddof=1) / np.sqrt(2)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx(
        (np.mean(expected) - 1.96 * se, np.mean(expected) + 1.96 * se), abs=1e-12
    )
    # the same with explicit reference texts, and through the functional form
    refs = [snips.texts("P103", "Q150"), snips.texts("P1303", "Q6607")]
    assert reference_score(generated, refs, table).item() == pytest.approx(np.mean(expected))


def test_fits_on_snippets_when_no_idf_table(sk_vec):
    snips = AttributeSnippets(SNIPPETS)
    m = ReferenceScore(snippets=snips)  # ROME's fallback: fit on the snippet texts
    ref_vec = sklearn_text.TfidfVectorizer().fit(snips.documents())
    m.update(generated_texts=["A guitar player"], reference_texts=[snips.texts("P1303", "Q6607")])
    expected = sklearn_cosine(ref_vec, "A guitar player", " ".join(snips.texts("P1303", "Q6607")))
    assert m.compute().item() == pytest.approx(expected, abs=1e-6)
    fitted = ReferenceScore.fit(CORPUS)
    np.testing.assert_allclose(fitted.tfidf.idf, sk_vec.idf_)


def test_save_load_roundtrip(tmp_path):
    table = TfidfTable.fit(CORPUS)
    table.save(tmp_path / "stats")
    loaded = TfidfTable.from_dir(tmp_path / "stats")
    assert loaded.vocab == table.vocab
    np.testing.assert_array_equal(loaded.idf, table.idf)


def test_text_without_known_words_scores_zero():
    table = TfidfTable.fit(CORPUS)
    assert table.similarity("zzz qqq", CORPUS[0]) == 0.0
    assert reference_score(["!!"], [CORPUS[0]], table).item() == 0.0


def test_bad_files_and_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"idf\.npy"):
        TfidfTable.from_dir(tmp_path)
    np.save(tmp_path / "idf.npy", np.ones((2, 2)))
    (tmp_path / "tfidf_vocab.json").write_text('{"a": 0}')
    with pytest.raises(CorruptFileError, match="1-D float array"):
        TfidfTable.from_dir(tmp_path)
    np.save(tmp_path / "idf.npy", np.ones(2))
    (tmp_path / "tfidf_vocab.json").write_text('{"a": 0, "b": 5}')
    with pytest.raises(CorruptFileError, match="outside idf"):
        TfidfTable.from_dir(tmp_path)
    (tmp_path / "tfidf_vocab.json").write_text('{"a": 0, "b": 0}')
    with pytest.raises(CorruptFileError, match="same index"):
        TfidfTable.from_dir(tmp_path)
    (tmp_path / "tfidf_vocab.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        TfidfTable.from_dir(tmp_path)
    (tmp_path / "snips.json").write_text(json.dumps([{"relation_id": "P1", "samples": []}]))
    with pytest.raises(CorruptFileError, match="relation_id' and 'target_id"):
        AttributeSnippets.load(tmp_path / "snips.json")
    (tmp_path / "snips.json").write_text(
        json.dumps([{"relation_id": "P1", "target_id": "Q1", "samples": [{"txt": "x"}]}])
    )
    with pytest.raises(CorruptFileError, match="sample 0 needs a str 'text'"):
        AttributeSnippets.load(tmp_path / "snips.json")

    with pytest.raises(ValueError, match="needs an IDF table"):
        ReferenceScore()
    with pytest.raises(ValueError, match="empty corpus"):
        TfidfTable.fit([])
    m = ReferenceScore(snippets=AttributeSnippets(SNIPPETS))
    with pytest.raises(ValueError, match="no attribute snippets for case 1"):
        m.update(
            generated_texts=["x", "y"], relation_ids=["P103", "P9"], target_new_ids=["Q150", "Q1"]
        )
    with pytest.raises(ValueError, match="needs reference_texts, or relation_ids"):
        m.update(generated_texts=["x"])
    with pytest.raises(ValueError, match="same cases, got 2 and 1"):
        m.update(generated_texts=["x", "y"], reference_texts=["z"])
    with pytest.raises(ValueError, match="needs generated_texts"):
        m.update(reference_texts=["z"])
