"""Tokenized training batches for the hypernetwork editors (MEND, KE).

Each batch carries, for every case, the three inputs of the MEND/KE objective:

* the **edit** input ``x_e`` followed by the new target ``y_e`` (the fine-tuning gradient of its
  NLL is what the hypernetwork transforms);
* the **equivalence** inputs ``x_e'``, paraphrases of ``x_e``, followed by ``y_e`` (the edit loss
  ``L_e = -log p_θ̃(y_e | x_e')``);
* the **locality** inputs ``x_loc``, prompts the edit must not change (the locality loss, a KL
  between the pre- and post-edit next-token distributions), optionally followed by their gold
  answer.

Tokenization follows the scoring conventions of :mod:`lightning_rome.scoring`: a row is
``encode_prompt(prompt) + continuation_ids(target)`` (the leading-space rule), padded with
:func:`lightning_rome.scoring.make_batch`. Labels follow the Hugging Face convention (aligned with
``input_ids``, the model shifts them): the target's token ids on its tokens, ``-100`` elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_rome.records import CaseId, EditCase, RecordBatch
from lightning_rome.scoring import Side, encode_pairs, teacher_forced_rows

__all__ = [
    "IGNORE_INDEX",
    "EditTrainingBatch",
    "EditTrainingCollator",
    "LabeledBatch",
    "Locality",
    "labeled_batch",
]

IGNORE_INDEX = -100
Locality = Literal["own", "other"]


@dataclass
class LabeledBatch:
    """Padded prompt(+target) rows with labels over the target tokens only.

    Attributes:
        input_ids: ``(N, T)`` token ids, ``encode_prompt(prompt) + continuation_ids(target)``.
        attention_mask: ``(N, T)``, 1 on real tokens.
        position_ids: ``(N, T)``, counting real tokens only (correct with either padding side).
        labels: ``(N, T)``, the token id on target tokens and ``-100`` everywhere else (prompt,
            padding, and the whole row when it has no target). Pass to a Hugging Face causal LM
            as ``labels=`` (it shifts them), or select with :attr:`predict_mask`.
        predict_mask: ``(N, T)`` bool, the positions whose logits predict a target token (the
            position before each labelled token); for a row without target, its last prompt
            token. ``logits[predict_mask]`` lines up with ``labels[labels != -100]`` row by row
            for rows with targets. This is where a locality KL is taken.
        prompt_lengths: ``(N,)`` number of prompt tokens per row.
        target_lengths: ``(N,)`` number of target tokens per row (0 without target).
        case_index: ``(N,)`` index into the batch's cases of the case each row serves.
        prompts: the prompt text of each row (subject filled in).
        targets: the target string of each row, or ``None``.
        source_case_ids: the case each prompt was taken from (another case's id for locality
            rows drawn from other cases).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor
    predict_mask: Tensor
    prompt_lengths: Tensor
    target_lengths: Tensor
    case_index: Tensor
    prompts: list[str]
    targets: list[str | None]
    source_case_ids: list[CaseId | None]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class EditTrainingBatch:
    """One training batch for MEND/KE: ``B`` cases and their edit, equivalence and locality rows.

    Attributes:
        edit: ``B`` rows, one per case: the edit prompt followed by ``target_new``.
        equiv: the paraphrases of each case followed by ``target_new`` (a case without
            paraphrases contributes its edit prompt; ``equiv.case_index`` maps rows to cases).
        loc: the locality rows (``n_loc`` per case): prompts unrelated to the edit, followed by
            their gold answer when ``loc_answers`` is on and the answer is known.
        cases: the cases themselves (for KE's text encoder, logging, case ids).
    """

    edit: LabeledBatch
    equiv: LabeledBatch
    loc: LabeledBatch
    cases: RecordBatch[EditCase]

    def __len__(self) -> int:
        return len(self.cases)


class _Row(NamedTuple):
    prompt: str
    target: str | None
    case_index: int
    source: CaseId | None


