"""Batched teacher-forced scoring and generation: the one routine that editing, evaluation and
tracing share for probabilities and text."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.models.hf_compat import forward_cache_kwargs, output_cache
from lightning_rome.tokens import continuation_ids, encode_prompt

__all__ = [
    "Batch",
    "CandidateScore",
    "TeacherForcedRows",
    "candidate_nll",
    "candidate_probs",
    "candidate_scores",
    "encode_pairs",
    "forward_logits",
    "generate",
    "make_batch",
    "pad_sequences",
    "row_chunks",
    "target_nll",
    "teacher_forced_rows",
    "top_predictions",
]

Side = Literal["left", "right"]


@dataclass
class Batch:
    """Padded token ids with everything a forward pass needs.

    Attributes:
        input_ids: ``(B, T)``.
        attention_mask: ``(B, T)``, 1 on real tokens.
        position_ids: ``(B, T)``, counting real tokens only, so left padding gives the same
            positions as no padding.
        lengths: ``(B,)`` real lengths.
        offsets: ``(B,)`` index of each row's first real token (non-zero only with left padding).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    lengths: Tensor
    offsets: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                              self.position_ids, self.lengths, self.offsets)))

    def index(self, row: int, pos: int) -> int:
        """The padded index of unpadded token ``pos`` in ``row``."""
        return int(self.offsets[row]) + pos


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: Side = "right",
                  device: torch.device | str | None = None) -> Batch:
    """Pad token-id lists into a :class:`Batch` on the given side."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pad an empty batch or an empty sequence")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    offsets = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        o = T - len(s) if side == "left" else 0
        ids[i, o:o + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, o:o + len(s)] = 1
        offsets[i] = o
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    lengths = mask.sum(-1)
    batch = Batch(ids, mask, pos, lengths, offsets)
    return batch.to(device) if device is not None else batch


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_batch(tokenizer: PreTrainedTokenizerBase, seqs: Sequence[Sequence[int]],
               side: Side | None = None, device: torch.device | str | None = None) -> Batch:
    """Pad with the tokenizer's pad id and (by default) its padding side."""
    return pad_sequences(seqs, _pad_id(tokenizer), side or tokenizer.padding_side, device)


