"""zsRE token-level accuracy: efficacy, paraphrase and specificity.

Definition (ROME Table 3 / MEMIT Table 1, after Mitchell et al.'s MEND evaluation; the released
``compute_rewrite_quality_zsre``): feed the question followed by the answer's tokens (teacher
forcing) and, at each answer position ``j``, compare the model's argmax with the answer token
``a_j``. A case's accuracy is the mean of ``[argmax_j == a_j]`` over its answer tokens; the metric
is the mean over cases (a fraction; tables multiply by 100).

- **Efficacy**: the new answer after the edited question.
- **Paraphrase**: the new answer after the rephrased question.
- **Specificity**: an unrelated Natural Questions prompt against its gold answer.

Inputs are the predicted and target token ids (or logits, reduced with argmax), or directly a
correctness mask. A case may pool several prompts by concatenating their answer positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["zsre_accuracy"]

TokenIds = Tensor | Sequence[Tensor | Sequence[int]]
Correct = Tensor | Sequence[Tensor | Sequence[bool]]


def _as_rows(x: TokenIds | Correct, name: str) -> list[Tensor]:
    """One 1-D (or, for logits, 2-D) tensor per case."""
    if isinstance(x, Tensor):
        if x.ndim == 0:
            raise ValueError(f"{name} must have a case dimension, got a scalar tensor")
        rows = list(x.unbind(0))
    elif isinstance(x, Sequence) and not isinstance(x, str | bytes):
        rows = [r if isinstance(r, Tensor) else torch.as_tensor(r) for r in x]
    else:
        raise TypeError(
            f"{name} must be a tensor or a sequence of per-case tensors, got {type(x).__name__}"
        )
    if not rows:
        raise ValueError(f"{name} holds no cases; pass at least one")
    return rows


def _zsre_accuracy_update(
    preds: TokenIds | None = None,
    target: TokenIds | None = None,
    correct: Correct | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Per-case token accuracy ``(N,)`` float64.

    Either ``preds`` and ``target``, or ``correct``:

    - ``preds``: predicted token ids ``(N, T)``, or logits ``(N, T, V)`` (argmax is taken), or a
      list of per-case ``(T_i,)`` ids / ``(T_i, V)`` logits;
    - ``target``: answer token ids ``(N, T)`` or a list of ``(T_i,)``; positions equal to
      ``ignore_index`` (padding) are skipped;
    - ``correct``: a bool mask ``(N, T)`` or a list of per-case ``(T_i,)`` masks.

    Raises:
        ValueError: both or neither input form, mismatched shapes, a case without answer tokens,
            NaN logits or negative token ids.
    """
    if correct is not None:
        if preds is not None or target is not None:
            raise ValueError("pass either preds and target, or correct, not both")
        rows = _as_rows(correct, "correct")
        out = []
        for i, r in enumerate(rows):
            r = r.reshape(-1)
            if r.numel() == 0:
                raise ValueError(f"correct[{i}] (case {i}) has no answer tokens")
            if r.dtype != torch.bool and (r.is_floating_point() or not ((r == 0) | (r == 1)).all()):
                raise ValueError(f"correct[{i}] must be a bool (or 0/1) mask, got dtype {r.dtype}")
            out.append(r.to(torch.float64).mean().cpu())
        return torch.stack(out)  # (N,)
    if preds is None or target is None:
        raise ValueError("zsRE accuracy needs preds and target (token ids), or correct (a mask)")
    p_rows, t_rows = _as_rows(preds, "preds"), _as_rows(target, "target")
    if len(p_rows) != len(t_rows):
        raise ValueError(
            f"preds and target must cover the same cases, got {len(p_rows)} and {len(t_rows)}"
        )
    out = []
    for i, (p, t) in enumerate(zip(p_rows, t_rows)):
        if t.is_floating_point() or t.ndim != 1:
            raise ValueError(
                f"target[{i}] must be 1-D integer token ids, got {t.dtype} {tuple(t.shape)}"
            )
        if p.is_floating_point():
            if p.ndim != 2:
                raise ValueError(f"preds[{i}] as logits must be (T, V), got shape {tuple(p.shape)}")
            if torch.isnan(p).any():
                raise ValueError(f"preds[{i}] (case {i}) contains NaN logits")
            p = p.argmax(dim=-1)  # (T,)
        if p.shape != t.shape:
            raise ValueError(
                f"preds[{i}] and target[{i}] (case {i}) differ in length: "
                f"{tuple(p.shape)} vs {tuple(t.shape)}"
            )
        valid = t != ignore_index  # (T,)
        if not valid.any():
            raise ValueError(f"target[{i}] (case {i}) has no answer tokens (all ignore_index)")
        if (t[valid] < 0).any():
            raise ValueError(
                f"target[{i}] (case {i}) has negative token ids other than ignore_index"
            )
        hits = (p.to(t.device) == t) & valid  # (T,)
        out.append((hits.sum().double() / valid.sum().double()).cpu())
    return torch.stack(out)  # (N,)


def zsre_accuracy(
    preds: TokenIds | None = None,
    target: TokenIds | None = None,
    correct: Correct | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """zsRE token-level accuracy: per case the fraction of answer tokens predicted, then the mean.

    Args:
        preds: predicted token ids ``(N, T)``, logits ``(N, T, V)``, or per-case lists.
        target: answer token ids ``(N, T)`` (``ignore_index`` marks padding) or per-case lists.
        correct: instead of ``preds``/``target``, a bool mask ``(N, T)`` or per-case lists.
        ignore_index: the padding value in ``target``.

    Returns:
        The accuracy as a fraction in ``[0, 1]``.

    Example:
        >>> import torch
        >>> preds = torch.tensor([[5, 7, 9], [3, 4, 0]])
        >>> target = torch.tensor([[5, 7, 8], [3, -100, -100]])
        >>> zsre_accuracy(preds, target)  # (2/3 + 1/1) / 2
        tensor(0.8333)
        >>> zsre_accuracy(correct=[[True, False], [True]])
        tensor(0.7500)
    """
    per_case = _zsre_accuracy_update(preds, target, correct, ignore_index)  # (N,)
    return per_case.mean().to(torch.get_default_dtype())