def labeled_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str | None],
    *,
    case_index: Sequence[int] | None = None,
    source_case_ids: Sequence[CaseId | None] | None = None,
    side: Side = "right",
) -> LabeledBatch:
    """Tokenize, pad and label ``prompt + target`` rows (the scoring conventions).

    Row ``i`` is ``encode_prompt(prompts[i]) + continuation_ids(targets[i])``; a ``None`` target
    gives the prompt alone (no labels; :attr:`LabeledBatch.predict_mask` marks its last token).

    Args:
        tokenizer: the model's tokenizer.
        prompts: full prompt texts (subject filled in).
        targets: the target of each prompt, or ``None``.
        case_index: the case each row serves (default: ``0 .. N-1``).
        source_case_ids: the case each prompt came from (default: ``None`` each).
        side: padding side.

    Raises:
        ValueError: lengths differ, a prompt has no tokens, or a target is empty.

    Example (GPT-2's tokenizer):
        >>> lb = labeled_batch(tokenizer, ["Toko Yasuda, the"], ["piano"])
        >>> lb.input_ids.tolist(), lb.labels.tolist()
        ([[51, 16044, 25957, 15339, 11, 262, 19132]], [[-100, -100, -100, -100, -100, -100, 19132]])
    """
    n = len(prompts)
    case_index = list(range(n)) if case_index is None else list(case_index)
    source_case_ids = [None] * n if source_case_ids is None else list(source_case_ids)
    if not (len(targets) == len(case_index) == len(source_case_ids) == n):
        raise ValueError(f"{n} prompts but {len(targets)} targets, {len(case_index)} case "
                         f"indices and {len(source_case_ids)} source ids")
    p_ids, t_ids = encode_pairs(tokenizer, prompts, targets)
    for prompt, src, p in zip(prompts, source_case_ids, p_ids):
        if not p:
            raise ValueError(f"the prompt {prompt!r} (case {src!r}) has no tokens")
    tf = teacher_forced_rows(tokenizer, p_ids, t_ids, side=side, full_target=True)
    return LabeledBatch(
        input_ids=tf.batch.input_ids,
        attention_mask=tf.batch.attention_mask,
        position_ids=tf.batch.position_ids,
        labels=tf.labels(IGNORE_INDEX),
        predict_mask=tf.predict_mask(),
        prompt_lengths=tf.prompt_lengths,
        target_lengths=tf.target_lengths,
        case_index=torch.tensor(case_index, dtype=torch.long),
        prompts=list(prompts),
        targets=list(targets),
        source_case_ids=source_case_ids,
    )


def _locality_pairs(case: EditCase) -> list[tuple[str, str | None]]:
    """The case's own locality prompts with their answers, or, when it has none, its edit
    prompt with its true answer (a fact unrelated to any *other* case's edit)."""
    if case.neighborhood_prompts:
        return list(zip(case.neighborhood_prompts, case.neighborhood_answers))
    return [(case.request.text, case.request.target_true)]