def _host_rows(seqs: Sequence[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Share rows between sequences that are prefixes of one another.

    A causal LM's logits at position ``i`` depend only on tokens ``<= i``, so a sequence that is
    a prefix of another is read off the longer one's row. In lexicographic order, a sequence is a
    prefix of some other exactly when it is a prefix of the next distinct one, so one backward
    sweep over the sorted sequences finds each one's longest extension.

    Returns:
        The distinct rows to run, and for each input sequence the index of its row.
    """
    order = sorted(set(seqs))
    host: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i in range(len(order) - 1, -1, -1):
        s = order[i]
        nxt = order[i + 1] if i + 1 < len(order) else None
        host[s] = host[nxt] if nxt is not None and nxt[: len(s)] == s else s
    rows = sorted(set(host.values()))
    index = {r: k for k, r in enumerate(rows)}
    return rows, [index[host[s]] for s in seqs]


def encode_pairs(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 targets: Sequence[str | None]) -> tuple[list[list[int]], list[list[int]]]:
    """The token ids of ``prompt, target`` pairs under the scoring conventions:
    ``encode_prompt(prompt)`` and ``continuation_ids(target)`` (the leading-space rule); a
    ``None`` target is no tokens."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    return ([encode_prompt(tokenizer, p) for p in prompts],
            [continuation_ids(tokenizer, t) if t is not None else [] for t in targets])


@dataclass
class TeacherForcedRows:
    """Padded ``prompt ‖ target`` rows for teacher forcing, and where each target token is read.

    Pair ``i`` runs as ``prompt_i + target_i`` (``full_target``) or ``prompt_i + target_i[:-1]``
    (the last target token is never an input when only its probability is read). Target token
    ``j`` of pair ``i`` is predicted by the logits at unpadded position ``len(prompt_i) - 1 + j``
    of the pair's row, and with ``full_target`` it stands at the position after that.

    Attributes:
        batch: the ``N`` padded rows (``N < P`` when pairs share a row).
        row: ``(P,)`` the row of each pair.
        predict_index: ``(P, L)`` padded index, in its row, of the logits predicting target token
            ``j`` (``L`` the longest target; 0 past a pair's target).
        target_ids: ``(P, L)`` the target token ids (0 past a pair's target).
        target_mask: ``(P, L)`` bool, True on a pair's target tokens.
        prompt_lengths: ``(P,)`` prompt tokens per pair.
        target_lengths: ``(P,)`` target tokens per pair (0 for a pair without target).
        full_target: whether the rows hold the whole target.
    """

    batch: Batch
    row: Tensor
    predict_index: Tensor
    target_ids: Tensor
    target_mask: Tensor
    prompt_lengths: Tensor
    target_lengths: Tensor
    full_target: bool

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def to(self, device: torch.device | str) -> TeacherForcedRows:
        return TeacherForcedRows(self.batch.to(device), *(t.to(device) for t in (
            self.row, self.predict_index, self.target_ids, self.target_mask,
            self.prompt_lengths, self.target_lengths)), self.full_target)

    @property
    def last_prompt_index(self) -> Tensor:
        """``(P,)`` padded index of each pair's last prompt token (where its next-token
        distribution is read)."""
        offsets = self.batch.offsets.to(self.row.device)[self.row]  # (P,)
        return offsets + self.prompt_lengths - 1

    def token_logp(self, logp: Tensor) -> Tensor:
        """``(P, L)`` log-probability of each target token, 0 past a pair's target.

        Args:
            logp: ``(N, T, V)`` log-probabilities over the padded rows.
        """
        tok = logp[self.row[:, None], self.predict_index, self.target_ids]  # (P, L)
        return torch.where(self.target_mask, tok, torch.zeros_like(tok))

    def kept_positions(self) -> tuple[Tensor, Tensor]:
        """The positions each row is read at, for ``logits_to_keep``.

        Returns:
            ``keep`` ``(N, K)``: each row's distinct read positions in increasing order (padded
            by repeating the last), and ``slot`` ``(P, L)``: the column of ``keep`` holding
            ``predict_index`` (0 past a pair's target).
        """
        rows, idx, mask = self.row.tolist(), self.predict_index.tolist(), self.target_mask.tolist()
        read: list[set[int]] = [set() for _ in range(len(self.batch.input_ids))]
        for r, q, m in zip(rows, idx, mask):
            read[r].update(x for x, on in zip(q, m) if on)
        pos = [sorted(s) or [0] for s in read]
        K = max(len(x) for x in pos)
        keep = torch.tensor([x + [x[-1]] * (K - len(x)) for x in pos])  # (N, K)
        col = [{q: k for k, q in enumerate(x)} for x in pos]
        slot = torch.tensor([[col[r][x] if on else 0 for x, on in zip(q, m)]
                             for r, q, m in zip(rows, idx, mask)], dtype=torch.long)  # (P, L)
        dev = self.predict_index.device
        return keep.to(dev), slot.reshape(self.predict_index.shape).to(dev)

    def labels(self, ignore_index: int = -100) -> Tensor:
        """``(N, T)`` the target token ids where they stand in the rows, ``ignore_index``
        elsewhere (the Hugging Face convention: a causal LM shifts them). Needs
        ``full_target`` and one row per pair."""
        self._one_row_per_pair("labels")
        if not self.full_target:
            raise ValueError("labels need rows that hold the whole target (full_target=True)")
        labels = torch.full_like(self.batch.input_ids, ignore_index)  # (N, T)
        m = self.target_mask
        labels[self.row[:, None].expand_as(m)[m], self.predict_index[m] + 1] = self.target_ids[m]
        return labels

    def predict_mask(self) -> Tensor:
        """``(N, T)`` bool: the positions whose logits predict a target token; for a pair without
        target, its last prompt token. Needs one row per pair."""
        self._one_row_per_pair("predict_mask")
        mask = torch.zeros_like(self.batch.input_ids, dtype=torch.bool)  # (N, T)
        m = self.target_mask
        mask[self.row[:, None].expand_as(m)[m], self.predict_index[m]] = True
        bare = self.target_lengths == 0  # (P,)
        mask[self.row[bare], self.last_prompt_index[bare]] = True
        return mask

    def _one_row_per_pair(self, what: str) -> None:
        if len(self) != len(self.batch.input_ids):
            raise ValueError(f"{what} needs one row per pair, but {len(self)} pairs share "
                             f"{len(self.batch.input_ids)} rows")


def _rows_of(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
             full_target: bool, share_prefixes: bool,
             ) -> tuple[list[tuple[int, ...]], list[int]]:
    """The distinct token rows of the pairs and each pair's row (see :func:`teacher_forced_rows`)."""
    seqs = [tuple(p) + tuple(t if full_target else t[:-1]) for p, t in zip(prompt_ids, target_ids)]
    return _host_rows(seqs) if share_prefixes else (seqs, list(range(len(seqs))))


def row_chunks(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
               rows_per_chunk: int | None, *, full_target: bool = False,
               share_prefixes: bool = False) -> list[list[int]]:
    """Split pairs into chunks of at most ``rows_per_chunk`` rows of
    :func:`teacher_forced_rows` (``None``: one chunk), keeping every pair with the row that
    hosts it, so each chunk's :func:`teacher_forced_rows` rebuilds exactly its rows.

    Returns:
        The pair indices of each chunk, in increasing row order.
    """
    if rows_per_chunk is not None and rows_per_chunk < 1:
        raise ValueError(f"rows per chunk must be at least 1, got {rows_per_chunk}")
    rows, row_of = _rows_of(prompt_ids, target_ids, full_target, share_prefixes)
    hosted: list[list[int]] = [[] for _ in rows]  # the pairs each row serves
    for i, r in enumerate(row_of):
        hosted[r].append(i)
    step = rows_per_chunk or len(rows)
    return [[i for r in range(s, min(s + step, len(rows))) for i in hosted[r]]
            for s in range(0, len(rows), step)]


def teacher_forced_rows(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    *,
    side: Side | None = None,
    full_target: bool = False,
    share_prefixes: bool = False,
    device: torch.device | str | None = None,
) -> TeacherForcedRows:
    """Build the teacher-forced rows of ``(prompt, target)`` token-id pairs: the one place where
    prompt+target rows and their positions are computed (scoring, value optimisation, the
    hypernetwork losses and the training batches all use it).

    Args:
        tokenizer: gives the pad id (and the default padding side).
        prompt_ids: each pair's prompt tokens (at least one each).
        target_ids: each pair's target tokens (may be empty: the row is the prompt alone).
        side: padding side (default: the tokenizer's).
        full_target: rows hold the whole target (for labels); otherwise its last token is left
            out (only its probability is read).
        share_prefixes: a pair whose row is a prefix of another pair's row is read off the longer
            row (a causal LM's logits at ``i`` depend only on tokens ``<= i``).
        device: where the tensors go (default: the CPU).

    Example:
        >>> tf = teacher_forced_rows(tok, [[5, 6], [7]], [[8, 9], [10]], side="left")
        >>> tf.batch.offsets.tolist(), tf.predict_index.tolist(), tf.target_mask.tolist()
        ([0, 2], [[1, 2], [2, 0]], [[True, True], [True, False]])
    """
    if len(prompt_ids) != len(target_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
    if not prompt_ids:
        raise ValueError("no prompt/target pairs to build rows from")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"pair {i} has an empty prompt: a target token needs a prompt "
                             "token to be predicted from")
    P, L = len(prompt_ids), max(len(t) for t in target_ids)
    rows, row_of = _rows_of(prompt_ids, target_ids, full_target, share_prefixes)
    batch = make_batch(tokenizer, [list(r) for r in rows], side)
    index = torch.zeros((P, L), dtype=torch.long)
    ids = torch.zeros((P, L), dtype=torch.long)
    mask = torch.zeros((P, L), dtype=torch.bool)
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        n = len(t)
        index[i, :n] = torch.arange(n) + batch.index(row_of[i], len(p) - 1)
        ids[i, :n] = torch.as_tensor(list(t), dtype=torch.long)
        mask[i, :n] = True
    tf = TeacherForcedRows(
        batch, torch.as_tensor(row_of, dtype=torch.long), index, ids, mask,
        torch.tensor([len(p) for p in prompt_ids], dtype=torch.long),
        torch.tensor([len(t) for t in target_ids], dtype=torch.long), full_target)
    return tf.to(device) if device is not None else tf


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits ``(B, T, V)`` for a padded batch, with explicit positions so that padding on either
    side gives the same numbers as running each row alone."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False)
    return out.logits


@dataclass
class CandidateScore:
    """Teacher-forced scores of one candidate continuation after its prompt.

    Attributes:
        nll: ``(n_c,)`` float32, ``-log P(c_j | prompt, c_<j)`` per candidate token.
        argmax: ``(n_c,)`` the model's most likely token at each of those positions.
        target: ``(n_c,)`` the candidate's token ids ``c_j``.
    """

    nll: Tensor
    argmax: Tensor
    target: Tensor

    @property
    def correct(self) -> Tensor:
        """``(n_c,)`` bool: the argmax is the candidate token (zsRE's token accuracy)."""
        return self.argmax == self.target

    @property
    def mean_nll(self) -> float:
        """The mean per-token NLL, the papers' score."""
        return float(self.nll.double().mean())

    @property
    def prob(self) -> float:
        """``P = exp(-mean NLL)``, the papers' probability."""
        return math.exp(-self.mean_nll)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def _score_pairs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    batch_size: int | None,
    side: Side | None,
    fast: bool,
) -> list[CandidateScore]:
    """The shared teacher-forced scoring loop of :func:`candidate_nll` and
    :func:`candidate_scores`.

    Pair ``i`` runs as the token sequence ``prompt + candidate[:-1]``; candidate token ``c_j`` is
    predicted at unpadded position ``len(prompt) - 1 + j``. With ``fast``, pairs whose sequences
    are prefixes of one another share a row and the LM head runs only at the needed positions;
    without it every pair has its own row and the full ``(B, T, V)`` log-softmax is taken (the
    arithmetic :func:`candidate_nll` has always done).
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidates")
    if not prompts:
        return []
    device = model_device(model)
    p_ids, c_ids = encode_pairs(tokenizer, prompts, candidates)
    keep = fast and _accepts_logits_to_keep(model)
    out: list[CandidateScore | None] = [None] * len(prompts)
    for pairs in row_chunks(p_ids, c_ids, batch_size or None, share_prefixes=fast):
        tf = teacher_forced_rows(tokenizer, [p_ids[i] for i in pairs], [c_ids[i] for i in pairs],
                                 side=side, share_prefixes=fast, device=device)
        batch = tf.batch
        if keep:
            at, cols = tf.kept_positions()  # (B, K), (P, L)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False,
                           logits_to_keep=at).logits  # (B, K, V)
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, K, V)
        else:
            cols = tf.predict_index  # (P, L)
            logp = F.log_softmax(forward_logits(model, batch).float(), dim=-1)  # (B, T, V)
        # One gather for every (pair, token) of the chunk, pair by pair.
        m = tf.target_mask  # (P, L)
        rows_lp = logp[tf.row[:, None].expand_as(m)[m], cols[m]]  # (n_tokens, V)
        tok = tf.target_ids[m]  # (n_tokens,)
        nll = (-rows_lp.gather(1, tok[:, None])[:, 0]).cpu()  # (n_tokens,)
        arg = rows_lp.argmax(-1).cpu()  # (n_tokens,)
        start = 0
        for i in pairs:
            n = len(c_ids[i])
            out[i] = CandidateScore(nll=nll[start:start + n], argmax=arg[start:start + n],
                                    target=torch.as_tensor(c_ids[i], dtype=torch.long))
            start += n
    return out  # type: ignore[return-value]


@torch.no_grad()
def candidate_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    batch_size: int | None = None,
    side: Side | None = None,
) -> list[Tensor]:
    """Per-token negative log-likelihood of each candidate after its prompt, teacher-forced.

    Pair ``i`` is ``(prompts[i], candidates[i])``; candidates follow the leading-space rule of
    :func:`lightning_rome.tokens.continuation_ids`. All pairs run in one padded forward pass (or
    in chunks of ``batch_size``).

    Returns:
        One float32 tensor per pair, ``(n_candidate_tokens,)``: ``-log P(c_j | prompt, c_<j)``.
        ``exp(-nll.mean())`` is the probability the papers compare.

    Example:
        >>> nll = candidate_nll(model, tok, ["The capital of France is"] * 2, ["Paris", "Rome"])
        >>> bool(nll[0].mean() < nll[1].mean())
        True
    """
    scores = _score_pairs(model, tokenizer, prompts, candidates, batch_size=batch_size, side=side,
                          fast=False)
    return [sc.nll for sc in scores]


@torch.no_grad()
def candidate_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[str],
    *,
    batch_size: int | None = None,
    side: Side | None = None,
    share_prefixes: bool = True,
) -> list[CandidateScore]:
    """Per-token NLL *and* argmax of each candidate after its prompt, teacher-forced.

    The same scores as :func:`candidate_nll` (same tokenization, same positions), plus the
    model's argmax at every candidate position (zsRE's token accuracy), computed with less work:

    * pairs whose token sequences are prefixes of one another share one row (e.g. a one-token
      candidate is read off the row of a longer candidate after the same prompt), and
    * the LM head and the log-softmax run only at the candidate positions (through
      ``logits_to_keep`` where the model accepts it).

    Args:
        batch_size: rows per forward pass (``None``: all in one pass).
        side: padding side (default: the tokenizer's).
        share_prefixes: share rows between prefix sequences (``False``: one row per pair).

    Returns:
        One :class:`CandidateScore` per pair, on the CPU.

    Example:
        >>> s = candidate_scores(model, tok, ["The capital of France is"], ["Paris"])[0]
        >>> s.nll.shape == s.correct.shape
        True
    """
    return _score_pairs(model, tokenizer, prompts, candidates, batch_size=batch_size, side=side,
                        fast=share_prefixes)


def candidate_probs(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    prompts: Sequence[str], candidates: Sequence[str], **kwargs: object,
                    ) -> Tensor:
    """``P = exp(-mean NLL)`` per pair, ``(n_pairs,)``: the papers' probability of a candidate."""
    nll = candidate_nll(model, tokenizer, prompts, candidates, **kwargs)  # type: ignore[arg-type]
    return torch.stack([torch.exp(-n.mean()) for n in nll]) if nll else torch.empty(0)


@torch.no_grad()
def learned_position_limit(model: nn.Module) -> int | None:
    """How many positions a model with *learned* absolute position embeddings can take (GPT-2's
    ``n_positions``, GPT-Neo's ``max_position_embeddings``); ``None`` for rotary and other
    relative schemes, which have no hard limit."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind == "gpt2":
        return int(config.n_positions)
    if kind == "gpt_neo":
        return int(config.max_position_embeddings)
    return None


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = False,
    return_prompt: bool = True,
) -> list[str]:
    """Greedy (``top_k=None``) or top-k sampled generation from a batch of prompts.

    The batch is left-padded and decoded incrementally with the KV cache. The attention mask
    passed at every step covers the *whole* sequence so far (a mask for only the new token is
    silently mis-padded by transformers 5.x). An empty prompt starts from the BOS/EOS token, as
    the ROME code does for its context templates.

    Args:
        top_k: sample among the ``k`` most likely tokens; ``None`` or ``1`` is greedy.
        generator: a seeded ``torch.Generator`` (on the model's device) for reproducible samples.
        stop_at_eos: stop a row at the EOS token (it is not included in the text).
        return_prompt: return prompt + continuation (the default) or the continuation alone.

    Raises:
        ValueError: an empty prompt without a BOS/EOS token, or prompts and ``max_new_tokens``
            that need more positions than learned position embeddings have
            (:func:`learned_position_limit`; an index error deep in the model otherwise).
    """
    device = model_device(model)
    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id,
                              getattr(model.config, "bos_token_id", None)) if t is not None), None)
    if start is None and any(not p for p in prompts):
        raise ValueError("an empty prompt needs a BOS or EOS token to start from")
    seqs = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p) if p else []
        seqs.append(ids or [int(start)])
    limit = learned_position_limit(model)
    longest = max((len(x) for x in seqs), default=0)
    if limit is not None and longest + max_new_tokens - 1 > limit:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs "
            f"{longest + max_new_tokens - 1} positions, but the model's learned position "
            f"embeddings have {limit}: shorten the prompt or lower max_new_tokens")
    batch = pad_sequences(seqs, _pad_id(tokenizer), "left", device)
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    B = ids.shape[0]
    new = torch.empty((B, 0), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    past = None
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        cache_kw = {} if past is None else forward_cache_kwargs(model, past)
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                    use_cache=True, **cache_kw)
        past = output_cache(out)
        logits = out.logits[:, -1].float()  # (B, V)
        if top_k is None or top_k <= 1:
            nxt = logits.argmax(-1)  # (B,)
        else:
            vals, idx = logits.topk(top_k, dim=-1)  # (B, k)
            choice = torch.multinomial(F.softmax(vals, -1), 1, generator=generator)  # (B, 1)
            nxt = idx.gather(-1, choice).squeeze(-1)  # (B,)
        if stop_at_eos and tokenizer.eos_token_id is not None:
            done = done | (nxt == tokenizer.eos_token_id)
            nxt = torch.where(done, torch.full_like(nxt, _pad_id(tokenizer)), nxt)
        new = torch.cat([new, nxt[:, None]], dim=1)  # (B, n)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # (B, T + n): the whole mask
        step_pos = (step_pos[:, -1:] + 1)  # (B, 1)
        step_ids = nxt[:, None]
        if stop_at_eos and bool(done.all()):
            break
    texts = []
    for i in range(B):
        cont_mask = mask[i, ids.shape[1]:].bool()
        cont = tokenizer.decode(new[i][cont_mask[: new.shape[1]]].tolist())
        texts.append((prompts[i] + cont) if return_prompt else cont)
    return texts


def target_nll(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
               targets: Sequence[str], *, side: Side = "right") -> Tensor:
    """Mean per-token NLL of each target after its prompt, teacher-forced, **differentiable**
    (the training loss of FT, MEND and KE). Same tokenization as :func:`candidate_nll`.

    Returns:
        ``(n,)`` float32, ``-1/|o| Σ_j log P(o_j | prompt, o_<j)`` per pair.
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need equally many prompts and targets, got {len(prompts)} and "
                         f"{len(targets)}")
    tf = teacher_forced_rows(tokenizer, *encode_pairs(tokenizer, prompts, targets), side=side,
                             device=model_device(model))
    logp = F.log_softmax(forward_logits(model, tf.batch).float(), dim=-1)  # (n, T, V)
    tok_logp = tf.token_logp(logp)  # (n, L)
    mask = tf.target_mask.float()  # (n, L)
    return -(tok_logp * mask).sum(1) / mask.sum(1)  # (n,)


@torch.no_grad()
def top_predictions(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    k: int = 5) -> list[list[tuple[str, float]]]:
    """The ``k`` most likely next tokens after each prompt, with their probabilities."""
    device = model_device(model)
    batch = make_batch(tokenizer, [encode_prompt(tokenizer, p) for p in prompts], "right", device)
    logits = forward_logits(model, batch).float()  # (B, T, V)
    last = logits[torch.arange(len(prompts), device=device), batch.lengths - 1]  # (B, V)
    probs, ids = F.softmax(last, -1).topk(k, dim=-1)  # (B, k)
    return [[(tokenizer.decode([int(i)]), float(p)) for i, p in zip(row_i, row_p)]
            for row_i, row_p in zip(ids, probs)]
