"""Collecting second moments over a text corpus, with caching, checkpoints and resume.

The main entry point is :func:`get_second_moment` (one module) or :func:`get_second_moments`
(several modules in one pass). ROME and MEMIT call::

    C = get_second_moment(model, tok, layer, corpus="wikitext", n_samples=100_000).mom2

where ``layer`` is a block index (the module is ``layout.name("mlp_out", layer)``, e.g.
``transformer.h.17.mlp.c_proj``) or a module name.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.hooks import ModuleRecord, module_hooks
from lightning_rome.models import canonical_weight, get_layout
from lightning_rome.models.modes import eval_mode
from lightning_rome.stats.cache import (
    load_second_moments,
    partial_path,
    save_second_moments,
    stats_key,
    stats_path,
    stats_root,
)
from lightning_rome.stats.moments import SecondMoment
from lightning_rome.utils.io import CorruptFileError
from lightning_rome.utils.progress import progress_bar

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_PASS_COST",
    "DEFAULT_SORT_WINDOW",
    "accumulate_batch",
    "batch_rows",
    "collect_second_moments",
    "default_seq_len",
    "get_second_moment",
    "get_second_moments",
    "iter_token_rows",
    "key_dim",
    "pass_cost",
    "resolve_modules",
    "sorted_batches",
]

Row = tuple[int, list[int]]
"""``(text index in the corpus stream, token ids)``."""

#: Padded tokens (rows x longest row) per forward pass by default.
DEFAULT_BATCH_TOKENS = 4096
#: Texts read before sorting them by length into batches (checkpoints fall between windows).
DEFAULT_SORT_WINDOW = 1024
_FORWARD_DTYPES = (torch.float16, torch.bfloat16)
#: What one more forward pass is taken to cost, as a fraction of the token budget, which the
#: batching trades against padding: on an accelerator (and when the model is not known) 1/32,
#: for the fixed launch cost of a pass (a 4,096-token budget pads ~7% on 200 WikiText texts,
#: ~2% on 1,024, against 24% and 5% when filling each batch to the budget).
DEFAULT_PASS_COST = 1 / 32
#: On a CPU a pass costs its Python overhead, about 1 ms, i.e. ~5e7 FLOPs at one core's ~50
#: GFLOP/s, against 2 FLOPs per (non-embedding) parameter for each token; the fraction is held
#: to [1/512, 1/32]. GPT-2 small (~1.6 ms a token on one core) gets 1/512, 8 tokens at 4,096,
#: and pads ~1% on 200 WikiText texts, 0.4% on 1,024; a tiny test model gets 1/32.
_CPU_PASS_FLOP = 5e7
_CPU_PASS_RANGE = (1 / 512, 1 / 32)


def pass_cost(model: nn.Module, batch_tokens: int | None) -> float:
    """The cost of one more forward pass of ``model`` on its device, as a fraction of
    ``batch_tokens`` (see :data:`DEFAULT_PASS_COST`); it depends on the device and the model's
    size only, so the batches of a run are the same every time."""
    if batch_tokens is None or _device(model).type != "cpu":
        return DEFAULT_PASS_COST
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                for p in m.parameters(recurse=False)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in embedded)
    if n == 0:
        return DEFAULT_PASS_COST
    lo, hi = _CPU_PASS_RANGE
    return min(max(_CPU_PASS_FLOP / (2 * n) / batch_tokens, lo), hi)


# --------------------------------------------------------------------------------------------
# Modules, corpus and tokens
# --------------------------------------------------------------------------------------------


def resolve_modules(model: nn.Module, layers: Sequence[int | str] | int | str, *,
                    part: str = "mlp_out", layout: Any = None) -> list[str]:
    """Module names for block indices (through the model's layout) or names.

    Raises:
        IndexError: a layer index is out of range.
        ValueError: a module name is not in the model.
    """
    if isinstance(layers, int | str):
        layers = [layers]
    names: list[str] = []
    for item in layers:
        if isinstance(item, bool):
            raise TypeError(f"a layer must be an int index or a module name, got {item!r}")
        if isinstance(item, int):
            lay = get_layout(model, layout)
            lay.check_layer(model, item)
            names.append(lay.name(part, item))
        elif isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError as err:
                raise ValueError(f"module {item!r} is not in the model ({type(model).__name__})"
                                 ) from err
            names.append(item)
        else:
            raise TypeError(f"a layer must be an int index or a module name, got {item!r}")
    if not names:
        raise ValueError("no layers or modules given")
    return list(dict.fromkeys(names))


def key_dim(model: nn.Module, module_name: str) -> int:
    """The dimension of the module's input (``in`` of its ``[out, in]`` weight)."""
    module = model.get_submodule(module_name)
    try:
        return int(canonical_weight(module).shape[1])
    except TypeError:
        for attr in ("in_features", "nx"):
            if isinstance(getattr(module, attr, None), int):
                return int(getattr(module, attr))
    raise TypeError(f"cannot tell the input dimension of {module_name!r} "
                    f"({type(module).__name__}); it should be a linear layer")


def default_seq_len(model: nn.Module) -> int:
    """The model's context length (``n_positions``/``max_position_embeddings``), at most 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, 2048)
    return 1024


def iter_token_rows(corpus: Iterable[str], tokenizer: PreTrainedTokenizerBase, *, seq_len: int,
                    n_samples: int | None = None, n_tokens: int | None = None, rank: int = 0,
                    world_size: int = 1, skip_texts: int = 0, tokens_before: int = 0,
                    ) -> Iterator[Row]:
    """Tokenize the corpus in order: ``(text index, ids)`` for this rank's texts.

    Each text is truncated to ``seq_len`` tokens (no special tokens are added). The first
    ``n_samples`` texts are read; with ``n_tokens`` the stream stops once that many tokens are
    taken, cutting the last text short (its earlier tokens see the same causal context, so the
    statistics are exact). Budgets are global: rank ``r`` of ``world_size`` gets texts ``i``
    with ``i % world_size == r`` of the same truncated stream, so the ranks together read
    exactly what one process reads. Texts before ``skip_texts`` are skipped (``tokens_before``
    is how many tokens they held, for the token budget).
    """
    if skip_texts and world_size != 1:
        raise ValueError("skip_texts (resuming) is only supported in a single process")
    budget = None if n_tokens is None else n_tokens - tokens_before
    for i, text in enumerate(corpus):
        if (n_samples is not None and i >= n_samples) or (budget is not None and budget <= 0):
            return
        if i < skip_texts:
            continue
        mine = i % world_size == rank
        if not mine and budget is None:  # with a token budget every rank counts every text
            continue
        ids = list(tokenizer(text, add_special_tokens=False, truncation=True,
                             max_length=seq_len)["input_ids"])
        if budget is not None:
            ids = ids[:budget]
            budget -= len(ids)
        if mine:
            yield i, ids


def _cuts(lengths: Sequence[int], budget: int | None, max_rows: int | None,
          pass_cost: float) -> list[tuple[int, int]]:
    """Split lengths sorted longest first into batches ``[i, j)`` (padded to ``lengths[i]``)
    of at most ``budget`` padded tokens and ``max_rows`` rows that minimise the padded tokens
    plus ``pass_cost x budget`` per batch (dynamic programming; a batch that holds one
    over-long row is always allowed)."""
    n = len(lengths)
    if budget is None:  # rows only: consecutive groups of max_rows
        step = max_rows or max(n, 1)
        return [(i, min(i + step, n)) for i in range(0, n, step)]
    L = np.asarray(lengths, dtype=np.float64)  # (n,)
    cost = np.zeros(n + 1)  # cost[j]: the best cost of the first j rows
    start = np.zeros(n + 1, dtype=np.int64)
    per_batch, lo = pass_cost * budget, 0
    for j in range(1, n + 1):
        # the first rows i that may start the batch ending before j form a range [lo, j)
        while j - lo > 1 and (L[lo] * (j - lo) > budget
                              or (max_rows is not None and j - lo > max_rows)):
            lo += 1
        i = np.arange(lo, j)
        c = cost[lo:j] + L[lo:j] * (j - i) + per_batch  # (j - lo,)
        k = int(np.argmin(c))  # the first minimum: deterministic
        cost[j], start[j] = c[k], lo + k
    cuts, j = [], n
    while j > 0:
        cuts.append((int(start[j]), j))
        j = int(start[j])
    return cuts[::-1]


def sorted_batches(rows: Sequence[Row], *, batch_size: int | None = None,
                   batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
                   cost: float = DEFAULT_PASS_COST) -> list[list[Row]]:
    """Cut rows into batches by length: longest first (ties in corpus order), each batch at
    most ``batch_size`` rows and ``batch_tokens`` padded tokens (rows x its longest row, which
    comes first), chosen to pad little without making many small batches (one more pass is
    taken to cost ``cost x batch_tokens`` padded tokens: see :func:`pass_cost`); a row longer
    than the budget goes alone. Rows without tokens go into the last batch (they add nothing
    but are counted)."""
    if not cost >= 0:
        raise ValueError(f"cost must be a non-negative fraction of the budget, got {cost!r}")
    order = sorted(rows, key=lambda r: (-len(r[1]), r[0]))
    real = [r for r in order if r[1]]
    cuts = _cuts([len(r[1]) for r in real], batch_tokens, batch_size, cost)
    batches = [real[i:j] for i, j in cuts]
    empty = order[len(real):]
    if empty:
        if batches:
            batches[-1].extend(empty)
        else:
            batches.append(empty)
    return batches


def _windows(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    """Consecutive groups of ``size`` rows (the last may be shorter)."""
    window: list[Row] = []
    for row in rows:
        window.append(row)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def batch_rows(rows: Iterable[Row], *, batch_size: int | None = None,
               batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
               window: int = DEFAULT_SORT_WINDOW, cost: float = DEFAULT_PASS_COST,
               ) -> Iterator[list[Row]]:
    """Read rows in windows of ``window`` rows and cut each into :func:`sorted_batches` (with
    the pass ``cost``).

    Every row, also an empty one, is in exactly one batch, so ``len(batch)`` counts texts.
    """
    if window < 1:
        raise ValueError(f"window must be a positive number of texts, got {window}")
    for chunk in _windows(rows, window):
        yield from sorted_batches(chunk, batch_size=batch_size, batch_tokens=batch_tokens,
                                  cost=cost)


def _pad(rows: Sequence[list[int]], pad_id: int, device: torch.device,
         ) -> tuple[Tensor, Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------


def _check_forward_dtype(forward_dtype: torch.dtype | None) -> None:
    if forward_dtype is not None and forward_dtype not in _FORWARD_DTYPES:
        raise ValueError(f"forward_dtype must be torch.float16, torch.bfloat16 or None (the "
                         f"model's own dtype), not {forward_dtype!r}")


def _autocast(model: nn.Module, forward_dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``forward_dtype`` on the model's device (a no-op for ``None``)."""
    if forward_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=_device(model).type, dtype=forward_dtype)


