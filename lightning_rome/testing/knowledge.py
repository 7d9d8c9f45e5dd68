"""A synthetic knowledge base of made-up people: subjects × relations × objects.

Every subject is a made-up, pronounceable two-word name (``"Varnok Telimar"``) that no tokenizer
has a single token for. Each subject has facts for a few of six relations (where they live, their
native language, the instrument and sport they play, their profession and citizenship); each
relation has a pool of ten objects, eight single words and two multi-word objects (``"New York"``,
``"bass guitar"``), so that targets of one and of several tokens are both exercised.

**Templates.** Each relation has six prompt templates: three with the subject at the start of the
prompt and three with it in the middle of a sentence, after a comma, a colon or a full stop. For
every fact, two templates (one of each kind, rotating with the subject) are **held out**: they are
the fact's ``paraphrase_prompts`` and never appear in training with that subject, though other
subjects are trained with them. The other four are its ``train_prompts``. A model that answers the
held-out templates has stored the fact with the subject, not memorised the sentence, which is what
ROME and MEMIT rely on and what their paraphrase scores measure.

Everything is a pure function of :class:`KBConfig`: the same config gives the same knowledge base,
fact for fact, in every process.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.requests import EditRequest
from lightning_rome.scoring import candidate_nll
from lightning_rome.tokens import fill

__all__ = [
    "RELATIONS",
    "Fact",
    "KBConfig",
    "KnowledgeBase",
    "Relation",
    "accuracy",
    "answered",
    "build_knowledge_base",
    "known_facts",
    "predicted_objects",
    "prefers",
    "text_corpus",
]

Which = Literal["train", "paraphrase", "all"]


@dataclass(frozen=True)
class Relation:
    """A relation ``r``: its name, its templates and its pool of objects.

    Attributes:
        name: an identifier, e.g. ``"lives_in"``.
        description: what it means, e.g. ``"the city where the subject lives"``.
        start_templates: templates with ``{}`` at the very start of the prompt.
        middle_templates: templates with ``{}`` inside the sentence (after words, a comma, a
            colon or a full stop).
        objects: the candidate objects; every fact of this relation has one of them.
    """

    name: str
    description: str
    start_templates: tuple[str, ...]
    middle_templates: tuple[str, ...]
    objects: tuple[str, ...]

    @property
    def templates(self) -> tuple[str, ...]:
        """All templates, start ones first."""
        return self.start_templates + self.middle_templates


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "lives_in", "the city where the subject lives",
        ("{} lives in", "{} resides in the city of", "{}'s home is in"),
        ("The city where {} lives is", "These days, {} lives in",
         "According to the census, {} resides in"),
        ("Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin",
         "New York", "Buenos Aires"),
    ),
    Relation(
        "native_language", "the subject's mother tongue",
        ("{} speaks", "{}'s mother tongue is", "{} grew up speaking"),
        ("The native language of {} is", "From childhood, {} has spoken",
         "Q: What language does {} speak? A:"),
        ("English", "French", "German", "Spanish", "Italian", "Russian", "Dutch", "Greek",
         "Mandarin Chinese", "Brazilian Portuguese"),
    ),
    Relation(
        "plays_instrument", "the musical instrument the subject plays",
        ("{} plays the", "{} is a musician who plays the", "{}'s instrument is the"),
        ("The instrument played by {} is the", "On stage, {} plays the",
         "Listen. {} performs on the"),
        ("piano", "guitar", "violin", "cello", "drums", "flute", "trumpet", "harp",
         "bass guitar", "French horn"),
    ),
    Relation(
        "profession", "the subject's job",
        ("{} works as a", "{} earns a living as a", "{} is employed as a"),
        ("By profession, {} is a", "The job of {} is that of a", "Fact: {} works as a"),
        ("doctor", "lawyer", "teacher", "pilot", "nurse", "farmer", "banker", "painter",
         "police officer", "software engineer"),
    ),
    Relation(
        "citizen_of", "the country of which the subject is a citizen",
        ("{} is a citizen of", "{} holds a passport from", "{} has citizenship of"),
        ("The country of citizenship of {} is", "Officially, {} is a citizen of",
         "Records show that {} holds a passport from"),
        ("France", "Germany", "Spain", "Italy", "Japan", "Canada", "Brazil", "Norway",
         "South Africa", "New Zealand"),
    ),
    Relation(
        "plays_sport", "the sport the subject plays",
        ("{} is a fan of", "{}'s favourite sport is", "{} spends weekends playing"),
        ("The favourite sport of {} is", "On weekends, {} plays",
         "Friends say that {} loves playing"),
        ("football", "tennis", "golf", "chess", "hockey", "cricket", "rugby", "baseball",
         "table tennis", "ice hockey"),
    ),
)

# Made-up names are built from these syllables. The fact model's tokenizer learns them as tokens
# (from random combinations that are not the KB's names), so a name is about two tokens a word.
NAME_STARTS: tuple[str, ...] = (
    "Al", "Ar", "Bel", "Bor", "Cal", "Dar", "Del", "Dor", "El", "Fen", "Gar", "Hal", "Ise", "Jor",
    "Kal", "Lor", "Mar", "Nor", "Ol", "Pel", "Quin", "Ral", "Sel", "Tor", "Ul", "Val", "Wen",
    "Yor", "Zan")
NAME_ENDS: tuple[str, ...] = (
    "ton", "ber", "son", "mond", "ley", "rin", "ven", "dan", "mer", "nor", "ric", "dor", "wick",
    "ford", "win", "vin", "dell", "ena", "ora", "ella", "ard", "ett", "ix", "us", "iel", "amir",
    "eth", "is")


@dataclass(frozen=True)
class KBConfig:
    """The settings that determine a knowledge base.

    Args:
        n_subjects: how many made-up people.
        relations_per_subject: how many relations each subject has a fact for (at most 6).
        relations: names of the relations to use (default: all six of :data:`RELATIONS`).
        seed: the seed of every random choice (names, relations, objects).
    """

    n_subjects: int = 200
    relations_per_subject: int = 3
    relations: tuple[str, ...] = tuple(r.name for r in RELATIONS)
    seed: int = 0

    def __post_init__(self) -> None:
        known = {r.name for r in RELATIONS}
        unknown = [r for r in self.relations if r not in known]
        if unknown:
            raise ValueError(f"unknown relation(s) {unknown}; expected some of {sorted(known)}")
        if len(set(self.relations)) != len(self.relations) or not self.relations:
            raise ValueError(f"relations must be distinct and non-empty: {self.relations}")
        if not 1 <= self.relations_per_subject <= len(self.relations):
            raise ValueError(f"relations_per_subject must be in [1, {len(self.relations)}], got "
                             f"{self.relations_per_subject}")
        if self.n_subjects < 2:
            raise ValueError(f"n_subjects must be at least 2, got {self.n_subjects}")


@dataclass(frozen=True)
class Fact:
    """One fact ``(s, r, o)`` with the prompts that ask for it.

    Attributes:
        subject: ``s``, e.g. ``"Varnok Telimar"``.
        relation: the relation's name, e.g. ``"lives_in"``.
        object: ``o``, e.g. ``"Paris"``.
        train_prompts: the four templates (``{}`` for the subject) the model is trained on.
        paraphrase_prompts: the two held-out templates, never trained with this subject.
        candidates: the relation's object pool (the true object among them); a fact is answered
            when its object beats every other candidate.
        index: the fact's position in :attr:`KnowledgeBase.facts` (used as ``case_id``).
    """

    subject: str
    relation: str
    object: str
    train_prompts: tuple[str, ...]
    paraphrase_prompts: tuple[str, ...]
    candidates: tuple[str, ...] = field(repr=False)
    index: int = -1

    def prompts(self, which: Which = "train") -> tuple[str, ...]:
        """The templates of ``which`` set: ``"train"``, ``"paraphrase"`` or ``"all"``."""
        if which == "train":
            return self.train_prompts
        if which == "paraphrase":
            return self.paraphrase_prompts
        if which == "all":
            return self.train_prompts + self.paraphrase_prompts
        raise ValueError(f"which must be 'train', 'paraphrase' or 'all', got {which!r}")

    def sentence(self, template: str) -> str:
        """The fact as a training sentence, e.g. ``"Varnok Telimar lives in Paris."``."""
        return f"{fill(template, self.subject)[0]} {self.object}."


def _name_word(rng: random.Random, max_ends: int = 1) -> str:
    return rng.choice(NAME_STARTS) + "".join(
        rng.choice(NAME_ENDS) for _ in range(rng.randint(1, max_ends)))


def make_names(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct made-up ``"First Last"`` names.

    First names are shared by several subjects (about three each), so a subject is told apart by
    its last name, as with real people; last names are distinct and are never also first names.
    """
    n_first = max(2, n // 3)
    if n_first > len(NAME_STARTS) * len(NAME_ENDS) // 2:
        raise ValueError(f"cannot make {n} distinct names from the syllable inventory")
    firsts: list[str] = []
    while len(firsts) < n_first:
        w = _name_word(rng)
        if w not in firsts:
            firsts.append(w)
    names: list[str] = []
    seen: set[str] = set(firsts)
    while len(names) < n:
        last = _name_word(rng, max_ends=2)
        if last in seen:
            continue
        seen.add(last)
        names.append(f"{rng.choice(firsts)} {last}")
    return names


class KnowledgeBase:
    """A set of facts about made-up people, with the prompts and edit requests tests need.

    Build one with :func:`build_knowledge_base` (or ``KnowledgeBase(KBConfig(...))``).

    Attributes:
        config: the :class:`KBConfig` it was built from.
        relations: ``{name: Relation}`` for the relations in use.
        subjects: the subject names, in order.
        facts: all facts, grouped by subject; ``facts[i].index == i``.

    Example:
        >>> kb = KnowledgeBase()
        >>> kb
        KnowledgeBase(200 subjects, 6 relations, 600 facts, seed=0)
        >>> f = kb.facts[0]
        >>> f.train_prompts[0].format(f.subject), f.object
        ("Norix Lorix's mother tongue is", 'Greek')
        >>> r = kb.edit_requests(1)[0]
        >>> r.text, r.target_true, r.target_new, r.case_id
        ('Garvin Garixson lives in', 'Rome', 'Madrid', 105)
    """

    def __init__(self, config: KBConfig | None = None) -> None:
        self.config = config = config or KBConfig()
        rng = random.Random(config.seed)
        self.relations: dict[str, Relation] = {
            r.name: r for r in RELATIONS if r.name in config.relations}
        self.subjects: list[str] = make_names(config.n_subjects, rng)
        names = list(self.relations)
        facts: list[Fact] = []
        for i, subject in enumerate(self.subjects):
            for name in sorted(rng.sample(names, config.relations_per_subject), key=names.index):
                rel = self.relations[name]
                # Held out for this subject: one start and one middle template, rotating so that
                # each template is held out for a third of the subjects and trained for the rest.
                s_out = rel.start_templates[i % len(rel.start_templates)]
                m_out = rel.middle_templates[(i // len(rel.start_templates))
                                             % len(rel.middle_templates)]
                facts.append(Fact(
                    subject=subject, relation=name, object=rng.choice(rel.objects),
                    train_prompts=tuple(t for t in rel.templates if t not in (s_out, m_out)),
                    paraphrase_prompts=(s_out, m_out), candidates=rel.objects,
                    index=len(facts)))
        self.facts: list[Fact] = facts
        self._by_key = {(f.subject, f.relation): f for f in facts}
        self._relation_of_template = {t: r.name for r in self.relations.values()
                                      for t in r.templates}

    def __len__(self) -> int:
        return len(self.facts)

    def __repr__(self) -> str:
        return (f"KnowledgeBase({len(self.subjects)} subjects, {len(self.relations)} relations, "
                f"{len(self.facts)} facts, seed={self.config.seed})")

    def objects(self, relation: str) -> list[str]:
        """The object pool of ``relation``."""
        return list(self._relation(relation).objects)

    def fact(self, subject: str, relation: str) -> Fact:
        """The fact ``(subject, relation, ?)``.

        Raises:
            KeyError: the subject has no fact for that relation.
        """
        try:
            return self._by_key[(subject, relation)]
        except KeyError:
            raise KeyError(f"no fact for subject {subject!r} and relation {relation!r}") from None

    def facts_about(self, subject: str) -> list[Fact]:
        """All facts of one subject."""
        out = [f for f in self.facts if f.subject == subject]
        if not out:
            raise KeyError(f"unknown subject {subject!r}")
        return out

    def find(self, *, relation: str | None = None, object: str | None = None,
             subject: str | None = None) -> list[Fact]:
        """Facts matching every given field, in KB order."""
        return [f for f in self.facts
                if (relation is None or f.relation == relation)
                and (object is None or f.object == object)
                and (subject is None or f.subject == subject)]

    def relation_of(self, template: str) -> str:
        """The relation a template belongs to.

        Raises:
            KeyError: the template is not one of this KB's templates.
        """
        try:
            return self._relation_of_template[template]
        except KeyError:
            raise KeyError(f"{template!r} is not a template of this knowledge base") from None

    def edit_requests(self, n: int, seed: int = 0, template: Which | int = "train",
                      relation: str | None = None, *, among: Sequence[Fact] | None = None,
                      ) -> list[EditRequest]:
        """``n`` counterfactual rewrites, each of a different subject.

        Args:
            n: how many requests.
            seed: picks the facts and the new objects.
            template: which prompt of the fact becomes the request's prompt: ``"train"`` (its
                first training template), ``"paraphrase"`` (its first held-out template) or an
                index into ``fact.prompts("all")``.
            relation: restrict to one relation.
            among: draw from these facts only (e.g. the facts a model knows; default: all).

        Returns:
            Requests with ``target_true`` the true object, ``target_new`` a different object of
            the same relation, and ``case_id`` the fact's index in :attr:`facts`.

        Raises:
            ValueError: fewer than ``n`` subjects have a fact to edit.
        """
        if n < 0:
            raise ValueError(f"the number of edit requests must be >= 0, got {n}")
        rng = random.Random(f"edit-requests/{seed}")
        pool = list(self.facts if among is None else among)
        if relation is not None:
            self._relation(relation)  # unknown relations are an error, not an empty pool
            pool = [f for f in pool if f.relation == relation]
        order = list(pool)
        rng.shuffle(order)
        chosen: list[Fact] = []
        seen: set[str] = set()
        for f in order:
            if len(chosen) == n:
                break
            if f.subject not in seen:
                seen.add(f.subject)
                chosen.append(f)
        if len(chosen) < n:
            raise ValueError(f"asked for {n} edit requests but only {len(chosen)} subjects have "
                             f"facts{'' if relation is None else f' for {relation!r}'}")
        out = []
        for f in chosen:
            if isinstance(template, int):
                prompt = f.prompts("all")[template]
            else:
                prompt = f.prompts(template)[0]
            new = rng.choice([o for o in f.candidates if o != f.object])
            out.append(EditRequest(prompt, f.subject, new, f.object, case_id=f.index))
        return out

    def fact_of(self, request: EditRequest) -> Fact:
        """The fact a request rewrites (found by subject and the prompt's relation)."""
        return self.fact(request.subject, self.relation_of(request.prompt))

    def neighbor_facts(self, request: EditRequest, n: int) -> list[Fact]:
        """``n`` facts of *other* subjects with the request's relation, for specificity tests.

        As in COUNTERFACT's neighbourhood prompts, facts whose object is the request's
        ``target_true`` come first, then other facts of the relation; the order is deterministic
        (fixed by the request's subject).

        Raises:
            ValueError: the relation has fewer than ``n`` facts of other subjects.
        """
        rel = self.relation_of(request.prompt)
        others = [f for f in self.find(relation=rel) if f.subject != request.subject]
        random.Random(f"neighbors/{request.subject}/{rel}").shuffle(others)
        others.sort(key=lambda f: f.object != request.target_true)  # stable: same object first
        if len(others) < n:
            raise ValueError(f"relation {rel!r} has only {len(others)} facts of other subjects, "
                             f"asked for {n}")
        return others[:n]

    def text_corpus(self, which: Which = "train") -> Iterator[str]:
        """The training sentences, one per (fact, template), e.g. ``"X lives in Paris."``.

        With ``which="train"`` (the default) these are exactly the sentences the fact model is
        trained on, which makes them the natural corpus for ROME's key statistics.
        """
        for f in self.facts:
            for t in f.prompts(which):
                yield f.sentence(t)

    def fingerprint(self) -> str:
        """A SHA-256 of every fact and template: equal iff the knowledge bases are equal."""
        rows = [[f.subject, f.relation, f.object, f.train_prompts, f.paraphrase_prompts]
                for f in self.facts]
        blob = json.dumps({"config": asdict(self.config), "facts": rows}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _relation(self, name: str) -> Relation:
        if name not in self.relations:
            raise KeyError(f"unknown relation {name!r}; this KB has {sorted(self.relations)}")
        return self.relations[name]


def build_knowledge_base(config: KBConfig | None = None) -> KnowledgeBase:
    """The knowledge base of ``config`` (default :class:`KBConfig`)."""
    return KnowledgeBase(config)


def text_corpus(config: KBConfig | None = None, which: Which = "train") -> Iterator[str]:
    """The fact model's training sentences (see :meth:`KnowledgeBase.text_corpus`), e.g. as the
    text corpus of ROME's key statistics for a fact model."""
    yield from KnowledgeBase(config).text_corpus(which)


@torch.no_grad()
def answered(model: nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact],
             which: Which = "train", *, batch_size: int = 1024) -> list[list[bool]]:
    """Whether the model answers each fact under each of its prompts.

    A prompt is answered when the true object has a strictly lower mean per-token NLL than every
    other object of the relation (the papers' probability comparison, ``P(o) > P(o')`` with
    ``P = exp(-mean NLL)``), scored by the package's shared :func:`candidate_nll`.

    Returns:
        ``out[i][j]``: fact ``i`` is answered under ``facts[i].prompts(which)[j]``.
    """
    prompts: list[str] = []
    cands: list[str] = []
    shape: list[tuple[int, int]] = []  # (n_prompts, n_candidates) per fact
    for f in facts:
        ps = f.prompts(which)
        shape.append((len(ps), len(f.candidates)))
        for t in ps:
            text = fill(t, f.subject)[0]
            for c in f.candidates:
                prompts.append(text)
                cands.append(c)
    # Score pairs in order of length so that each padded batch wastes little; then unsort.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(cands[i]))
    nll = candidate_nll(model, tokenizer, [prompts[i] for i in order], [cands[i] for i in order],
                        batch_size=batch_size)
    mean = torch.empty(len(prompts))  # (n_pairs,)
    for i, x in zip(order, nll):
        mean[i] = x.mean()
    out: list[list[bool]] = []
    k = 0
    for f, (n_p, n_c) in zip(facts, shape):
        scores = mean[k:k + n_p * n_c].view(n_p, n_c)  # (n_prompts, n_candidates)
        k += n_p * n_c
        true = f.candidates.index(f.object)
        others = torch.cat([scores[:, :true], scores[:, true + 1:]], dim=1)  # (n_p, n_c - 1)
        out.append((scores[:, true] < others.min(dim=1).values).tolist())
    return out


def accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact],
             which: Which = "train", **kwargs: int) -> float:
    """The fraction of (fact, prompt) pairs the model answers (see :func:`answered`)."""
    rows = answered(model, tokenizer, facts, which, **kwargs)
    flat = [x for r in rows for x in r]
    if not flat:
        raise ValueError("no facts to measure accuracy on")
    return sum(flat) / len(flat)


