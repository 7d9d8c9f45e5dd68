"""Small COUNTERFACT files in ROME's original schema, written by the tests themselves."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


def rome_case(case_id: int, subject: str, prompt: str, new: str, true: str, rel: str,
              new_id: str = "Q1", true_id: str = "Q2", n_neighbors: int = 3) -> dict[str, Any]:
    """One record in the schema of ROME's ``counterfact.json``."""
    text = prompt.format(subject)
    return {
        "case_id": case_id,
        "pararel_idx": 1000 + case_id,
        "requested_rewrite": {
            "prompt": prompt, "relation_id": rel,
            "target_new": {"str": new, "id": new_id}, "target_true": {"str": true, "id": true_id},
            "subject": subject,
        },
        "paraphrase_prompts": [f"Some context {case_id}. {text}", f"In short, {text}"],
        "neighborhood_prompts": [f"Neighbor {k} of case {case_id} is" for k in range(n_neighbors)],
        "attribute_prompts": [f"Attribute {k} of case {case_id} is" for k in range(2)],
        "generation_prompts": [f"{subject} is known for", f"People say {subject}"],
    }


ROME_CASES = [
    rome_case(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", "P103",
              "Q1860", "Q150"),
    rome_case(1, "Edwin of Northumbria", "The official religion of {} is", "Islam",
              "Christianity", "P140", "Q432", "Q5043"),
    rome_case(2, "Toko Yasuda", "{}, the", "piano", "guitar", "P1303", "Q5994", "Q6607"),
    rome_case(3, "Autonomous University of Madrid", "{}, which is located in", "Sweden",
              "Spain", "P17", "Q34", "Q29"),
    rome_case(4, "Wellington", "What is the twin city of {}? It is", "Sheffield", "Sydney",
              "P190", "Q42448", "Q3130"),
]


def write_json(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records))
    return path


def rome_cases(n: int | None = None) -> list[dict[str, Any]]:
    """Copies of the fixture records (the first ``n`` of them)."""
    return copy.deepcopy(ROME_CASES[:n] if n is not None else ROME_CASES)


def many_rome_cases(n: int) -> list[dict[str, Any]]:
    """``n`` distinct valid records with case ids ``0 .. n-1``."""
    return [rome_case(i, f"Subject {i}", "The home of {} is", f"City{i}", f"Town{i}", "P17")
            for i in range(n)]