@torch.no_grad()
def accumulate_batch(model: nn.Module, records: dict[str, ModuleRecord],
                     moments: dict[str, SecondMoment], input_ids: Tensor, attention_mask: Tensor,
                     *, forward_dtype: torch.dtype | None = None) -> int:
    """Run one right-padded batch and add each hooked module's input to its moments.

    ``records`` comes from an enclosing :func:`_hooks` (``module_hooks(model, names,
    retain_input=True, stop=...)``); padding positions are left out. With ``forward_dtype``
    the pass runs under ``torch.autocast`` to that dtype (the sums keep their own dtype).

    Returns:
        The number of real tokens added (per module).
    """
    _check_forward_dtype(forward_dtype)
    for rec in records.values():
        rec.input = None
    with _autocast(model, forward_dtype):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    added = 0
    for name, m in moments.items():
        k = records[name].input  # (B, T, d)
        if k is None:
            raise RuntimeError(f"module {name!r} was not called in the forward pass")
        added = m.update(k, attention_mask)
    return added


def _hooks(model: nn.Module, names: Sequence[str], stop_early: bool) -> Any:
    """``module_hooks`` recording the inputs; with ``stop_early`` each pass ends once every
    module has its input (the modules themselves, the layers above and the LM head do not
    run)."""
    return module_hooks(model, names, retain_input=True, stop=stop_early)