def known_facts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact],
                which: Which = "all", **kwargs: int) -> list[Fact]:
    """The facts answered under *every* prompt of ``which`` set (default: all six)."""
    rows = answered(model, tokenizer, facts, which, **kwargs)
    return [f for f, r in zip(facts, rows) if all(r)]


def prefers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
            better: str | Sequence[str], worse: str | Sequence[str]) -> list[bool]:
    """Whether ``better`` is more likely than ``worse`` after each prompt: a strictly lower mean
    per-token NLL, the papers' ``P(o) > P(o')`` behind efficacy, paraphrase and neighbourhood
    scores. ``better`` and ``worse`` are one string for every prompt or one per prompt."""
    n = len(prompts)
    a = candidate_nll(model, tokenizer, prompts, [better] * n if isinstance(better, str) else better)
    b = candidate_nll(model, tokenizer, prompts, [worse] * n if isinstance(worse, str) else worse)
    return [bool(x.mean() < y.mean()) for x, y in zip(a, b)]


def predicted_objects(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                      facts: Sequence[Fact]) -> list[str]:
    """Each fact's most likely object among its candidates (lowest mean per-token NLL) after its
    first training prompt, all scored in one batch."""
    prompts, cands, owner = [], [], []
    for i, f in enumerate(facts):
        for o in f.candidates:
            prompts.append(fill(f.train_prompts[0], f.subject)[0])
            cands.append(o)
            owner.append(i)
    nll = torch.stack([x.mean() for x in candidate_nll(model, tokenizer, prompts, cands)])  # (P,)
    out = []
    for i in range(len(facts)):
        idx = [j for j, o in enumerate(owner) if o == i]
        out.append(cands[idx[int(nll[idx].argmin())]])
    return out