class EditTrainingCollator:
    """``collate_fn`` that turns a list of :class:`EditCase` into an :class:`EditTrainingBatch`.

    Args:
        tokenizer: the edited model's tokenizer, or a path/name for
            :func:`lightning_rome.models.load_tokenizer`.
        locality: ``"own"`` uses each case's neighborhood prompts (COUNTERFACT's neighborhood,
            zsRE's NQ question) and draws from another case when a case has none; ``"other"``
            always draws from other cases (their neighborhood prompts, else their edit prompt with
            its true answer).
        n_loc: locality rows per case (sampled without replacement where possible).
        n_equiv: at most this many paraphrases per case (sampled); ``None`` keeps all.
        loc_answers: append the gold answer to locality prompts when known (labels then cover
            it); off, a locality row is its prompt alone.
        pool: the cases "other cases" are drawn from (the DataModule passes its split); without a
            pool they come from the rest of the batch.
        side: padding side (default ``"right"``).
        seed: seed a private generator for the sampling; ``None`` uses torch's global RNG (seeded
            by ``seed_everything`` and distinct in each DataLoader worker).

    Example (GPT-2's tokenizer, the first two cases of ``counterfact-val.json``):
        >>> collate = EditTrainingCollator(tokenizer, pool=cases)
        >>> batch = collate(cases[:2])
        >>> batch.edit.input_ids.shape
        torch.Size([2, 9])
        >>> tokenizer.decode(batch.edit.labels[0][batch.edit.labels[0] != -100])
        ' Sega'
        >>> batch.loc.prompts
        ['BBC Radio, by', "George Washington's profession is a"]
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str],
        *,
        locality: Locality = "own",
        n_loc: int = 1,
        n_equiv: int | None = None,
        loc_answers: bool = True,
        pool: Sequence[EditCase] | None = None,
        side: Side = "right",
        seed: int | None = None,
    ) -> None:
        if isinstance(tokenizer, str | os.PathLike):
            from lightning_rome.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        if locality not in ("own", "other"):
            raise ValueError(f"locality must be 'own' or 'other', got {locality!r}")
        if n_loc < 1:
            raise ValueError(f"n_loc must be at least 1, got {n_loc}")
        if n_equiv is not None and n_equiv < 1:
            raise ValueError(f"n_equiv must be at least 1 or None, got {n_equiv}")
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        self.tokenizer = tokenizer
        self.locality = locality
        self.n_loc = n_loc
        self.n_equiv = n_equiv
        self.loc_answers = loc_answers
        self.pool = list(pool) if pool is not None else None
        self.side = side
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self._generator))

    def _sample(self, items: Sequence[object], k: int) -> list[int]:
        """``k`` indices into ``items``: without replacement while possible."""
        out: list[int] = []
        while len(out) < k:
            perm = torch.randperm(len(items), generator=self._generator).tolist()
            out.extend(perm[: k - len(out)])
        return out

    def _other_case(self, case_id: CaseId | None, batch: Sequence[EditCase]) -> EditCase:
        pool = self.pool if self.pool is not None else batch
        others = [c for c in pool if c.case_id != case_id] if len(pool) <= 64 else None
        if others is not None:
            if not others:
                raise ValueError(
                    f"locality needs a case other than {case_id!r} to draw from, but the "
                    f"{'pool' if self.pool is not None else 'batch'} holds no other case; pass "
                    "pool=... or use a batch size above 1")
            return others[self._randint(len(others))]
        while True:  # a large pool: rejection sampling
            c = pool[self._randint(len(pool))]
            if c.case_id != case_id:
                return c

    def _rows(self, cases: Sequence[EditCase]) -> tuple[list[_Row], list[_Row], list[_Row]]:
        edit, equiv, loc = [], [], []
        for i, case in enumerate(cases):
            r = case.request
            edit.append(_Row(r.text, r.target_new, i, case.case_id))
            paras = list(case.paraphrase_prompts) or [r.text]
            if self.n_equiv is not None and len(paras) > self.n_equiv:
                paras = [paras[j] for j in sorted(self._sample(paras, self.n_equiv))]
            equiv.extend(_Row(p, r.target_new, i, case.case_id) for p in paras)
            if self.locality == "own" and case.neighborhood_prompts:
                src, pairs = case, _locality_pairs(case)
                picks = [(src, pairs[j]) for j in self._sample(pairs, self.n_loc)]
            else:
                picks = []
                for _ in range(self.n_loc):
                    src = self._other_case(case.case_id, cases)
                    pairs = _locality_pairs(src)
                    picks.append((src, pairs[self._randint(len(pairs))]))
            for src, (prompt, answer) in picks:
                loc.append(_Row(prompt, answer if self.loc_answers else None, i, src.case_id))
        return edit, equiv, loc

    def __call__(self, cases: Sequence[EditCase] | RecordBatch[EditCase]) -> EditTrainingBatch:
        cases = list(cases)
        if not cases:
            raise ValueError("cannot collate an empty list of cases")
        for c in cases:
            if not isinstance(c, EditCase):
                raise TypeError(f"EditTrainingCollator needs EditCase records, got "
                                f"{type(c).__name__}")
        edit, equiv, loc = self._rows(cases)
        return EditTrainingBatch(edit=self._tokenize(edit), equiv=self._tokenize(equiv),
                                 loc=self._tokenize(loc), cases=RecordBatch(cases))

    def _tokenize(self, rows: Sequence[_Row]) -> LabeledBatch:
        return labeled_batch(self.tokenizer, [r.prompt for r in rows], [r.target for r in rows],
                             case_index=[r.case_index for r in rows],
                             source_case_ids=[r.source for r in rows], side=self.side)
