"""A small GPT-2 that knows the facts of a synthetic knowledge base, trained once and cached.

Tests of causal tracing, ROME, MEMIT and the baselines need a model that *knows* facts, and no
pretrained weights are available offline. :func:`get_fact_model` builds one on first use (about
one to two minutes of training on two CPU cores shared with other jobs) and loads it from the
cache afterwards (about a second):

* the knowledge base of :mod:`lightning_rome.testing.knowledge`: 200 made-up people, six
  relations, 600 facts, four training and two held-out paraphrase templates per fact;
* a **small byte-level BPE tokenizer** (2,048 tokens, trained offline with the ``tokenizers``
  library on the relation templates with their objects, on random names made from the KB's name
  syllables and on 1,500 lines of WikiText-2), saved with the model as a Hugging Face
  ``PreTrainedTokenizerFast`` (offsets included) with ``<|endoftext|>`` as BOS, EOS and pad.
  Single-word objects are one token, multi-word objects two, subjects four to six. A small
  vocabulary makes a training step far cheaper than GPT-2's 50,257 tokens; ``tokenizer="gpt2"``
  uses the real GPT-2 tokenizer instead (much slower to train);
* a ``GPT2LMHeadModel`` (4 layers, width 96, 4 heads, 650k parameters) trained with a plain
  PyTorch loop (AdamW, seeded initialisation and batch order, no dropout, one thread) on one
  sentence per (fact, training template), e.g. ``"Norix Lorix's mother tongue is Greek."``, with
  the object's tokens weighted 4× in the loss.

A fact is **answered** under a prompt when its true object beats every other object of the
relation: a strictly lower mean per-token NLL under the package's shared
:func:`lightning_rome.scoring.candidate_nll`, i.e. a higher ``P = exp(-mean NLL)``, the papers'
probability comparison. After training, the accuracy is measured on all facts; while it is below
``target_accuracy`` (90%) under the training *or* the held-out templates, training goes on. The
default model answers 99.5% (training templates) and 98.6% (held-out templates); the measured
figures are in :attr:`FactModel.stats`.

The trained model is cached under ``cache_dir("fact_models", key)``, where ``key`` is a hash of
the :class:`FactModelConfig`. It is built in a temporary folder that is renamed into place when
complete (concurrent processes wait on a file lock, and a loser of a race keeps the winner's
folder), and it is validated on every read (a manifest of SHA-256 checksums and the knowledge
base's fingerprint): a corrupt or partial folder is reported with a warning and rebuilt.

Example:
    >>> fm = get_fact_model()
    >>> fm.stats["accuracy_paraphrase"] >= 0.9
    True
    >>> request = fm.kb.edit_requests(1)[0]     # an EditRequest for a fact the model knows
    >>> model, tok = load_model(fm.path)        # the same model, through the package's loader
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from lightning_rome.models import load_model, load_tokenizer
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import pad_sequences
from lightning_rome.testing.bpe import EOS, train_bpe_tokenizer
from lightning_rome.testing.knowledge import (
    NAME_ENDS,
    NAME_STARTS,
    RELATIONS,
    Fact,
    KBConfig,
    KnowledgeBase,
    Which,
    answered,
)
from lightning_rome.tokens import continuation_ids, encode_prompt, fill, subject_span
from lightning_rome.utils import io
from lightning_rome.utils.io import CorruptFileError
from lightning_rome.utils.paths import data_path
from lightning_rome.utils.progress import progress_bar

T = TypeVar("T")

__all__ = ["DEEP_FACT_MODEL", "FactModel", "FactModelConfig", "get_fact_model",
           "train_fact_model"]

log = logging.getLogger(__name__)

MANIFEST = "fact_model.json"
# Serialises get_fact_model within a process: ``from_pretrained`` is not thread-safe, and the file
# lock below only excludes other processes' open files.
_THREAD_LOCK = threading.RLock()
# Bump when a code change alters what a given config builds, so that old caches are not reused.
_BUILD_VERSION = 2


@dataclass(frozen=True)
class FactModelConfig:
    """Everything that determines the fact model; its hash is the cache key.

    Args:
        kb: the knowledge base.
        tokenizer: ``"bpe"`` (a small byte-level BPE trained here) or ``"gpt2"`` (the real GPT-2
            tokenizer from the local data folder, ``gpt2-tokenizer/``).
        vocab_size: the BPE's vocabulary size.
        wikitext_lines: how many lines of ``wikitext-2/valid.txt`` the BPE is trained on, so that
            it also tokenizes ordinary English sensibly (0: none, and no data folder is needed).
        n_layer, n_embd, n_head, n_positions: the GPT-2 architecture.
        steps: optimiser steps (batches of ``batch_size`` sentences).
        batch_size: sentences per step.
        lr: AdamW's peak learning rate (linear warm-up, then cosine decay to ``lr / 10``).
        warmup_steps: the warm-up length.
        weight_decay: AdamW's weight decay.
        object_weight: the loss weight of the object's tokens (the other real tokens weigh 1);
            more than 1 makes the facts be learnt in fewer steps.
        subject_weight: the loss weight of predicting the subject's tokens (learning the names).
        seed: seeds the weights and the batch order.
        num_threads: ``torch.set_num_threads`` while training and measuring (``None``: leave
            it). One thread by default: on a CPU shared with other jobs, two threads were
            measured to be about ten times *slower* than one (the threads wait on each other).
        target_accuracy: train on (``max_extra_rounds`` times at most) until the model answers
            this fraction of its facts under the training and under the held-out templates.
        max_extra_rounds: see ``target_accuracy``.
    """

    kb: KBConfig = field(default_factory=KBConfig)
    tokenizer: Literal["bpe", "gpt2"] = "bpe"
    vocab_size: int = 2048
    wikitext_lines: int = 1500
    n_layer: int = 4
    n_embd: int = 96
    n_head: int = 4
    n_positions: int = 64
    steps: int = 640
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    object_weight: float = 4.0
    subject_weight: float = 1.0
    seed: int = 0
    num_threads: int | None = 1
    target_accuracy: float = 0.9
    max_extra_rounds: int = 3

    def __post_init__(self) -> None:
        if self.tokenizer not in ("bpe", "gpt2"):
            raise ValueError(f"tokenizer must be 'bpe' or 'gpt2', got {self.tokenizer!r}")
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "steps",
                     "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FactModelConfig.{name} must be positive, got "
                                 f"{getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every setting."""
        return asdict(self)

    def key(self) -> str:
        """The cache key: a hash of every setting and of the build code's version."""
        blob = json.dumps({"config": self.to_dict(), "build": _BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


# A deeper and wider fact model (8 layers, width 192, 4M parameters; about 4 minutes to train on
# one core, then cached) for mass editing. On the default 4-layer model, 100 MEMIT edits at the
# prompt's last token trade efficacy against specificity along a poor frontier (0.98 / 0.81 or
# 0.20 / 0.98); this one reaches 0.93 / 0.947 (see tests/editing/test_memit_behaviour.py).
DEEP_FACT_MODEL = FactModelConfig(n_layer=8, n_embd=192, n_head=6)


@dataclass
class FactModel:
    """A trained fact model and what it knows.

    Attributes:
        model: the ``GPT2LMHeadModel``, in eval mode, float32, on the CPU. Each call of
            :func:`get_fact_model` returns a fresh copy, so a test may edit it freely.
        tokenizer: its tokenizer (a ``PreTrainedTokenizerFast`` with offsets).
        kb: the :class:`~lightning_rome.testing.knowledge.KnowledgeBase` it was trained on.
        path: the cached folder; ``lightning_rome.models.load_model(path)`` loads it again.
        stats: training and evaluation figures, measured when it was built: ``train_seconds``,
            ``eval_seconds``, ``steps``, ``final_loss``, ``accuracy_train``,
            ``accuracy_paraphrase``, ``known_fact_indices``, ``n_params``, ``num_threads``, ...
        config: the :class:`FactModelConfig` it was built from.
        from_cache: ``True`` when this call loaded a cached model instead of training.
    """

    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    kb: KnowledgeBase
    path: Path
    stats: dict[str, Any]
    config: FactModelConfig
    from_cache: bool = False

    @property
    def known_facts(self) -> list[Fact]:
        """The facts the model answers under all six of their prompts (measured at build time),
        the natural pool for edit requests: the papers edit facts the model knows."""
        return [self.kb.facts[i] for i in self.stats["known_fact_indices"]]

    def edit_requests(self, n: int, seed: int = 0, template: Which | int = "train",
                      relation: str | None = None) -> list[EditRequest]:
        """:meth:`KnowledgeBase.edit_requests` drawn from :attr:`known_facts` only."""
        return self.kb.edit_requests(n, seed, template, relation, among=self.known_facts)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_corpus(config: FactModelConfig) -> list[str]:
    """What the BPE is trained on: every relation template with every object (so each object word
    becomes a token), random names from the KB's name syllables (so each syllable becomes a token
    but no KB name does), and lines of WikiText-2."""
    lines = [f"{fill(t, '')[0].strip()} {o}." for r in RELATIONS for t in r.templates
             for o in r.objects] * 10
    rng = random.Random("bpe-syllables")  # not the KB's seed: these are not the KB's names
    for _ in range(3000):
        words = [rng.choice(NAME_STARTS) + rng.choice(NAME_ENDS) for _ in range(2)]
        lines.append(" ".join(words))
    if config.wikitext_lines > 0:
        path = data_path("wikitext-2/valid.txt", what="WikiText-2 text for the fact model's BPE")
        with open(path, encoding="utf-8") as fh:
            text = [ln.strip() for ln in fh if ln.strip() and not ln.strip().startswith("=")]
        lines.extend(text[: config.wikitext_lines])
    return lines


def build_tokenizer(config: FactModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``config``: a freshly trained small BPE, or the real GPT-2 one."""
    if config.tokenizer == "gpt2":
        tok = load_tokenizer(data_path("gpt2-tokenizer", what="GPT-2 tokenizer"))
        tok.bos_token = tok.eos_token = tok.pad_token = EOS
        return tok
    return train_bpe_tokenizer(_tokenizer_corpus(config), config.vocab_size)


# ----------------------------------------------------------------------------------------------
# Training


def _training_rows(kb: KnowledgeBase, tokenizer: PreTrainedTokenizerBase,
                   ) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """One token sequence per (fact, training template): the prompt's tokens exactly as the scorer
    encodes them, the object as a continuation, a full stop and EOS.

    Returns:
        The rows, and for each row the token spans ``[start, end)`` of its subject and object.
    """
    stop = tokenizer(".", add_special_tokens=False)["input_ids"]
    rows, spans = [], []
    for f in kb.facts:
        obj = continuation_ids(tokenizer, f.object)
        for t in f.train_prompts:
            prompt = encode_prompt(tokenizer, fill(t, f.subject)[0])
            rows.append(prompt + obj + stop + [tokenizer.eos_token_id])
            spans.append((subject_span(tokenizer, t, f.subject),
                          (len(prompt), len(prompt) + len(obj))))
    return rows, spans


def _epoch_batches(lengths: list[int], batch_size: int, gen: torch.Generator,
                   ) -> list[list[int]]:
    """One epoch of batches in a seeded random order. Rows are shuffled, then sorted by length
    within windows of 16 batches, so that a batch holds rows of similar length (little padding)
    while its membership still changes every epoch."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    window = 16 * batch_size
    batches = []
    for s in range(0, len(perm), window):
        chunk = sorted(perm[s:s + window], key=lambda i: lengths[i])  # stable
        batches.extend(chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def _lr_at(step: int, config: FactModelConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr / 10``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _new_model(config: FactModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    eos = int(tokenizer.eos_token_id)
    torch.manual_seed(config.seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_layer=config.n_layer, n_embd=config.n_embd,
        n_head=config.n_head, n_positions=config.n_positions, bos_token_id=eos,
        eos_token_id=eos, pad_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True))


class _Trainer:
    """The training loop's state, so that training can continue after a measurement."""

    def __init__(self, config: FactModelConfig, model: GPT2LMHeadModel,
                 rows: list[list[int]], spans: list[tuple[tuple[int, int], tuple[int, int]]],
                 pad_id: int) -> None:
        self.config, self.model, self.rows, self.spans, self.pad_id = (
            config, model, rows, spans, pad_id)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=config.lr, betas=(0.9, 0.98))
        self.gen = torch.Generator().manual_seed(config.seed)
        self.batches: list[list[int]] = []
        self.losses: list[float] = []
        self.steps = 0

    def _batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """The next batch: ``input_ids``, ``attention_mask`` ``(B, T)`` and the loss weight of
        each next-token prediction ``(B, T - 1)``."""
        if not self.batches:
            self.batches = _epoch_batches([len(r) for r in self.rows], self.config.batch_size,
                                          self.gen)
        idx = self.batches.pop()
        batch = pad_sequences([self.rows[i] for i in idx], self.pad_id, "right")
        weight = batch.attention_mask[:, 1:].float()  # (B, T - 1); [b, t] predicts token t + 1
        for b, i in enumerate(idx):
            (s0, s1), (o0, o1) = self.spans[i]
            weight[b, max(s0 - 1, 0):s1 - 1] = self.config.subject_weight
            weight[b, o0 - 1:o1 - 1] = self.config.object_weight
        return batch.input_ids, batch.attention_mask, weight

    def train(self, n_steps: int, lr: Callable[[int], float]) -> None:
        """``n_steps`` AdamW steps; ``lr(i)`` is the learning rate of step ``i`` of these."""
        self.model.train()
        t0 = time.perf_counter()
        bar = progress_bar(n_steps, "training the test model", unit="step")
        for i in range(n_steps):
            bar.update()
            input_ids, mask, weight = self._batch()
            for g in self.opt.param_groups:
                g["lr"] = lr(i)
            logits = self.model(input_ids=input_ids, attention_mask=mask,
                                use_cache=False).logits  # (B, T, V)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(),
                                  reduction="none").view_as(weight)  # (B, T - 1)
            loss = (nll * weight).sum() / weight.sum()  # weighted next-token loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.losses.append(float(loss.detach()))
            self.steps += 1
            if (i + 1) % 100 == 0:
                bar.set_postfix_str(f"loss {sum(self.losses[-100:]) / 100:.4f}")
                log.info("fact model: step %d, loss %.4f, %.1f s", self.steps,
                         sum(self.losses[-100:]) / 100, time.perf_counter() - t0)
        bar.close()
        self.model.eval()

    def train_to_target(self, measure: Callable[[], dict[str, Any]], keys: Sequence[str],
                        ) -> tuple[dict[str, Any], int, float, float]:
        """Measure; while the lowest of the accuracies ``keys`` is below
        ``config.target_accuracy``, train ``config.steps // 4`` more steps at ``lr / 4`` and
        measure again (at most ``config.max_extra_rounds`` times).

        Returns:
            The last measurement, the extra rounds trained, and the seconds spent training and
            measuring.
        """
        config = self.config
        stats: dict[str, Any] = {}
        rounds, train_seconds, eval_seconds = 0, 0.0, 0.0
        while True:
            t0 = time.perf_counter()
            stats = measure()
            eval_seconds += time.perf_counter() - t0
            worst = min(stats[k] for k in keys)
            if worst >= config.target_accuracy or rounds == config.max_extra_rounds:
                return stats, rounds, train_seconds, eval_seconds
            rounds += 1
            log.info("accuracy %.3f below %s, training on", worst, config.target_accuracy)
            t0 = time.perf_counter()
            self.train(max(1, config.steps // 4), lambda i: config.lr / 4)
            train_seconds += time.perf_counter() - t0


def _measure(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerBase, kb: KnowledgeBase,
             ) -> dict[str, Any]:
    """Accuracies on all facts, and the indices of the facts answered under all six prompts."""
    train = answered(model, tokenizer, kb.facts, "train")
    para = answered(model, tokenizer, kb.facts, "paraphrase")

    def mean(rows: list[list[bool]]) -> float:
        flat = [x for r in rows for x in r]
        return round(sum(flat) / len(flat), 4)

    return {"accuracy_train": mean(train), "accuracy_paraphrase": mean(para),
            "known_fact_indices": [f.index for f, a, b in zip(kb.facts, train, para)
                                   if all(a) and all(b)]}


def train_fact_model(config: FactModelConfig, kb: KnowledgeBase | None = None,
                     tokenizer: PreTrainedTokenizerBase | None = None, *,
                     measure: bool = True,
                     ) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Train a fact model from scratch (no caching; :func:`get_fact_model` caches).

    Trains ``config.steps`` steps; then, with ``measure``, measures the accuracy on every fact
    under its training and its held-out templates and, while either is below
    ``config.target_accuracy``, trains ``config.steps // 4`` more steps at ``lr / 4`` (at most
    ``config.max_extra_rounds`` times).

    Returns:
        ``(model, tokenizer, stats)``, the model in eval mode. ``stats`` holds the training time,
        steps and loss, and with ``measure`` the accuracies ``accuracy_train`` and
        ``accuracy_paraphrase`` and ``known_fact_indices`` (the facts answered under all six
        of their prompts).
    """
    kb = kb or KnowledgeBase(config.kb)
    t0 = time.perf_counter()
    tokenizer = tokenizer or build_tokenizer(config)
    tok_seconds = time.perf_counter() - t0
    rows, spans = _training_rows(kb, tokenizer)
    longest = max(len(r) for r in rows)
    if longest > config.n_positions:
        raise ValueError(f"a training sentence has {longest} tokens but n_positions is "
                         f"{config.n_positions}")
    model = _new_model(config, tokenizer)
    trainer = _Trainer(config, model, rows, spans, int(tokenizer.eos_token_id))
    stats: dict[str, Any] = {}
    rounds, eval_seconds = 0, 0.0
    with _threads(config.num_threads):
        t1 = time.perf_counter()
        trainer.train(config.steps, lambda i: _lr_at(i, config))
        train_seconds = time.perf_counter() - t1
        if measure:
            stats, rounds, extra_seconds, eval_seconds = trainer.train_to_target(
                lambda: _measure(model, tokenizer, kb),
                ("accuracy_train", "accuracy_paraphrase"))
            train_seconds += extra_seconds
    if measure and min(stats["accuracy_train"], stats["accuracy_paraphrase"]) \
            < config.target_accuracy:
        warnings.warn(f"the fact model answers only {stats['accuracy_train']:.1%} of its facts "
                      f"(training templates) and {stats['accuracy_paraphrase']:.1%} (held-out "
                      f"templates), below {config.target_accuracy:.0%}", stacklevel=2)
    tail = trainer.losses[-50:]
    stats.update({
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "tokenizer_seconds": round(tok_seconds, 2),
        "steps": trainer.steps,
        "extra_rounds": rounds,
        "epochs": round(trainer.steps * config.batch_size / len(rows), 2),
        "sentences": len(rows),
        "final_loss": round(sum(tail) / len(tail), 4),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        "vocab_size": len(tokenizer),
        "num_threads": config.num_threads or torch.get_num_threads(),
        "torch": torch.__version__,
    })
    return model, tokenizer, stats


# ----------------------------------------------------------------------------------------------
# Cache


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_folder(folder: Path, model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerBase,
                manifest: dict[str, Any], manifest_name: str) -> None:
    """Save a model and its tokenizer into ``folder``, then the manifest (last): ``manifest``
    plus the SHA-256 of every file written."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / manifest_name).write_text(json.dumps({**manifest, "files": files}, indent=1,
                                                   sort_keys=True))


def read_manifest(folder: Path, manifest_name: str, key: str, what: str) -> dict[str, Any]:
    """The manifest of a cached folder, checked to be for ``key``.

    Raises:
        CorruptFileError: unreadable, or written for another key.
    """
    try:
        manifest = json.loads((folder / manifest_name).read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{what} cache {folder}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        raise CorruptFileError(f"{what} cache {folder}: manifest is for another config")
    return manifest


def load_folder(folder: Path, manifest: dict[str, Any], what: str,
                ) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """Check every file against the manifest's checksums, then load the model (float32, CPU)
    and its tokenizer.

    Raises:
        CorruptFileError: a file is missing or altered, or the model cannot be loaded.
    """
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise CorruptFileError(f"{what} cache {folder}: manifest lists no weights")
    for name, digest in files.items():
        try:
            intact = _sha256(folder / name) == digest
        except OSError:
            intact = False
        if not intact:
            raise CorruptFileError(f"{what} cache {folder}: {name} is missing or altered")
    try:
        model, tokenizer = load_model(folder, dtype=torch.float32, device="cpu")
    except Exception as e:  # a corrupt file that somehow kept its checksum, or a bad config
        raise CorruptFileError(f"{what} cache {folder}: cannot be loaded ({e})") from e
    # ``from_pretrained`` memory-maps the safetensors file; copy the weights into ordinary memory
    # so that the model does not depend on the cache file (which may be replaced or deleted).
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one parameter: they stay tied
            p.data = p.data.clone()
    return model, tokenizer


def _build(config: FactModelConfig, kb: KnowledgeBase, folder: Path) -> None:
    """Train, measure and save everything into ``folder`` (the manifest last)."""
    t0 = time.perf_counter()
    model, tokenizer, stats = train_fact_model(config, kb)
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    save_folder(folder, model, tokenizer,
                {"key": config.key(), "config": config.to_dict(), "build": _BUILD_VERSION,
                 "kb_fingerprint": kb.fingerprint(), "stats": stats}, MANIFEST)


def _load(config: FactModelConfig, kb: KnowledgeBase, folder: Path) -> FactModel:
    """Validate and load a cached folder.

    Raises:
        CorruptFileError: the folder is partial, altered or from another config.
    """
    manifest = read_manifest(folder, MANIFEST, config.key(), "fact model")
    if manifest.get("kb_fingerprint") != kb.fingerprint():
        raise CorruptFileError(f"fact model cache {folder}: built from a different knowledge base")
    model, tokenizer = load_folder(folder, manifest, "fact model")
    return FactModel(model=model, tokenizer=tokenizer, kb=kb, path=folder,
                     stats=dict(manifest.get("stats", {})), config=config, from_cache=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (a no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _discard(folder: Path) -> None:
    """Move a folder out of the way (atomically) and delete it."""
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def get_fact_model(config: FactModelConfig | None = None, *,
                   cache_dir: str | os.PathLike[str] | None = None,
                   retrain: bool = False) -> FactModel:
    """The fact model of ``config``, trained on first use and loaded from the cache afterwards.

    Args:
        config: the settings (default :class:`FactModelConfig`).
        cache_dir: the folder that holds cached fact models (default
            ``lightning_rome.utils.io.cache_dir("fact_models")``, under ``$LIGHTNING_ROME_CACHE``).
        retrain: train again even when a valid cached model exists, and replace it.

    Returns:
        A :class:`FactModel`; ``from_cache`` says whether it was loaded instead of trained.

    Warns:
        UserWarning: a cached folder was corrupt or partial; it is deleted and rebuilt.
    """
    with _THREAD_LOCK:
        return _get_fact_model(config or FactModelConfig(), cache_dir, retrain)


def cached_folder(root: Path, key: str, load: Callable[[Path], T],
                  build: Callable[[Path], None], retrain: bool = False) -> tuple[T, bool]:
    """Load the folder ``root / key`` with ``load``, or build it with ``build`` and load it.

    ``build`` writes into a fresh temporary folder under ``root`` that is renamed into place only
    when complete, under an inter-process lock (a process that waited finds the folder built). A
    folder that ``load`` rejects with :class:`CorruptFileError` is reported, discarded and rebuilt.

    Returns:
        what ``load`` returned, and whether it came from the cache.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    if not retrain and final.exists():
        try:
            return load(final), True
        except CorruptFileError:
            pass  # re-checked, reported and rebuilt under the lock below
    with _lock(root / f"{key}.lock"):
        if not retrain and final.exists():  # another process may have built it meanwhile
            try:
                return load(final), True
            except CorruptFileError as e:
                warnings.warn(f"{e}; rebuilding it", stacklevel=4)
        for stale in root.glob(f".{key}.*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            _discard(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.build-", dir=root))
        try:
            build(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # a process without the lock (another host) renamed first
                if not final.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return load(final), False


def _get_fact_model(config: FactModelConfig, cache_dir: str | os.PathLike[str] | None,
                    retrain: bool) -> FactModel:
    kb = KnowledgeBase(config.kb)
    root = Path(cache_dir) if cache_dir is not None else io.cache_dir("fact_models")
    fm, from_cache = cached_folder(root, config.key(), lambda f: _load(config, kb, f),
                                   lambda f: _build(config, kb, f), retrain)
    fm.from_cache = from_cache
    return fm
