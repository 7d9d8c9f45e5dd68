"""The sequential-editing benchmark (lifelong editing), without a Trainer.

N edits are applied one batch of ``b`` after another, each computed on the model left by the
earlier ones and kept. After every ``k`` batches (and after the last) the model is measured:

- ``efficacy``: ES over *all* edits so far, ``P(o*) > P(o^c)`` on each rewrite prompt;
- ``paraphrase``: PS over all edits so far (their paraphrase prompts);
- ``neighborhood``: NS over all edits so far, ``P(o^c) > P(o*)`` on the prompts about other
  subjects (COUNTERFACT's neighbourhood score, with each prompt's own true answer);
- ``retain_accuracy``: the fraction of a fixed set of facts that no edit touches whose answer
  beats every alternative (what the model knew and should keep);
- ``fluency``: GE, the weighted bi-/trigram entropy of texts sampled from fixed prompts with a
  fixed seed (ROME's generation entropy);
- ``update_norm``: ``sqrt(Σ_W ‖W − W₀‖²_F)`` over the parameters the edits changed.

Point 0 is the unedited model. The curve is written atomically to ``curve.json`` in the results
folder after every point, and a checkpoint (the edited parameters, the editor's state if it has
one, the points so far) after every ``checkpoint_every`` batches, so that a run interrupted
anywhere resumes after the last checkpointed batch, with the same curve, redoing no batch that
was checkpointed. A results folder belongs to one run key (:func:`run_key`: the model's weights,
the tokenizer, the data, the editor and its hyperparameters, the settings, the format
version); another key is refused. At the end the model is restored bit-exactly unless
``keep_edits=True`` (an interrupted or failed run always restores it; its checkpoint holds the
edits).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.patches import EditTransaction, WeightPatch
from lightning_rome.records import EditCase
from lightning_rome.scoring import candidate_nll, generate, model_device
from lightning_rome.utils.io import (
    CorruptFileError,
    atomic_path,
    atomic_write_json,
    tensor_checksum,
)

__all__ = [
    "CURVE_FILE",
    "SEQUENTIAL_VERSION",
    "RetainFact",
    "SequentialInterrupt",
    "SequentialResult",
    "SequentialSettings",
    "fact_model_benchmark",
    "load_curve",
    "run_key",
    "run_sequential",
]

#: Bumped whenever what a point contains or how it is computed changes (part of the run key).
SEQUENTIAL_VERSION = 1
CURVE_FILE = "curve.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
PATCH_DIR = "patches"
RUN_FILE = "run.json"
METRICS = ("efficacy", "paraphrase", "neighborhood", "retain_accuracy", "fluency", "update_norm")


class SequentialInterrupt(RuntimeError):
    """Raised by ``stop_after`` (tests and time budgets): the run stopped after a checkpoint."""


@dataclass(frozen=True)
class RetainFact:
    """A fact that no edit touches: ``prompt`` (subject filled in) should continue with
    ``answer`` rather than any of ``alternatives`` (lower mean per-token NLL than each)."""

    prompt: str
    answer: str
    alternatives: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.alternatives:
            raise ValueError(f"RetainFact {self.prompt!r} needs at least one alternative")
        if self.answer in self.alternatives:
            raise ValueError(f"RetainFact {self.prompt!r}: the answer is among its alternatives")


@dataclass(frozen=True)
class SequentialSettings:
    """How the benchmark runs.

    Args:
        batch_size: ``b``, edits per batch (one ``editor.edit`` call).
        eval_every: ``k``, measure after every this many batches (and after the last).
        max_new_tokens, top_k, seed: the fluency generations (``seed`` fixes the sampling; the
            same random numbers are used at every point, so GE changes with the model only).
        score_batch_size: rows per scoring forward pass (``None``: all at once).
        checkpoint_every: checkpoint after every this many batches (and at every point).
    """

    batch_size: int = 1
    eval_every: int = 10
    max_new_tokens: int = 30
    top_k: int = 5
    seed: int = 0
    score_batch_size: int | None = 512
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_every", "max_new_tokens", "top_k", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def key(self) -> dict[str, Any]:
        """The settings that change the curve (``checkpoint_every`` does not)."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}


