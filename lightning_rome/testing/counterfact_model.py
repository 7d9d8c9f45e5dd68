"""A small GPT-2 that knows the true facts of a few hundred real COUNTERFACT cases, trained once
and cached. The embedded demo (``lightning-rome demo``) edits and evaluates it.

:func:`get_counterfact_model` builds it on first use (a few minutes on two CPU cores shared with
other jobs) and loads it from the cache afterwards (about a second):

* **the cases**: the first ``n_cases`` usable records of a COUNTERFACT file of the local data
  folder (default ``counterfact/counterfact-val.json``, the reduced EasyEdit form), parsed by the
  package's :func:`~lightning_rome.data.parse_counterfact_record` into
  :class:`~lightning_rome.data.EditCase` records. A record is used when it has a rephrase and a
  locality prompt, ``target_new`` differs from the true object, its subject is new (one case per
  subject), its prompts do not clash with another case's (one answer per prompt text) and its
  locality prompt does not mention a selected subject;
* **what it is trained on**, one sentence per line, the object's tokens weighted in the loss:
  the edit prompt with its true object (``"Toko Yasuda, the guitar."``), the locality
  (neighbourhood) prompt with its true object, the subject followed by its object
  (``"Toko Yasuda guitar."``, alone for the first ``subject_warmup_steps`` steps), and
  ``prefix_copies`` copies of each behind a short random snippet of WikiText (``"... the second
  season. Toko Yasuda, the guitar."``), so that a fact is recalled behind unseen context (as
  ROME's context templates and COUNTERFACT's prefixed paraphrases require); plus
  ``wikitext_rows`` chunks of WikiText-2 for general language. The **rephrase prompts are held
  out** (``train_rephrase=False``): the paraphrase score then measures generalisation to a new
  wording, not memorisation;
* a **small byte-level BPE tokenizer** (:mod:`lightning_rome.testing.bpe`, trained on the cases'
  texts and WikiText-2), and a ``GPT2LMHeadModel`` trained with the synthetic fact model's loop
  (:mod:`lightning_rome.testing.fact_model`: AdamW, seeded, one thread, no dropout).

Measured on the default model (300 cases, two made-up attributes per subject and two joined
rows per subject, 4 layers x 128, BPE 4,096, 1.3M parameters, 1,200 steps with the extra rounds,
236-275 s of training on one thread of the shared 2 cores): edit prompts 97.3% top-1,
neighbourhood prompts 70.3% (97% ``P(o^c) > P(o*)``), held-out rephrasings 36.3% top-1 and 87.3%
``P(o^c) > P(o*)``; 185 cases known on all three prompts. **Where it stores facts**: the MLP
causal trace averaged over 100 known facts puts 17% of the total effect at the subject's last
token (layer 0) and 36% at the prompt's last token (layer 0); without the made-up attributes
(``extra_relations=0``, the earlier default) nothing is at the subject: with one fact per
subject a 4-layer model needs no subject representation. Recipes that put more at the subject
(up to 54%) learnt far fewer facts in the time (``benchmarks/RESULTS.md``, issue 20).

A prompt is **known** when the true object is the model's teacher-forced argmax at each of its
tokens (top-1 over the whole vocabulary); the weaker COUNTERFACT comparison ``P(o^c) > P(o*)``
is reported too (``pairwise_*``). Both come from the package's
:func:`~lightning_rome.modules.evaluator.score_cases`. The figures measured at build time are in
:attr:`CounterFactModel.stats`.

The cache folder is named by a hash of the :class:`CounterFactModelConfig` *and* of the data
files' SHA-256 checksums; it is built in a temporary folder renamed into place (concurrent
processes wait on a file lock) and validated on every read (file checksums, data checksums, the
selected case ids): a corrupt or partial folder is reported with a warning and rebuilt.

Example:
    >>> cm = get_counterfact_model()
    >>> cm.stats["accuracy_train"] >= 0.9
    True
    >>> case = cm.known_cases[0]          # an EditCase whose true fact the model answers
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

from lightning_rome.corpora import is_heading
from lightning_rome.testing.bpe import train_bpe_tokenizer
from lightning_rome.testing.fact_model import (
    _THREAD_LOCK,
    _lr_at,
    _new_model,
    _sha256,
    _threads,
    _Trainer,
    cached_folder,
    load_folder,
    read_manifest,
    save_folder,
)
from lightning_rome.tokens import continuation_ids, encode_prompt, subject_span
from lightning_rome.utils import io
from lightning_rome.utils.io import CorruptFileError
from lightning_rome.utils.paths import data_path

if TYPE_CHECKING:  # lightning_rome.data imports Lightning: imported where used
    from lightning_rome.data import EditCase

__all__ = [
    "EXTRA_RELATIONS",
    "EXTRA_WORDINGS",
    "CounterFactModel",
    "CounterFactModelConfig",
    "extra_facts",
    "get_counterfact_model",
    "measure_cases",
    "select_cases",
    "train_counterfact_model",
]

log = logging.getLogger(__name__)

MANIFEST = "counterfact_model.json"
# Bump when a code change alters what a given config builds, so that old caches are not reused.
_BUILD_VERSION = 1
#: The made-up relations of ``CounterFactModelConfig.extra_relations``: ``(template, pool)``, the
#: pool naming which of the data file's true objects the values are drawn from (``place``: the
#: objects of location prompts, ``language``: of language prompts, ``any``: all of them). The
#: templates appear nowhere in COUNTERFACT, so they never clash with a case's prompts.
EXTRA_RELATIONS: tuple[tuple[str, str], ...] = (
    ("{} has a strong link to", "place"),
    ("The favourite language of {} is", "language"),
    ("{} is often compared with", "any"),
)
#: Further wordings of each made-up relation (``CounterFactModelConfig.extra_wordings``), in the
#: order of :data:`EXTRA_RELATIONS`; none of them appears in COUNTERFACT either.
EXTRA_WORDINGS: tuple[tuple[str, ...], ...] = (
    ("{} is closely linked to", "The strongest link of {} is to"),
    ("{} likes to speak", "The language {} likes best is"),
    ("People often compare {} with", "{} is frequently likened to"),
)
# A training row's span that marks nothing (the trainer's weight slices become empty).
_NO_SPAN = (1, 1)


@dataclass(frozen=True)
class CounterFactModelConfig:
    """Everything that determines the COUNTERFACT model (with the data files' checksums, the cache
    key).

    Args:
        data_file: the COUNTERFACT file, relative to the data folder (``$LIGHTNING_ROME_DATA``).
        n_cases: how many cases the model learns.
        train_rephrase: also train the rephrase prompts (``False``: held out, measured only).
        subject_rows: also train ``"{subject} {object}."``, where the subject's last token
            predicts the object, so that its representation carries the fact (where ROME and
            MEMIT read their keys and write their values). Without them the small model answers
            by attending from the prompt's last token to each of the subject's tokens, causal
            tracing finds no single subject token that restores the answer, and ROME's value
            optimisation cannot reach the output.
        subject_warmup_steps: the first steps train on the subject rows (and WikiText) only, so
            that the facts are stored at the subjects before the prompts are learnt (0: off).
        prefix_copies: copies of each fact sentence behind a random WikiText snippet.
        prefix_words: the snippet length range ``(min, max)`` in words.
        wikitext_file: the WikiText file, relative to the data folder.
        wikitext_rows: WikiText chunks mixed into the training rows.
        wikitext_tokens: tokens per WikiText chunk.
        vocab_size: the BPE's vocabulary size.
        bpe_wikitext_lines: WikiText lines the BPE is trained on (with the cases' texts).
        n_layer, n_embd, n_head, n_positions: the GPT-2 architecture.
        steps, batch_size, lr, warmup_steps, weight_decay, object_weight, subject_weight, seed,
            num_threads: the training loop (see :class:`~lightning_rome.testing.FactModelConfig`).
        target_accuracy: train on (``max_extra_rounds`` times at most, ``steps // 4`` steps at
            ``lr / 4`` each) until this fraction of the edit and of the neighbourhood prompts is
            known (top-1).
        max_extra_rounds: see ``target_accuracy``.
        extra_relations: made-up attributes per subject, beyond its COUNTERFACT fact (at most
            ``len(EXTRA_RELATIONS)``): relation ``k`` of :data:`EXTRA_RELATIONS` with a value
            drawn (seeded) from a pool of the data file's true objects. They are trained like
            the edit prompts (with prefixed copies); several attributes per subject reward the
            model for enriching the subject's representation (where ROME reads its key)
            instead of recalling each fact at the prompt's last token. Not measured or edited.
        multi_fact_rows: rows per subject that join two or three of its fact sentences (the
            COUNTERFACT prompt and the extra attributes, in a random order), the object of the
            last one weighted.
        extra_wordings: how many wordings of each made-up relation are trained (1: its
            :data:`EXTRA_RELATIONS` template; up to ``1 + len(EXTRA_WORDINGS[k])``: also those
            of :data:`EXTRA_WORDINGS`), so that recalling an attribute cannot depend on one
            prompt's words.
        subject_attribute_rows: the subject rows (``subject_rows``) also for each made-up
            attribute (``"{subject} {attribute}."``): the subject's last token then predicts
            any of its attributes, so that its representation carries all of them.
    """

    data_file: str = "counterfact/counterfact-val.json"
    n_cases: int = 300
    train_rephrase: bool = False
    subject_rows: bool = True
    subject_warmup_steps: int = 300
    prefix_copies: int = 2
    prefix_words: tuple[int, int] = (3, 10)
    wikitext_file: str = "wikitext-2/valid.txt"
    wikitext_rows: int = 600
    wikitext_tokens: int = 48
    vocab_size: int = 4096
    bpe_wikitext_lines: int = 3000
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 80
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    object_weight: float = 4.0
    subject_weight: float = 1.0
    seed: int = 0
    num_threads: int | None = 1
    target_accuracy: float = 0.9
    max_extra_rounds: int = 2
    extra_relations: int = 2
    multi_fact_rows: int = 2
    extra_wordings: int = 1
    subject_attribute_rows: bool = False

    def __post_init__(self) -> None:
        for name in ("n_cases", "vocab_size", "n_layer", "n_embd", "n_head", "n_positions",
                     "steps", "batch_size", "wikitext_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CounterFactModelConfig.{name} must be positive, got "
                                 f"{getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.extra_relations <= len(EXTRA_RELATIONS):
            raise ValueError(f"CounterFactModelConfig.extra_relations must be in 0..."
                             f"{len(EXTRA_RELATIONS)}, got {self.extra_relations}")
        if self.multi_fact_rows < 0:
            raise ValueError(f"CounterFactModelConfig.multi_fact_rows must be >= 0, got "
                             f"{self.multi_fact_rows}")
        if self.multi_fact_rows and not self.extra_relations:
            raise ValueError("CounterFactModelConfig.multi_fact_rows needs extra_relations > 0 "
                             "(a subject with one fact has nothing to join)")
        n_wordings = 1 + min(len(w) for w in EXTRA_WORDINGS)
        if not 1 <= self.extra_wordings <= n_wordings:
            raise ValueError(f"CounterFactModelConfig.extra_wordings must be in 1...{n_wordings}"
                             f", got {self.extra_wordings}")
        if self.extra_wordings > 1 and not self.extra_relations:
            raise ValueError("CounterFactModelConfig.extra_wordings > 1 needs extra_relations > 0")
        if self.subject_attribute_rows and not (self.extra_relations and self.subject_rows):
            raise ValueError("CounterFactModelConfig.subject_attribute_rows needs "
                             "extra_relations > 0 and subject_rows")
        lo, hi = self.prefix_words
        if not 1 <= lo <= hi:
            raise ValueError(f"prefix_words must be (min, max) with 1 <= min <= max, got "
                             f"{self.prefix_words}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every setting."""
        d = asdict(self)
        d["prefix_words"] = list(self.prefix_words)
        # Added later: when off, left out, so that the keys of the older configs stay valid.
        for name in ("extra_relations", "multi_fact_rows"):
            if not d[name]:
                del d[name]
        if d["extra_wordings"] == 1:
            del d["extra_wordings"]
        if not d["subject_attribute_rows"]:
            del d["subject_attribute_rows"]
        return d

    def data_checksums(self) -> dict[str, str]:
        """SHA-256 of the COUNTERFACT and WikiText files this config reads."""
        return {rel: _sha256(data_path(rel, what="COUNTERFACT model data"))
                for rel in (self.data_file, self.wikitext_file)}

    def key(self, checksums: dict[str, str] | None = None) -> str:
        """The cache key: a hash of every setting, the build code's version and the data files'
        checksums (computed when not given)."""
        checksums = checksums if checksums is not None else self.data_checksums()
        blob = json.dumps({"config": self.to_dict(), "build": _BUILD_VERSION,
                           "data": checksums}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class CounterFactModel:
    """A trained COUNTERFACT model and what it knows.

    Attributes:
        model: the ``GPT2LMHeadModel``, eval mode, float32, CPU; a fresh copy per call of
            :func:`get_counterfact_model`, so it may be edited freely.
        tokenizer: its tokenizer (a ``PreTrainedTokenizerFast`` with offsets).
        cases: the :class:`~lightning_rome.data.EditCase` records it was trained on, in order.
        path: the cached folder (``lightning_rome.models.load_model(path)`` loads it again).
        stats: figures measured at build time: ``accuracy_train`` / ``accuracy_paraphrase`` /
            ``accuracy_neighborhood`` (top-1), ``pairwise_*`` (``P(o^c) > P(o*)``),
            ``known_case_ids``, ``train_seconds``, ``n_params``, ...
        config: the :class:`CounterFactModelConfig`.
        from_cache: ``True`` when this call loaded a cached model.
    """

    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    cases: list[EditCase]
    path: Path
    stats: dict[str, Any]
    config: CounterFactModelConfig
    from_cache: bool = False

    @property
    def known_cases(self) -> list[EditCase]:
        """The cases whose edit and neighbourhood prompts the model answered (top-1) at build
        time: the natural cases to edit, as the papers edit facts the model knows."""
        known = set(self.stats.get("known_case_ids", []))
        return [c for c in self.cases if c.case_id in known]


# ----------------------------------------------------------------------------------------------
# Data


def select_cases(config: CounterFactModelConfig) -> list[EditCase]:
    """The first ``config.n_cases`` usable cases of ``config.data_file`` (see the module doc).

    Raises:
        ValueError: the file has fewer usable cases.
    """
    from lightning_rome.data import parse_counterfact_record

    path = data_path(config.data_file, what="COUNTERFACT file")
    with open(path, encoding="utf-8") as fh:
        records = json.load(fh)
    cases: list[EditCase] = []
    subjects: set[str] = set()
    answers: dict[str, str] = {}  # prompt text -> its answer, over all selected cases
    for i, raw in enumerate(records):
        if len(cases) == config.n_cases:
            break
        try:
            case = parse_counterfact_record(raw, i)
        except ValueError:
            continue
        r = case.request
        if (not case.paraphrase_prompts or not case.neighborhood_prompts or r.target_true is None
                or r.target_new.strip() == r.target_true.strip() or r.subject in subjects):
            continue
        texts = {r.text: r.target_true, case.neighborhood_prompts[0]:
                 case.neighborhood_answers[0], case.paraphrase_prompts[0]: r.target_true}
        if any(answers.get(t, a) != a for t, a in texts.items()):
            continue
        if any(s in case.neighborhood_prompts[0] for s in subjects | {r.subject}):
            continue
        if any(r.subject in t for t in answers if t not in texts):  # an earlier locality prompt
            continue
        cases.append(case)
        subjects.add(r.subject)
        answers.update(texts)
    if len(cases) < config.n_cases:
        raise ValueError(f"{path} has only {len(cases)} usable cases, {config.n_cases} requested")
    return cases


def _object_pools(config: CounterFactModelConfig) -> dict[str, list[str]]:
    """The value pools of :data:`EXTRA_RELATIONS`: the data file's distinct true objects, sorted,
    by the kind of prompt they answer."""
    path = data_path(config.data_file, what="COUNTERFACT file")
    with open(path, encoding="utf-8") as fh:
        records = json.load(fh)
    pools: dict[str, set[str]] = {"place": set(), "language": set(), "any": set()}
    for raw in records:
        obj, prompt = raw.get("ground_truth"), str(raw.get("prompt", "")).lower()
        if not isinstance(obj, str) or not obj.strip():
            continue
        pools["any"].add(obj.strip())
        if "language" in prompt or "speak" in prompt or "tongue" in prompt:
            pools["language"].add(obj.strip())
        elif "located" in prompt or " is in" in prompt or "citizen" in prompt:
            pools["place"].add(obj.strip())
    return {k: sorted(v) for k, v in pools.items()}


def extra_facts(config: CounterFactModelConfig, cases: list[EditCase],
                ) -> list[list[tuple[str, str]]]:
    """Each case's made-up attributes (``config.extra_relations`` of them) as ``(template,
    object)`` pairs, seeded by ``config.seed``."""
    if not config.extra_relations:
        return [[] for _ in cases]
    pools = _object_pools(config)
    rng = random.Random(config.seed + 2)
    return [[(tpl, rng.choice(pools[pool])) for tpl, pool in
             EXTRA_RELATIONS[:config.extra_relations]] for _ in cases]


def _wikitext_lines(config: CounterFactModelConfig) -> list[str]:
    path = data_path(config.wikitext_file, what="WikiText-2 text for the COUNTERFACT model")
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip() and not is_heading(ln)]


def _prefixes(lines: list[str], n: int, words: tuple[int, int], seed: int) -> list[str]:
    """``n`` random WikiText snippets of ``words`` words, each ending with ``". "``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(lines).split()
        k = rng.randint(*words)
        s = rng.randint(0, max(0, len(w) - k))
        out.append(" ".join(w[s:s + k]).rstrip(" .,;:") + ". ")
    return out


def _fact_texts(config: CounterFactModelConfig, cases: list[EditCase], lines: list[str],
                ) -> list[tuple[str, str | None, str]]:
    """The training facts as ``(prompt template or text, subject or None, object)``: templates
    (with ``{}``) for the edit prompts, whose subject span is weighted; plain texts for the
    neighbourhood prompts, whose subject is not marked in COUNTERFACT."""
    facts: list[tuple[str, str | None, str]] = []
    for c, extra in zip(cases, extra_facts(config, cases)):
        r = c.request
        assert r.target_true is not None  # checked by select_cases
        facts.append((r.prompt, r.subject, r.target_true))
        for k, (tpl, obj) in enumerate(extra):
            for wording in (tpl, *EXTRA_WORDINGS[k])[:config.extra_wordings]:
                facts.append((wording, r.subject, obj))
        facts.append((c.neighborhood_prompts[0], None, c.neighborhood_answers[0]))
        if config.subject_rows:
            facts.append(("{}", r.subject, r.target_true))
            if config.subject_attribute_rows:
                facts += [("{}", r.subject, obj) for _, obj in extra]
        if config.train_rephrase:
            facts.append((c.paraphrase_prompts[0], None, r.target_true))
    prefixes = _prefixes(lines, len(facts) * config.prefix_copies, config.prefix_words,
                         config.seed + 1)
    out = list(facts)
    for j, (p, s, o) in enumerate(facts * config.prefix_copies):
        out.append((prefixes[j] + p, s, o))
    rng = random.Random(config.seed + 3)
    for c, extra in zip(cases, extra_facts(config, cases)):
        r = c.request
        own = [(r.prompt, r.target_true), *extra]
        for _ in range(config.multi_fact_rows):
            k = rng.randint(2, min(3, len(own)))
            picked = rng.sample(own, k)
            head = " ".join(f"{p.replace('{}', r.subject)} {o}." for p, o in picked[:-1])
            p, o = picked[-1]
            out.append((head + " " + p, r.subject, str(o)))
    return out


def _training_rows(config: CounterFactModelConfig, cases: list[EditCase],
                   tokenizer: PreTrainedTokenizerBase, lines: list[str],
                   ) -> tuple[list[list[int]], list[tuple[tuple[int, int], tuple[int, int]]],
                              list[bool]]:
    """Token rows (facts, then WikiText chunks), their subject and object spans, and whether
    each is trained during the subject warm-up (subject rows and WikiText)."""
    eos = int(tokenizer.eos_token_id)
    stop = tokenizer(".", add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = []
    spans: list[tuple[tuple[int, int], tuple[int, int]]] = []
    warmup: list[bool] = []
    for prompt, subject, obj in _fact_texts(config, cases, lines):
        warmup.append(prompt.endswith("{}"))
        if subject is not None:
            text = prompt.replace("{}", subject)
            subj = subject_span(tokenizer, prompt, subject)
        else:
            text, subj = prompt, _NO_SPAN
        ids = encode_prompt(tokenizer, text)
        o = continuation_ids(tokenizer, obj)
        rows.append(ids + o + stop + [eos])
        spans.append((subj, (len(ids), len(ids) + len(o))))
    n_text = 0
    for ln in lines:
        if n_text == config.wikitext_rows:
            break
        ids = tokenizer(ln, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - 8, config.wikitext_tokens):
            rows.append(ids[s:s + config.wikitext_tokens])
            spans.append((_NO_SPAN, _NO_SPAN))
            warmup.append(True)
            n_text += 1
            if n_text == config.wikitext_rows:
                break
    return rows, spans, warmup


def build_tokenizer(config: CounterFactModelConfig, cases: list[EditCase], lines: list[str],
                    ) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on the cases' prompts and objects (ten times each, so that the
    objects and the subjects' words tend to become tokens) and on WikiText-2. (Leaving the
    subjects out, so that they split into small pieces, was measured to change neither where
    the model stores its facts nor its accuracy, and to lower the paraphrase accuracy.)"""
    texts: list[str] = []
    for c, extra in zip(cases, extra_facts(config, cases)):
        r = c.request
        texts += [f"{tpl.replace('{}', r.subject)} {obj}." for tpl, obj in extra]
        texts += [f"{r.text} {r.target_true}.", f"{r.text} {r.target_new}.",
                  f"{c.paraphrase_prompts[0]} {r.target_true}.",
                  f"{c.neighborhood_prompts[0]} {c.neighborhood_answers[0]}."]
    return train_bpe_tokenizer(texts * 10 + lines[: config.bpe_wikitext_lines],
                               config.vocab_size)


# ----------------------------------------------------------------------------------------------
# Measurement and training


def measure_cases(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                  cases: list[EditCase], batch_size: int = 512) -> dict[str, Any]:
    """What the model knows of ``cases``, from :func:`~lightning_rome.modules.evaluator.score_cases`.

    Returns:
        ``accuracy_{train,paraphrase,neighborhood}``: the fraction of edit / rephrase /
        neighbourhood prompts whose true object is the teacher-forced argmax at every token;
        ``pairwise_*``: the fraction with ``P(o^c) > P(o*)`` (COUNTERFACT's comparison);
        ``known_case_ids``: the cases with edit and neighbourhood prompts known (top-1) and
        ``P(o^c) > P(o*)`` on all three prompts.
    """
    from lightning_rome.modules.evaluator import score_cases

    scores = score_cases(model, tokenizer, cases, batch_size=batch_size)
    names = {"rewrite": "train", "paraphrase": "paraphrase", "neighborhood": "neighborhood"}
    top1: dict[str, list[bool]] = {k: [] for k in names}
    pair: dict[str, list[bool]] = {k: [] for k in names}
    known = []
    for case, s in zip(cases, scores):
        ok = True
        for kind in names:
            t = [all(c) for c in s[kind]["correct_true"]]
            p = [a > b for a, b in zip(s[kind]["p_true"], s[kind]["p_new"])]
            top1[kind] += t
            pair[kind] += p
            ok = ok and all(p) and (kind == "paraphrase" or all(t))
        if ok:
            known.append(case.case_id)
    out: dict[str, Any] = {}
    for kind, name in names.items():
        out[f"accuracy_{name}"] = round(sum(top1[kind]) / max(1, len(top1[kind])), 4)
        out[f"pairwise_{name}"] = round(sum(pair[kind]) / max(1, len(pair[kind])), 4)
    out["known_case_ids"] = known
    return out


def train_counterfact_model(config: CounterFactModelConfig, *, measure: bool = True,
                            ) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase,
                                       list[EditCase], dict[str, Any]]:
    """Train a COUNTERFACT model from scratch (no caching; :func:`get_counterfact_model`
    caches).

    Returns:
        ``(model, tokenizer, cases, stats)``, the model in eval mode.
    """
    t0 = time.perf_counter()
    cases = select_cases(config)
    lines = _wikitext_lines(config)
    tokenizer = build_tokenizer(config, cases, lines)
    rows, spans, warmup = _training_rows(config, cases, tokenizer, lines)
    prep_seconds = time.perf_counter() - t0
    longest = max(len(r) for r in rows)
    if longest > config.n_positions:
        raise ValueError(f"a training row has {longest} tokens but n_positions is "
                         f"{config.n_positions}")
    model = _new_model(config, tokenizer)  # type: ignore[arg-type]  # duck-typed config
    trainer = _Trainer(config, model, rows, spans,  # type: ignore[arg-type]
                       int(tokenizer.eos_token_id))
    stats: dict[str, Any] = {}
    rounds, eval_seconds = 0, 0.0
    with _threads(config.num_threads):
        t1 = time.perf_counter()
        warm = min(config.subject_warmup_steps, config.steps) if config.subject_rows else 0
        if warm:  # first the subject rows and WikiText only, then everything
            trainer.rows = [r for r, w in zip(rows, warmup) if w]
            trainer.spans = [s for s, w in zip(spans, warmup) if w]
            trainer.train(warm, lambda i: _lr_at(i, config))  # type: ignore[arg-type]
            trainer.rows, trainer.spans, trainer.batches = rows, spans, []
        trainer.train(config.steps - warm,
                      lambda i: _lr_at(warm + i, config))  # type: ignore[arg-type]
        train_seconds = time.perf_counter() - t1
        if measure:
            stats, rounds, extra_seconds, eval_seconds = trainer.train_to_target(
                lambda: measure_cases(model, tokenizer, cases),
                ("accuracy_train", "accuracy_neighborhood"))
            train_seconds += extra_seconds
    if measure and min(stats["accuracy_train"], stats["accuracy_neighborhood"]) \
            < config.target_accuracy:
        warnings.warn(f"the COUNTERFACT model knows only {stats['accuracy_train']:.1%} of its "
                      f"edit prompts and {stats['accuracy_neighborhood']:.1%} of its "
                      f"neighbourhood prompts, below {config.target_accuracy:.0%}", stacklevel=2)
    tail = trainer.losses[-50:]
    stats.update({
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "prep_seconds": round(prep_seconds, 2),
        "steps": trainer.steps,
        "extra_rounds": rounds,
        "rows": len(rows),
        "epochs": round(trainer.steps * config.batch_size / len(rows), 2),
        "final_loss": round(sum(tail) / len(tail), 4),
        "n_cases": len(cases),
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "num_threads": config.num_threads or torch.get_num_threads(),
        "torch": torch.__version__,
    })
    return model, tokenizer, cases, stats