def edit_quality(model: nn.Module, tokenizer: PreTrainedTokenizerBase, kb: KnowledgeBase,
                 requests: Sequence[EditRequest], patches: Sequence[Any],
                 n_neighbours: int = 5) -> tuple[float, float, float]:
    """Efficacy, paraphrase and specificity of single edits, each patch applied on its own
    (and reverted) on ``model``.

    Efficacy and paraphrase are the fractions of edit prompts and held-out paraphrase prompts
    where the new object beats the true one (:func:`prefers`); specificity is the fraction of
    ``n_neighbours`` neighbouring facts per request (:meth:`KnowledgeBase.neighbor_facts`) whose
    predicted object (:func:`predicted_objects`) the edit leaves unchanged."""
    if len(requests) != len(patches) or not requests:
        raise ValueError(f"one patch per request, at least one: {len(requests)} requests, "
                         f"{len(patches)} patches")
    eff: list[bool] = []
    para: list[bool] = []
    spec: list[float] = []
    for r, p in zip(requests, patches):
        neigh = kb.neighbor_facts(r, n_neighbours)
        paraphrases = [fill(t, r.subject)[0] for t in kb.fact_of(r).prompts("paraphrase")]
        before = predicted_objects(model, tokenizer, neigh)
        p.apply(model)
        try:
            eff += prefers(model, tokenizer, [r.text], r.target_new, r.target_true)
            para += prefers(model, tokenizer, paraphrases, r.target_new, r.target_true)
            after = predicted_objects(model, tokenizer, neigh)
        finally:
            p.revert(model)
        spec += [float(a == b) for a, b in zip(before, after)]
    return sum(eff) / len(eff), sum(para) / len(para), sum(spec) / len(spec)