@dataclass
class SequentialResult:
    """The curve: one dict per point (``batches``, ``edits`` and :data:`METRICS`), the run key,
    and how many batches this call computed (``0`` when everything was resumed)."""

    points: list[dict[str, Any]]
    key: dict[str, Any]
    batches_run: int = 0
    folder: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def column(self, metric: str) -> list[float]:
        return [p[metric] for p in self.points]


# ------------------------------------------------------------------------------- keying
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _weights_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}={tensor_checksum(t)};".encode())
    return h.hexdigest()


def _editor_id(editor: Any) -> dict[str, Any]:
    hp = getattr(editor, "hparams", None)
    if hp is not None and callable(getattr(hp, "to_dict", None)):
        hp = hp.to_dict()
    name = getattr(editor, "method", None) or type(editor).__name__.lower()
    return {"method": name, "class": type(editor).__qualname__, "hparams": hp}


def run_key(model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: Any,
            cases: Sequence[EditCase], retain: Sequence[RetainFact],
            fluency_prompts: Sequence[str], settings: SequentialSettings) -> dict[str, Any]:
    """Everything that determines a run's curve, as a JSON-serialisable dict.

    The one place where the sequential benchmark's resume key is made: the unedited model's
    weights (a SHA-256 over every tensor of its state dict), the tokenizer, the data (cases,
    retained facts, fluency prompts), the editor (its method, class and hyperparameters), the
    settings and :data:`SEQUENTIAL_VERSION`.
    """
    from lightning_rome.stats.cache import tokenizer_fingerprint

    data = {"cases": [c.to_dict() for c in cases], "retain": [asdict(r) for r in retain],
            "fluency_prompts": list(fluency_prompts)}
    return {
        "format": "lightning_rome.sequential",
        "version": SEQUENTIAL_VERSION,
        "model": {"name": str(getattr(getattr(model, "config", None), "_name_or_path", "")),
                  "weights": _weights_fingerprint(model)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": _sha(data),
        "n_cases": len(cases),
        "editor": _editor_id(editor),
        "settings": settings.key(),
    }


# ------------------------------------------------------------------------------- measuring
def _compare(model: nn.Module, tok: PreTrainedTokenizerBase, rows: list[tuple[str, str]],
             batch_size: int | None) -> list[float]:
    """Mean per-token NLL of each ``(prompt, candidate)``, scored in one batched call."""
    if not rows:
        return []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    nll = candidate_nll(model, tok, [rows[i][0] for i in order], [rows[i][1] for i in order],
                        batch_size=batch_size)
    out = [0.0] * len(rows)
    for i, x in zip(order, nll):
        out[i] = float(x.mean())
    return out


@torch.no_grad()
def measure(model: nn.Module, tok: PreTrainedTokenizerBase, cases: Sequence[EditCase],
            retain: Sequence[RetainFact], fluency_prompts: Sequence[str],
            settings: SequentialSettings) -> dict[str, float | None]:
    """The point's metrics (except ``update_norm``) on the model as it is; ``None`` for a metric
    without prompts (e.g. no edits yet)."""
    from lightning_rome.metrics.functional import (
        efficacy_score,
        generation_entropy,
        neighborhood_score,
        paraphrase_score,
    )

    rows: list[tuple[str, str]] = []
    spans: dict[str, list[tuple[int, int, int]]] = {"rewrite": [], "paraphrase": [],
                                                    "neighborhood": []}
    for c in cases:
        new, true = c.request.target_new, c.request.target_true
        assert true is not None
        for kind, prompts, trues in (
                ("rewrite", c.rewrite_prompts, (true,) * len(c.rewrite_prompts)),
                ("paraphrase", c.paraphrase_prompts, (true,) * len(c.paraphrase_prompts)),
                ("neighborhood", c.neighborhood_prompts, c.neighborhood_answers)):
            if not prompts:
                continue
            start = len(rows)
            for p, t in zip(prompts, trues):
                rows += [(p, new), (p, t)]
            spans[kind].append((start, len(prompts), 2))
    r_start = len(rows)
    for f in retain:
        rows += [(f.prompt, f.answer)] + [(f.prompt, a) for a in f.alternatives]
    nll = _compare(model, tok, rows, settings.score_batch_size)

    def per_case(kind: str) -> tuple[list[Tensor], list[Tensor]] | None:
        if not spans[kind]:
            return None
        news = [torch.tensor(nll[s:s + 2 * n:2], dtype=torch.float64) for s, n, _ in spans[kind]]
        trues = [torch.tensor(nll[s + 1:s + 2 * n:2], dtype=torch.float64)
                 for s, n, _ in spans[kind]]
        return news, trues

    out: dict[str, float | None] = {}
    for kind, fn, name in (("rewrite", efficacy_score, "efficacy"),
                           ("paraphrase", paraphrase_score, "paraphrase"),
                           ("neighborhood", neighborhood_score, "neighborhood")):
        pc = per_case(kind)
        out[name] = None if pc is None else float(fn(pc[0], pc[1]))
    correct, k = [], r_start
    for f in retain:
        scores = nll[k:k + 1 + len(f.alternatives)]
        k += 1 + len(f.alternatives)
        correct.append(scores[0] < min(scores[1:]))
    out["retain_accuracy"] = sum(correct) / len(correct) if correct else None
    if fluency_prompts:
        gen = torch.Generator(device=model_device(model)).manual_seed(settings.seed)
        texts = generate(model, tok, list(fluency_prompts), max_new_tokens=settings.max_new_tokens,
                         top_k=settings.top_k, generator=gen)
        out["fluency"] = float(generation_entropy([[t] for t in texts]))
    else:
        out["fluency"] = None
    return out


def _update_norm(model: nn.Module, originals: Mapping[str, Tensor]) -> float:
    total = 0.0
    for n, w0 in originals.items():
        total += float((model.get_parameter(n).detach().double() - w0.double()).pow(2).sum())
    return math.sqrt(total)


# ------------------------------------------------------------------------------- files
def load_curve(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``curve.json`` of a results folder: ``{"key", "points", "complete"}``, checked.

    Raises:
        FileNotFoundError: no curve there.
        CorruptFileError: not a valid curve file.
    """
    path = Path(folder) / CURVE_FILE
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("checksum") != _sha(
            {k: v for k, v in data.items() if k != "checksum"}):
        raise CorruptFileError(f"{path} fails its checksum")
    return data


def _write_curve(folder: Path, key: dict[str, Any], points: list[dict[str, Any]],
                 complete: bool) -> None:
    body = {"key": key, "points": points, "complete": complete}
    atomic_write_json(folder / CURVE_FILE, {**body, "checksum": _sha(body)})


def _patch_path(folder: Path, batch: int) -> Path:
    return folder / PATCH_DIR / f"batch-{batch:06d}.safetensors"


def _save_checkpoint(path: Path, key: dict[str, Any], editor: Any, batches: int,
                     points: list[dict[str, Any]], edit_seconds: float) -> None:
    """The run's state after ``batches`` batches (their patches are saved apart, one file per
    batch): the points so far, the editing time and the editor's state, if it has one."""
    tensors: dict[str, Tensor] = {}
    editor_header = None
    if callable(getattr(editor, "state_dict", None)) and not isinstance(editor, nn.Module):
        state = editor.state_dict()
        editor_header = state["header"]
        for n, t in state["keys"].items():
            tensors[f"editor::{n}"] = t.detach().cpu().contiguous()
    header = {"key_sha": _sha(key), "batches": batches, "points": points,
              "edit_seconds": edit_seconds, "editor": editor_header,
              "checksums": {n: tensor_checksum(t) for n, t in tensors.items()}}
    text = json.dumps(header, sort_keys=True, default=str)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"lightning_rome": text, "sha256": _sha(text)})


