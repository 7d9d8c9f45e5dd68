"""The published statistics loop (ROME's ``layer_stats`` with ``runningstats.SecondMoment``),
re-implemented for the benchmarks from reading the published code (kmeng01/rome,
``rome/layer_stats.py``, ``rome/tok_dataset.py``, ``util/runningstats.py``, ``util/nethook.py``).

What it does, step by step, as the published code does:

1. texts are read in groups of 100 (``layer_stats``' ``DataLoader`` ``batch_size``) and each is
   tokenized with ``tokenizer.encode(text, truncation=True, max_length=maxlen)``, where
   ``maxlen`` is ``n_positions`` (or ``batch_tokens`` when that is smaller); every item carries
   ``input_ids``, ``position_ids`` and an all-ones ``attention_mask``;
2. each group is collated by length (``length_collation(batch_tokens)``, ``batch_tokens =
   3 x n_positions`` by default): sorted longest first, empty texts dropped, a new sub-batch
   started whenever (the sub-batch's first width) x (rows + 1) would exceed ``batch_tokens``,
   each sub-batch right-padded with zeros (ids, positions and mask alike);
3. every sub-batch runs through the model with all three tensors, under a trace of the module
   (``Trace(model, layer, retain_input=True, retain_output=False, stop=True)``): a forward hook
   keeps the module's input and raises once the module has run, which ends the pass;
4. the real tokens' inputs are gathered through the mask (``flatten_masked_batch``: a
   ``nonzero`` index), cast to the precision (``float32`` in ROME's and MEMIT's hyperparameters,
   ``float64`` when ``layer_stats`` is called without one) and added to the running sum with
   ``mom2 += aᵀ a`` (``runningstats.SecondMoment.add``), in that precision; ``C = mom2 / n``.

What differs: the published code samples 100,000 texts of Wikipedia (or WikiText-103) with a
fixed seed, tokenizes them in two ``DataLoader`` worker processes and runs on CUDA; here the
texts are the ones given, in their order, tokenized in the calling process (as the package
also does), on the model's device. Neither changes the arithmetic of a batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PUBLISHED_GROUP", "published_batches", "published_second_moment"]

PUBLISHED_GROUP = 100
"""``layer_stats``' ``DataLoader`` batch size: the texts that are sorted and collated together."""


class _Stopped(Exception):
    """How the trace ends the pass (raised from the forward hook, after the module ran)."""


def published_batches(ids: list[list[int]], batch_tokens: int) -> list[dict[str, Tensor]]:
    """One group's sub-batches by the published length collation (step 2 above): ``input_ids``,
    ``position_ids`` and ``attention_mask``, each ``(B, T)``, right-padded with zeros."""
    order = sorted(ids, key=len, reverse=True)  # a stable sort, longest first
    groups: list[list[list[int]]] = []
    rows: list[list[int]] = []
    width = 0
    for r in order:
        if not r:  # sorted: only empty texts follow
            break
        if width * (len(rows) + 1) > batch_tokens:
            groups.append(rows)
            rows, width = [], 0
        if not rows:
            width = len(r)
        rows.append(r)
    if rows:
        groups.append(rows)
    out = []
    for g in groups:
        T = len(g[0])
        input_ids = torch.zeros(len(g), T, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(g), T, dtype=torch.long)  # (B, T)
        positions = torch.zeros(len(g), T, dtype=torch.long)  # (B, T)
        for i, r in enumerate(g):
            input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
            positions[i, :len(r)] = torch.arange(len(r))
        out.append({"input_ids": input_ids, "position_ids": positions, "attention_mask": mask})
    return out


@torch.no_grad()
def published_second_moment(model: nn.Module, tokenizer: Any, texts: list[str],
                            module_name: str, *, precision: torch.dtype = torch.float32,
                            batch_tokens: int | None = None) -> dict[str, Any]:
    """``C = E[k kᵀ]`` of ``module_name``'s input over ``texts``, the published way.

    Returns:
        ``{"C": (d, d) in precision, "count": real tokens, "padded": padded tokens run}``.
    """
    device = next(model.parameters()).device
    npos = int(model.config.n_positions)
    maxlen = npos if batch_tokens is None or batch_tokens >= npos else batch_tokens
    token_size = 3 * npos if batch_tokens is None else batch_tokens
    module = model.get_submodule(module_name)
    mom2: Tensor | None = None
    count = padded = 0
    for g in range(0, len(texts), PUBLISHED_GROUP):
        ids = [tokenizer.encode(t, truncation=True, max_length=maxlen)
               for t in texts[g:g + PUBLISHED_GROUP]]
        for batch in published_batches(ids, token_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            kept: dict[str, Tensor] = {}

            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any,
                     kept: dict[str, Tensor] = kept) -> None:
                kept["input"] = inputs[0]
                raise _Stopped

            handle = module.register_forward_hook(hook)
            try:
                model(**batch)
            except _Stopped:
                pass
            finally:
                handle.remove()
            padded += batch["input_ids"].numel()
            x = kept["input"]  # (B, T, d)
            flat = x.reshape(-1, x.shape[-1])  # (B*T, d)
            a = flat[batch["attention_mask"].reshape(-1).nonzero()[:, 0]]  # (n, d)
            a = a.to(dtype=precision)  # (n, d)
            if a.shape[0] == 0:
                continue
            if mom2 is None:
                mom2 = a.new_zeros(a.shape[1], a.shape[1])  # (d, d)
            count += int(a.shape[0])
            mom2 += a.t().mm(a)  # (d, d)
    if mom2 is None:
        raise ValueError("the texts gave no tokens")
    return {"C": mom2 / count, "count": count, "padded": padded}
