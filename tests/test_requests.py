"""EditRequest validates every field and names the bad one; from_dict reads flat dicts and
ROME's ``requested_rewrite`` schema."""

from __future__ import annotations

import json

import pytest

from lightning_rome.requests import EditRequest, as_requests

GOOD = dict(prompt="The mother tongue of {} is", subject="Danielle Darrieux",
            target_new="English", target_true="French", case_id=0)


def test_valid_request():
    r = EditRequest(**GOOD)
    assert r.text == "The mother tongue of Danielle Darrieux is"
    assert r.to_dict() == GOOD
    assert EditRequest.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert EditRequest("{} is in", "Paris", "Rome").target_true is None
    assert hash(r) == hash(EditRequest(**GOOD))  # frozen: usable as a dict key
    with pytest.raises(AttributeError):
        r.subject = "x"  # type: ignore[misc]


@pytest.mark.parametrize(("field", "value", "error", "message"), [
    ("prompt", "The mother tongue of Danielle is", ValueError, r"prompt must contain '\{\}' "
     r"exactly once.*found 0"),
    ("prompt", "{} and {} are", ValueError, r"prompt must contain '\{\}' exactly once.*found 2"),
    ("prompt", "{} is {0}", ValueError, r"prompt may contain no brace"),
    ("prompt", "{} is }", ValueError, r"prompt may contain no brace"),
    ("prompt", "{ {} is", ValueError, r"prompt may contain no brace"),
    ("prompt", None, TypeError, r"EditRequest.prompt must be a str, got NoneType"),
    ("subject", "", ValueError, r"subject is empty or whitespace"),
    ("subject", "  ", ValueError, r"subject is empty or whitespace"),
    ("subject", " Paris", ValueError, r"subject has leading or trailing whitespace"),
    ("subject", 3, TypeError, r"EditRequest.subject must be a str, got int"),
    ("target_new", "", ValueError, r"target_new is empty or whitespace"),
    ("target_new", " \t", ValueError, r"target_new is empty or whitespace"),
    ("target_new", ["English"], TypeError, r"EditRequest.target_new must be a str, got list"),
    ("target_new", {"str": "English"}, TypeError, r"target_new must be a str, got dict"),
    ("target_true", " ", ValueError, r"target_true is empty or whitespace"),
    ("target_true", 1.5, TypeError, r"target_true must be a str, got float"),
    ("case_id", 1.5, TypeError, r"case_id must be an int or str"),
])
def test_bad_field_is_named(field, value, error, message):
    with pytest.raises(error, match=message):
        EditRequest(**{**GOOD, field: value})


def test_from_dict_flat_and_rome_schema():
    flat = EditRequest.from_dict({"prompt": "{} is located in", "subject": "Eiffel Tower",
                                  "target_new": "Rome", "case_id": 7})
    assert flat == EditRequest("{} is located in", "Eiffel Tower", "Rome", case_id=7)
    record = {
        "case_id": 0, "pararel_idx": 2796,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"},
                              "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["..."],
    }
    assert EditRequest.from_dict(record) == EditRequest(**GOOD)
    # as_requests accepts one request, one dict, or a list of either.
    assert as_requests(record) == [EditRequest(**GOOD)]
    assert as_requests([EditRequest(**GOOD), record["requested_rewrite"]]) == [
        EditRequest(**GOOD), EditRequest(**{**GOOD, "case_id": None})]
    with pytest.raises(ValueError, match="no edit requests"):
        as_requests([])


def test_from_dict_errors_name_the_field():
    with pytest.raises(ValueError, match="'target_new' is missing"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "x"})
    with pytest.raises(ValueError, match=r"unknown EditRequest field\(s\): \['tagret_new'\]"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "x", "tagret_new": "y"})
    with pytest.raises(TypeError, match="must be a mapping, got list"):
        EditRequest.from_dict(["{} is", "x", "y"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="subject is empty"):
        EditRequest.from_dict({"requested_rewrite": {"prompt": "{} is", "subject": "",
                                                     "target_new": {"str": "y"}}})
    with pytest.raises(ValueError, match="target_new is empty"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "x", "target_new": {"str": ""}})


def test_trailing_whitespace_in_the_prompt_is_stripped_with_one_warning(monkeypatch):
    """Issue 18, item 8: ``"{} was born in the city of "`` would put the target after a stray
    space token and weaken the edit; the prompt is normalised (trailing whitespace stripped),
    and the first such prompt warns, saying so."""
    import lightning_rome.requests as requests_module

    monkeypatch.setattr(requests_module, "_WARNED_TRAILING", False)
    with pytest.warns(UserWarning, match=r"city of ' ends in whitespace.*stripped"):
        r = EditRequest("{} was born in the city of ", "Danielle Darrieux", "Paris")
    assert r.prompt == "{} was born in the city of"
    assert r.text == "Danielle Darrieux was born in the city of"
    assert r == EditRequest("{} was born in the city of", "Danielle Darrieux", "Paris")
    # Once per process: a second such prompt (tabs, newlines too) is stripped silently.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r2 = EditRequest.from_dict({"prompt": "{} plays the\t\n ", "subject": "Toko",
                                    "target_new": "piano"})
    assert r2.prompt == "{} plays the"
    # Leading whitespace and inner spacing are kept; a prompt without trailing space is as is.
    assert EditRequest(" {} is in", "x", "y").prompt == " {} is in"


def test_prompt_that_is_only_the_subject_and_space():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = EditRequest("{}  ", "Eiffel Tower", "Rome")
    assert r.prompt == "{}" and r.text == "Eiffel Tower"