def _progress(total: int | None, enabled: bool | None, desc: str) -> Any:
    return progress_bar(total, desc, enabled=enabled, unit="text")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def collect_second_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[str],
    corpus: Iterable[str],
    *,
    n_samples: int | None = None,
    n_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    dtype: torch.dtype = torch.float64,
    forward_dtype: torch.dtype | None = None,
    sort_window: int = DEFAULT_SORT_WINDOW,
    rank: int = 0,
    world_size: int = 1,
    start: dict[str, SecondMoment] | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[dict[str, SecondMoment]], None] | None = None,
    stop_early: bool = True,
    progress: bool | None = None,
) -> dict[str, SecondMoment]:
    """Accumulate ``Σ k kᵀ`` of each module's input over a corpus (no caching; see
    :func:`get_second_moments`).

    Args:
        model: the language model (any dtype; the sums are kept in ``dtype``).
        tokenizer: its tokenizer.
        modules: module names (see :func:`resolve_modules`).
        corpus: the texts (a :class:`~lightning_rome.corpora.TextCorpus` or any iterable).
        n_samples: read at most this many texts.
        n_tokens: take at most this many tokens (the last text is cut).
        seq_len: truncate texts to this many tokens (default: the model's context).
        batch_size: at most this many texts per forward pass (``None``: no limit).
        batch_tokens: at most this many padded tokens (rows x longest row) per forward pass
            (``None``: no limit); a text longer than that goes alone.
        dtype: the accumulation dtype (float64 by default, or float32).
        forward_dtype: run the forward pass under ``torch.autocast`` to ``torch.float16`` or
            ``torch.bfloat16`` (for a float32 model on a GPU); the keys are still summed in
            ``dtype``. ``None``: the model's own dtype.
        sort_window: texts are read in windows of this many (at most ``checkpoint_every``),
            sorted by length and cut into batches by ``batch_tokens``, so that batches are
            padded little; the sums do not depend on it, nor on the batch sizes, beyond
            rounding.
        rank: this process's rank; it reads texts ``i`` with ``i % world_size == rank``.
        world_size: the number of processes.
        start: sums to continue from (a checkpoint): its ``n_texts`` texts are skipped.
        checkpoint_every: call ``on_checkpoint`` after every this many texts.
        on_checkpoint: receives the current sums (do not modify them).
        stop_early: cut each forward pass after the last hooked module.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        ``{module name: SecondMoment}`` on the CPU; ``meta`` holds the collection settings,
        ``tokens_per_sec`` and ``padded_tokens`` (the rows x widths of this run's batches).
    """
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"accumulate in torch.float64 or torch.float32, not {dtype}")
    _check_forward_dtype(forward_dtype)
    for name, value in (("n_samples", n_samples), ("n_tokens", n_tokens),
                        ("checkpoint_every", checkpoint_every), ("batch_size", batch_size),
                        ("batch_tokens", batch_tokens), ("sort_window", sort_window)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    seq_len = int(seq_len or default_seq_len(model))
    modules = list(dict.fromkeys(modules))
    device = _device(model)
    if start is not None:
        moments = {n: start[n].to(dtype=dtype, device=device) for n in modules}
        done = {m.n_texts for m in moments.values()}
        counts = {m.count for m in moments.values()}
        if len(done) != 1 or len(counts) != 1:
            raise ValueError("checkpointed statistics of one pass must share n_texts and count")
        skip, tokens_before = done.pop(), counts.pop()
    else:
        moments = {n: SecondMoment.zeros(key_dim(model, n), dtype, device, module=n)
                   for n in modules}
        skip, tokens_before = 0, 0
    rows = iter_token_rows(corpus, tokenizer, seq_len=seq_len, n_samples=n_samples,
                           n_tokens=n_tokens, rank=rank, world_size=world_size, skip_texts=skip,
                           tokens_before=tokens_before)
    pad_id = _pad_id(tokenizer)
    bar = _progress(n_samples, progress, "second moments")
    if bar is not None and skip:
        bar.update(skip)
    window = min(sort_window, checkpoint_every) if checkpoint_every else sort_window
    cost = pass_cost(model, batch_tokens)
    n_texts, last_ckpt, tokens, padded, t0 = skip, skip, 0, 0, time.perf_counter()
    try:
        with eval_mode(model), _hooks(model, modules, stop_early) as records:
            for chunk in _windows(rows, window):
                for batch in sorted_batches(chunk, batch_size=batch_size,
                                            batch_tokens=batch_tokens, cost=cost):
                    real = [ids for _, ids in batch if ids]
                    if real:
                        input_ids, mask = _pad(real, pad_id, device)  # (B, T), (B, T)
                        padded += input_ids.numel()
                        tokens += accumulate_batch(model, records, moments, input_ids, mask,
                                                   forward_dtype=forward_dtype)
                    if bar is not None:
                        bar.update(len(batch))
                # a window is done as a whole: only now is every text before it counted
                n_texts = chunk[-1][0] + 1 if world_size == 1 else n_texts + len(chunk)
                for m in moments.values():
                    m.n_texts = n_texts
                if (on_checkpoint is not None and checkpoint_every
                        and n_texts - last_ckpt >= checkpoint_every):
                    on_checkpoint(moments)
                    last_ckpt = n_texts
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    out = {}
    for name, m in moments.items():
        m = m.to(device="cpu") if m.mom2_sum.device.type != "cpu" else m
        m.meta.update(module=name, seq_len=seq_len, dtype=str(dtype).removeprefix("torch."),
                      tokens_per_sec=tokens / elapsed if elapsed > 0 else 0.0,
                      n_samples=n_samples, n_tokens=n_tokens, padded_tokens=padded)
        if forward_dtype is not None:
            m.meta["forward_dtype"] = str(forward_dtype).removeprefix("torch.")
        out[name] = m
    return out


# --------------------------------------------------------------------------------------------
# Cached entry points
# --------------------------------------------------------------------------------------------

def _key(model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str, *,
         forward_dtype: torch.dtype | None, **kw: Any) -> dict[str, Any]:
    """The cache key; an autocast forward pass gives other numbers, so it is added then."""
    key = stats_key(model, tokenizer, name, **kw)
    if forward_dtype is not None:
        key["forward_dtype"] = str(forward_dtype).removeprefix("torch.")
    return key


_MEMO: dict[tuple[str, int, int], SecondMoment] = {}
#: The most bytes of statistics that loaded files keep in memory (least recently used first out).
MEMORY_CACHE_BYTES = 4 << 30


def _nbytes(m: SecondMoment) -> int:
    return m.mom2_sum.nbytes + (0 if m.k_sum is None else m.k_sum.nbytes)


def _memo_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


def _check_dims(path: Path, moments: Sequence[SecondMoment], dims: Sequence[int]) -> None:
    """Raise :class:`CorruptFileError` unless each matrix is ``(d, d)`` for its module's ``d``
    (a self-consistent file of the wrong size would otherwise be used)."""
    for m, d in zip(moments, dims):
        if tuple(m.mom2_sum.shape) != (d, d):
            raise CorruptFileError(f"{path}: statistics of shape {tuple(m.mom2_sum.shape)}, but "
                                   f"the module's input has dimension {d}")


def _load_one(path: Path, key: dict[str, Any], memory_cache: bool, dim: int,
              ) -> SecondMoment | None:
    """The cached statistics for ``key``, or ``None`` when absent or invalid (with a warning)."""
    if not path.is_file():
        return None
    try:
        mk = _memo_key(path)
        if memory_cache and mk in _MEMO:
            _MEMO[mk] = _MEMO.pop(mk)  # most recently used last
            return _MEMO[mk]
        (moment,) = load_second_moments(path, [key], complete=True)
        _check_dims(path, [moment], [dim])
    except (CorruptFileError, ValueError, FileNotFoundError) as err:
        warnings.warn(f"ignoring the invalid statistics file {path} ({err}); recomputing it",
                      stacklevel=3)
        return None
    if memory_cache and _nbytes(moment) <= MEMORY_CACHE_BYTES:
        while _MEMO and sum(map(_nbytes, _MEMO.values())) + _nbytes(moment) > MEMORY_CACHE_BYTES:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[mk] = moment
    return moment


def get_second_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int | str] | int | str,
    *,
    corpus: Any = "wikitext",
    n_samples: int | None = 100_000,
    n_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    dtype: torch.dtype = torch.float64,
    forward_dtype: torch.dtype | None = None,
    part: str = "mlp_out",
    layout: Any = None,
    cache: bool | str | os.PathLike[str] = True,
    recompute: bool = False,
    checkpoint_every: int | None = 1000,
    memory_cache: bool = True,
    stop_early: bool = True,
    progress: bool | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, SecondMoment]:
    """Second moments ``C = E[k kᵀ]`` of several modules' inputs, from one pass over a corpus.

    Cached statistics are loaded (and validated); the missing ones are computed together in one
    pass, checkpointed every ``checkpoint_every`` texts (a rerun after an interruption resumes
    from the last checkpoint and gives the same sums), and saved atomically. See
    :func:`get_second_moment` for the arguments.

    Returns:
        ``{module name: SecondMoment}`` in the order of ``layers``, on the CPU.
    """
    from lightning_rome.corpora import as_corpus

    names = resolve_modules(model, layers, part=part, layout=layout)
    source = as_corpus(corpus, data_dir=data_dir)
    seq_len = int(seq_len or default_seq_len(model))
    results: dict[str, SecondMoment] = {}
    root = paths = keys = None
    if cache is not False:
        corpus_id = source.identity
        if corpus_id is None:
            warnings.warn(f"the {source.description} has no identity (a one-shot iterable): its "
                          "statistics are not cached; wrap the texts in a list or give "
                          "IterableTextCorpus a name", stacklevel=2)
        else:
            root = stats_root(cache)
            keys = {n: _key(model, tokenizer, n, corpus_id=corpus_id, n_samples=n_samples,
                            n_tokens=n_tokens, seq_len=seq_len, dtype=dtype,
                            forward_dtype=forward_dtype) for n in names}
            paths = {n: stats_path(root, keys[n]) for n in names}
            if not recompute:
                for n in names:
                    found = _load_one(paths[n], keys[n], memory_cache, key_dim(model, n))
                    if found is not None:
                        results[n] = found
    missing = [n for n in names if n not in results]
    if missing:
        start = on_checkpoint = ckpt = None
        if root is not None and keys is not None:
            ckpt_keys = [keys[n] for n in missing]
            ckpt = partial_path(root, ckpt_keys)
            if not recompute and ckpt.is_file():
                try:
                    loaded = load_second_moments(ckpt, ckpt_keys, complete=False)
                    _check_dims(ckpt, loaded, [key_dim(model, n) for n in missing])
                    start = dict(zip(missing, loaded))
                except CorruptFileError as err:
                    warnings.warn(f"ignoring the invalid checkpoint {ckpt} ({err}); starting "
                                  "over", stacklevel=2)

            def on_checkpoint(moments: dict[str, SecondMoment]) -> None:
                save_second_moments(ckpt, [moments[n] for n in missing], ckpt_keys,
                                    complete=False)

        computed = collect_second_moments(
            model, tokenizer, missing, source, n_samples=n_samples, n_tokens=n_tokens,
            seq_len=seq_len, batch_size=batch_size, batch_tokens=batch_tokens, dtype=dtype,
            forward_dtype=forward_dtype, start=start, checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint,
            stop_early=stop_early, progress=progress)
        first = computed[missing[0]]
        if first.count == 0:
            raise ValueError(f"the statistics corpus ({source.description}) is empty: it gave "
                             f"no tokens from {first.n_texts} texts")
        if n_samples is not None and first.n_texts < n_samples:
            warnings.warn(f"the {source.description} has only {first.n_texts} texts, fewer "
                          f"than n_samples={n_samples}; using them all", stacklevel=2)
        for n in missing:
            m = computed[n]
            m.meta["corpus"] = source.description
            if keys is not None and paths is not None:
                m.meta["key"] = keys[n]
                save_second_moments(paths[n], [m], [keys[n]])
            results[n] = m
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
    return {n: results[n] for n in names}


