"""The README's measured numbers are the render of recorded job results
(:mod:`benchmarks.readme_numbers`): a number edited by hand, a record changed without
re-rendering, or a block without a job fails here."""

from __future__ import annotations

import json

import pytest
from testutils import REPO

from benchmarks import readme_numbers as rn

README = REPO / "README.md"


def test_readme_blocks_are_the_render_of_their_records():
    text = README.read_text()
    assert rn.render_readme(text, strict=True) == text, (
        "README.md differs from its recorded numbers: run `python -m benchmarks.readme_numbers`")


def test_every_block_is_in_the_readme_once_and_has_a_job():
    names = [m["name"] for m in rn.BLOCK_RE.finditer(README.read_text())]
    assert sorted(names) == sorted(rn.BLOCKS)
    assert {b.job for b in rn.BLOCKS.values()} <= set(rn.JOBS)
    for job in {b.job for b in rn.BLOCKS.values()}:
        rec = rn.read_result(job)
        assert rec["provenance"]["commit"] and rec["provenance"]["command"], job


def test_a_hand_edited_number_is_caught():
    text = README.read_text()
    m = next(m for m in rn.BLOCK_RE.finditer(text) if m["name"] == "suite")
    body = m["body"]
    edited = body.replace(body.split("(", 1)[1].split(" ", 1)[0], "999,999", 1)
    assert edited != body
    tampered = text.replace(body, edited, 1)
    assert rn.render_readme(tampered) == text  # re-rendering restores the recorded number


def test_blocks_must_match_the_renders(tmp_path):
    with pytest.raises(ValueError, match="no render"):
        rn.render_readme("<!-- numbers: nonsense -->\nx\n<!-- /numbers: nonsense -->\n")
    with pytest.raises(ValueError, match="missing from the README"):
        rn.render_readme("no blocks at all\n")


def test_records_are_validated(tmp_path):
    prov = rn.provenance("a command")
    assert prov["command"] == "a command" and prov["cores"] >= 1 and prov["commit"]
    path = rn.write_result("suite", {"passed": 3}, prov, folder=tmp_path)
    assert rn.read_result("suite", tmp_path)["data"] == {"passed": 3}
    with pytest.raises(FileNotFoundError, match="--run demo"):
        rn.read_result("demo", tmp_path)
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        rn.read_result("suite", tmp_path)
    for bad in ({"format": rn.FORMAT + 1, "job": "suite", "provenance": {}, "data": {}},
                {"format": rn.FORMAT, "job": "demo", "provenance": {}, "data": {}},
                {"format": rn.FORMAT, "job": "suite", "provenance": {}, "data": []}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="format-1 record of job 'suite'"):
            rn.read_result("suite", tmp_path)


def test_missing_record_keeps_the_block_unless_strict(tmp_path, capsys):
    text = README.read_text()
    assert rn.render_readme(text, folder=tmp_path, strict=False) == text
    assert "kept as it is" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        rn.render_readme(text, folder=tmp_path, strict=True)


@pytest.mark.parametrize("line, expected", [
    ("1665 passed, 20 deselected, 190 warnings in 589.06s (0:09:49)",
     {"passed": 1665, "deselected": 20, "failed": 0, "seconds": 589.06}),
    ("==== 1651 passed, 20 deselected in 809.57s (0:13:29) ====",
     {"passed": 1651, "deselected": 20, "failed": 0, "seconds": 809.57}),
    ("== 2 failed, 10 passed, 1 skipped, 3 warnings, 1 error in 5.00s ==",
     {"passed": 10, "failed": 2, "skipped": 1, "errors": 1, "seconds": 5.0}),
])
def test_parse_pytest_summary(line, expected):
    got = rn.parse_pytest_summary("collected\n" + line + "\n")
    assert {k: got[k] for k in expected} == expected


def test_parse_pytest_summary_needs_a_summary():
    with pytest.raises(ValueError, match="no pytest summary"):
        rn.parse_pytest_summary("nothing here\n")


def test_options_that_do_not_apply_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        rn.main(["--models", "fact"])
    assert e.value.code == 2 and "--run key-modes only" in capsys.readouterr().err


def test_list_names_every_job_and_its_record(capsys):
    assert rn.main(["--list"]) == 0
    out = capsys.readouterr().out
    for job in rn.JOBS:
        assert job in out