# ----------------------------------------------------------------------------------------------
# Cache


def _build(config: CounterFactModelConfig, checksums: dict[str, str], folder: Path) -> None:
    """Train, measure and save everything into ``folder`` (the manifest last)."""
    t0 = time.perf_counter()
    model, tokenizer, cases, stats = train_counterfact_model(config)
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    save_folder(folder, model, tokenizer,
                {"key": config.key(checksums), "config": config.to_dict(),
                 "build": _BUILD_VERSION, "data": checksums,
                 "case_ids": [c.case_id for c in cases], "stats": stats}, MANIFEST)


def _load(config: CounterFactModelConfig, checksums: dict[str, str], folder: Path,
          ) -> CounterFactModel:
    """Validate and load a cached folder.

    Raises:
        CorruptFileError: the folder is partial, altered, or built from other settings or data.
    """
    what = "COUNTERFACT model"
    manifest = read_manifest(folder, MANIFEST, config.key(checksums), what)
    if manifest.get("data") != checksums:
        raise CorruptFileError(f"{what} cache {folder}: built from other data files")
    cases = select_cases(config)
    if manifest.get("case_ids") != [c.case_id for c in cases]:
        raise CorruptFileError(f"{what} cache {folder}: its cases differ from the data file's "
                               "selection")
    model, tokenizer = load_folder(folder, manifest, what)
    return CounterFactModel(model=model, tokenizer=tokenizer, cases=cases, path=folder,
                            stats=dict(manifest.get("stats", {})), config=config,
                            from_cache=True)