def get_second_moment(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layer: int | str,
    *,
    corpus: Any = "wikitext",
    n_samples: int | None = 100_000,
    n_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    dtype: torch.dtype = torch.float64,
    forward_dtype: torch.dtype | None = None,
    part: str = "mlp_out",
    layout: Any = None,
    cache: bool | str | os.PathLike[str] = True,
    recompute: bool = False,
    checkpoint_every: int | None = 1000,
    memory_cache: bool = True,
    stop_early: bool = True,
    progress: bool | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> SecondMoment:
    """The uncentred second moment ``C = E[k kᵀ]`` of the input ``k`` of one module.

    This is ROME's ``C`` (and MEMIT's per-layer ``C``): ``k`` is the input of the rewrite module
    ``W_out`` (for GPT-2, ``transformer.h.{layer}.mlp.c_proj``, whose input is the MLP's hidden
    activation of dimension ``d_ff``), averaged over every real token of ``n_samples`` corpus
    texts (100,000 Wikipedia texts in the paper). Fewer samples give a cheaper, noisier
    estimate of the same ``C``.

    Args:
        model: a Hugging Face causal LM (any dtype and device; it is run in eval mode).
        tokenizer: its tokenizer.
        layer: a block index (the module is ``layout.name(part, layer)``) or a module name.
        corpus: anything :func:`lightning_rome.corpora.as_corpus` accepts: ``"wikitext"``
            (the local WikiText-2 copy when ``$LIGHTNING_ROME_DATA`` is set, else the hub), a
            text file path, a Hugging Face dataset, a list of strings, a ``TextCorpus``.
        n_samples: the number of texts to read (``None``: all).
        n_tokens: a token budget instead of (or on top of) ``n_samples``.
        seq_len: texts are truncated to this many tokens (default: the model's context,
            at most 2048).
        batch_size: a cap on texts per forward pass (``None``: none).
        batch_tokens: a cap on padded tokens per forward pass; texts are sorted by length
            (in windows of ``DEFAULT_SORT_WINDOW`` texts) before they are cut into batches.
        dtype: accumulation dtype, ``torch.float64`` (default) or ``torch.float32``.
        forward_dtype: ``torch.float16``/``torch.bfloat16`` to run the forward pass under
            ``torch.autocast`` (e.g. a float32 model on a GPU); the sums stay in ``dtype``.
            It is part of the cache key.
        part: the layout part for integer layers (``"mlp_out"``: ROME's ``W_out``).
        layout: a layout override (see :func:`lightning_rome.models.get_layout`).
        cache: ``True`` caches under ``cache_dir("stats")``, a path caches there, ``False``
            disables the cache.
        recompute: ignore (and overwrite) cached statistics.
        checkpoint_every: checkpoint the running sums every this many texts (``None``: never).
        memory_cache: keep recently loaded files in memory, up to ``MEMORY_CACHE_BYTES``
            (do not modify the result in place).
        stop_early: run each forward pass only up to the module.
        progress: show a progress bar (default: when stderr is a terminal).
        data_dir: the local data folder for named corpora.

    Returns:
        A :class:`SecondMoment` on the CPU; ``.mom2`` is ``C`` (``(d, d)``, float64 by default)
        and ``.count`` the number of tokens.

    Raises:
        IndexError: ``layer`` is out of range.
        ValueError: unknown module, an empty corpus, or a bad setting.
        FileNotFoundError: the corpus file does not exist.
    """
    (name,) = resolve_modules(model, layer, part=part, layout=layout)
    return get_second_moments(
        model, tokenizer, [name], corpus=corpus, n_samples=n_samples, n_tokens=n_tokens,
        seq_len=seq_len, batch_size=batch_size, batch_tokens=batch_tokens, dtype=dtype,
        forward_dtype=forward_dtype, part=part, layout=layout, cache=cache, recompute=recompute,
        checkpoint_every=checkpoint_every, memory_cache=memory_cache, stop_early=stop_early,
        progress=progress, data_dir=data_dir)[name]