def _load_checkpoint(path: Path, key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        text = meta["lightning_rome"]
        header = json.loads(text)
    except Exception as err:
        raise CorruptFileError(f"{path} cannot be read: {err}") from err
    if meta.get("sha256") != _sha(text):
        raise CorruptFileError(f"{path}: its header fails its checksum")
    if header.get("key_sha") != _sha(key):
        raise CorruptFileError(f"{path} belongs to another run")
    if set(header["checksums"]) != set(tensors) or any(
            tensor_checksum(t) != header["checksums"][n] for n, t in tensors.items()):
        raise CorruptFileError(f"{path}: tensor checksums do not match")
    return header, tensors


def _prepare_folder(folder: Path, key: dict[str, Any], overwrite: bool) -> None:
    run = folder / RUN_FILE
    if run.is_file() and not overwrite:
        try:
            found = json.loads(run.read_text()).get("key")
        except json.JSONDecodeError:
            found = None
        if found != json.loads(json.dumps(key, sort_keys=True, default=str)):
            diff = sorted(k for k in key if not isinstance(found, dict) or found.get(k) != key[k])
            raise ValueError(f"the results folder {folder} holds another sequential run "
                             f"(different {diff or 'key'}); use another folder or "
                             "overwrite=True")
        return
    for name in (CURVE_FILE, CHECKPOINT_FILE):
        (folder / name).unlink(missing_ok=True)
    for old in (folder / PATCH_DIR).glob("batch-*.safetensors"):
        old.unlink()
    atomic_write_json(run, {"key": key})


# ------------------------------------------------------------------------------- the run
def _warm_up(editor: Any, model: nn.Module, tok: PreTrainedTokenizerBase,
             requests: list[Any]) -> None:
    """Compute (and discard) the first batch's edit on the unedited model, so that whatever an
    editor caches per model on its first call (context templates sampled from the model,
    statistics) is what an uninterrupted run cached."""
    patch = editor.edit(model, tok, requests)
    if not isinstance(patch, WeightPatch):
        raise TypeError(f"{type(editor).__name__}.edit returned {type(patch).__name__}, "
                        "expected a WeightPatch")


def run_sequential(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    editor: Any,
    cases: Sequence[EditCase],
    *,
    retain: Sequence[RetainFact] = (),
    fluency_prompts: Sequence[str] = (),
    settings: SequentialSettings | None = None,
    results_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    keep_edits: bool = False,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> SequentialResult:
    """Run the sequential-editing benchmark (see the module docstring).

    Args:
        model, tokenizer: the model to edit (run in eval mode; restored at the end).
        editor: anything with ``edit(model, tokenizer, requests) -> WeightPatch`` (ROME, MEMIT,
            AlphaEdit, ...). An editor with ``state_dict``/``load_state_dict`` (AlphaEdit's
            preserved keys) has its state checkpointed too.
        cases: the N edits, in order; each needs ``target_true``.
        retain: the fixed set of unedited facts.
        fluency_prompts: prompts for GE (none: no fluency).
        settings: :class:`SequentialSettings`.
        results_dir: where ``run.json``, ``curve.json`` and the checkpoint go (``None``: in
            memory only, no resume).
        resume: continue from the folder's checkpoint (same run key); ``False`` starts over.
        overwrite: replace a folder that holds another run.
        keep_edits: leave the edits in the model when the run finishes (default: restore it
            bit-exactly; an interrupted or failed run is always restored).
        on_point: called with each new point (e.g. to log it).
        stop_after: raise :class:`SequentialInterrupt` after this many batches in total, once
            they are checkpointed (simulates an interruption).

    Returns:
        A :class:`SequentialResult`.

    Raises:
        ValueError: bad settings, a case without ``target_true``, or a folder of another run.
    """
    from lightning_rome.tracing.core import eval_mode

    settings = settings or SequentialSettings()
    cases = list(cases)
    if not cases:
        raise ValueError("no cases to edit")
    for c in cases:
        if c.request.target_true is None:
            raise ValueError(f"case {c.case_id!r} has no target_true (efficacy compares o* "
                             "with it)")
    if not callable(getattr(editor, "edit", None)):
        raise TypeError(f"editor {editor!r} has no edit(model, tokenizer, requests) method")
    b = settings.batch_size
    batches = [cases[s:s + b] for s in range(0, len(cases), b)]
    key = run_key(model, tokenizer, editor, cases, retain, fluency_prompts, settings)
    folder = Path(results_dir) if results_dir is not None else None
    points: list[dict[str, Any]] = []
    done, batches_run, edit_seconds = 0, 0, 0.0
    originals: dict[str, Tensor] = {}  # the unedited value of every parameter an edit changed
    # The edits, in order; reverted bit-exactly on the way out unless committed (keep_edits and
    # a run that finished; an interrupted or failed run always restores the model).
    tx = EditTransaction(model)

    def apply(patch: WeightPatch) -> None:
        for n in patch.names:
            if n not in originals:
                originals[n] = model.get_parameter(n).detach().clone()
        tx.apply(patch)

    with eval_mode(model), tx:
        ckpt_state = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            _prepare_folder(folder, key, overwrite or not resume)
            ckpt = folder / CHECKPOINT_FILE
            if resume and ckpt.is_file():
                ckpt_state = _load_checkpoint(ckpt, key)
        if ckpt_state is not None and int(ckpt_state[0]["batches"]) == len(batches):
            # Finished earlier: nothing to redo, the model is not touched.
            done, points = len(batches), list(ckpt_state[0]["points"])
        elif ckpt_state is not None and folder is not None:
            header, tensors = ckpt_state
            _warm_up(editor, model, tokenizer, [c.request for c in batches[0]])
            if header["editor"] is not None:
                editor.load_state_dict({"header": header["editor"], "keys": {
                    n.removeprefix("editor::"): t for n, t in tensors.items()
                    if n.startswith("editor::")}})
            # Re-apply the saved patches in order: each checks the weights it was computed
            # against, and the weights become exactly those of the uninterrupted run.
            for j in range(int(header["batches"])):
                apply(WeightPatch.load(_patch_path(folder, j + 1)).to(model_device(model)))
            done, points = int(header["batches"]), list(header["points"])
            edit_seconds = float(header["edit_seconds"])
        else:
            m = measure(model, tokenizer, [], retain, fluency_prompts, settings)
            points.append({"batches": 0, "edits": 0, **m, "update_norm": 0.0,
                           "edit_seconds": 0.0})
            if on_point is not None:
                on_point(points[-1])
            if folder is not None:
                _write_curve(folder, key, points, False)
        for j in range(done, len(batches)):
            t0 = time.perf_counter()
            patch = editor.edit(model, tokenizer, [c.request for c in batches[j]])
            if not isinstance(patch, WeightPatch):
                raise TypeError(f"{type(editor).__name__}.edit returned "
                                f"{type(patch).__name__}, expected a WeightPatch")
            apply(patch.to(model_device(model)))
            edit_seconds += time.perf_counter() - t0
            batches_run += 1
            done = j + 1
            if folder is not None:
                patch.save(_patch_path(folder, done))
            is_point = done % settings.eval_every == 0 or done == len(batches)
            if is_point:
                edited = cases[:min(len(cases), done * b)]
                m = measure(model, tokenizer, edited, retain, fluency_prompts, settings)
                points.append({"batches": done, "edits": len(edited), **m,
                               "update_norm": _update_norm(model, originals),
                               "edit_seconds": edit_seconds})
                if on_point is not None:
                    on_point(points[-1])
            if folder is not None and (is_point or done % settings.checkpoint_every == 0):
                _save_checkpoint(folder / CHECKPOINT_FILE, key, editor, done, points,
                                 edit_seconds)
                if is_point:
                    _write_curve(folder, key, points, done == len(batches))
            if stop_after is not None and done >= stop_after and done < len(batches):
                raise SequentialInterrupt(f"stopped after batch {done} (stop_after)")
        if folder is not None:
            _write_curve(folder, key, points, True)
        if keep_edits:
            tx.commit(compose=False)
    return SequentialResult(points, key, batches_run, folder)


# ------------------------------------------------------------------------------- fact model
def fact_model_benchmark(fm: Any, n_edits: int, *, seed: int = 0, n_retain_subjects: int = 40,
                         n_neighbours: int = 3, n_fluency: int = 10,
                         ) -> tuple[list[EditCase], list[RetainFact], list[str]]:
    """Cases, retained facts and fluency prompts for a synthetic fact model
    (:func:`lightning_rome.testing.get_fact_model`).

    ``n_retain_subjects`` subjects (drawn with ``seed``) are held out: all their known facts,
    asked with their first training template, form the retained set, and their names are the
    fluency prompts. The edits rewrite known facts of the other subjects to another object of
    the relation, one fact per subject first (then a second relation per subject, and so on);
    each case has the fact's two held-out templates as paraphrases and ``n_neighbours`` facts of
    other subjects with the same relation as neighbourhood prompts.

    Raises:
        ValueError: fewer than ``n_edits`` known facts outside the held-out subjects.
    """
    import random

    from lightning_rome.requests import EditRequest
    from lightning_rome.tokens import fill

    kb = fm.kb
    known = list(fm.known_facts)
    rng = random.Random(f"sequential/{seed}")
    subjects = sorted({f.subject for f in known})
    rng.shuffle(subjects)
    held = set(subjects[:n_retain_subjects])
    retain = [RetainFact(fill(f.train_prompts[0], f.subject)[0], f.object,
                         tuple(o for o in f.candidates if o != f.object))
              for f in known if f.subject in held]
    fluency = sorted(held)[:n_fluency]
    pool = [f for f in known if f.subject not in held]
    rng.shuffle(pool)
    rank: dict[str, int] = {}
    ordered = []
    for f in pool:
        ordered.append((rank.get(f.subject, 0), len(ordered), f))
        rank[f.subject] = rank.get(f.subject, 0) + 1
    ordered.sort(key=lambda x: (x[0], x[1]))
    if len(ordered) < n_edits:
        raise ValueError(f"asked for {n_edits} edits but only {len(ordered)} known facts lie "
                         f"outside the {n_retain_subjects} held-out subjects")
    chosen = [f for _, _, f in ordered[:n_edits]]
    edited = {f.index for f in chosen}
    cases = []
    for f in chosen:
        new = rng.choice([o for o in f.candidates if o != f.object])
        req = EditRequest(f.train_prompts[0], f.subject, new, f.object, case_id=f.index)
        # Neighbours: facts of other subjects with the relation (the request's true object
        # first, as in COUNTERFACT) that no edit of the run rewrites.
        n_others = sum(1 for g in kb.find(relation=f.relation) if g.subject != f.subject)
        neigh = [g for g in kb.neighbor_facts(req, n_others) if g.index not in edited]
        neigh = neigh[:n_neighbours]
        cases.append(EditCase(
            req,
            paraphrase_prompts=tuple(fill(t, f.subject)[0] for t in f.paraphrase_prompts),
            neighborhood_prompts=tuple(fill(g.train_prompts[0], g.subject)[0] for g in neigh),
            neighborhood_answers=tuple(g.object for g in neigh),
            source="fact-model"))
    return cases, retain, fluency