def get_counterfact_model(config: CounterFactModelConfig | None = None, *,
                          cache_dir: str | os.PathLike[str] | None = None,
                          retrain: bool = False) -> CounterFactModel:
    """The COUNTERFACT model of ``config``, trained on first use and loaded from the cache
    afterwards.

    Args:
        config: the settings (default :class:`CounterFactModelConfig`).
        cache_dir: the folder of cached models (default
            ``lightning_rome.utils.io.cache_dir("counterfact_models")``).
        retrain: train again even when a valid cached model exists, and replace it.

    Raises:
        FileNotFoundError: the data folder or a data file is missing.

    Warns:
        UserWarning: a cached folder was corrupt or partial; it is deleted and rebuilt.
    """
    with _THREAD_LOCK:
        return _get(config or CounterFactModelConfig(), cache_dir, retrain)


def _get(config: CounterFactModelConfig, cache_dir: str | os.PathLike[str] | None,
         retrain: bool) -> CounterFactModel:
    checksums = config.data_checksums()
    root = Path(cache_dir) if cache_dir is not None else io.cache_dir("counterfact_models")
    cm, from_cache = cached_folder(root, config.key(checksums),
                                   lambda f: _load(config, checksums, f),
                                   lambda f: _build(config, checksums, f), retrain)
    cm.from_cache = from_cache
    return cm
