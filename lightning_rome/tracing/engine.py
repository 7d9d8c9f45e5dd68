"""The computation behind causal tracing: the clean and corrupted runs, and three engines that
score the restored cells.

A *cell* restores clean states at one token ``i`` (the block output ``h_i^l``, or the MLP or
attention outputs of a window of layers) in the corrupted run, and optionally freezes later MLP
or attention outputs at ``i`` to their corrupted values (severed paths). Its score is the
answer's probability at the last token, averaged over the ``S`` noise samples. Cells are
independent, so the engines differ only in how they batch them:

``naive``
    The reference approach: one forward pass of ``1 + S`` rows (one clean row and ``S``
    corrupted rows) per cell, restoring from the clean row of the same batch. Kept as the
    ground truth for tests and benchmarks.
``batched``
    Any architecture: ``cells × S`` corrupted rows share each full forward pass, with per-row
    restorations, and only the last token's logits are computed when the model allows it.
``prefix``
    GPT-2, GPT-J, GPT-NeoX and Llama families (eager or SDPA attention), where the installed
    transformers passes the probe of :mod:`lightning_rome.models.hf_compat`; ``auto`` falls back
    to ``batched`` (same scores) otherwise. It reuses the corrupted run twice:

    * **below the restored layer**: a cell whose first intervention is at layer ``l`` starts
      from the corrupted run's residual stream at layer ``l`` (its cached activations), so
      blocks ``0..l`` are never recomputed;
    * **before the restored token**: restoring token ``i`` cannot change tokens ``< i``
      (attention is causal), so only the suffix ``i..T−1`` is recomputed, attending to the
      corrupted run's cached keys and values of the prefix.

    The cells of one token run together as a branching staircase: at block ``j`` the batch
    holds every cell that has started by then (the cells that start at ``j`` join it), and
    cells whose computation has been identical so far share rows until their interventions
    differ (window cells with the same first layer share it up to the end of the shorter
    window). The first restoration of a window is folded into the starting state: for an MLP
    output, ``h = h* − m* + m_clean`` at token ``i`` (nothing else in block ``l₀`` depends on
    it); for an attention output, block ``l₀`` runs on token ``i`` alone (the other tokens'
    keys and values come from the block's corrupted input). In the last block only the last
    token's output matters, so the other tokens only produce their keys and values there (the
    block is stopped right after computing them) and the block runs on the last token alone.
    Blocks are called the way the model's own forward calls them, through
    :class:`~lightning_rome.models.hf_compat.PrefixBlocks` (the one place that touches
    transformers internals: the causal mask, the rotary embeddings, the block's cache keyword and
    a stand-in cache holding the prefix's keys and values).

All three engines see the same noise draws, so they agree to float tolerance. Cells at tokens
before the subject cannot change anything (the noise only touches the subject, and attention is
causal): they score exactly ``P*[o]``, and the batched and prefix engines do not run them.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rome.hooks import EditFn, module_hooks, replace_positions
from lightning_rome.models import ModelLayout
from lightning_rome.models.hf_compat import (
    PrefixBlocks,
    attn_implementation,
    cache_layer_kv,
    output_cache,
    probe_prefix_blocks,
)
from lightning_rome.tracing.noise import Corruption

__all__ = [
    "ENGINES",
    "PREFIX_FAMILIES",
    "Cell",
    "Engine",
    "TraceRuns",
    "TraceSpec",
    "make_cells",
    "prefix_supported",
    "prefix_unsupported",
    "run_clean_and_corrupted",
    "score_cells",
    "window_layers",
]

Engine = Literal["auto", "prefix", "batched", "naive"]
ENGINES: tuple[str, ...] = ("auto", "prefix", "batched", "naive")
PREFIX_FAMILIES: tuple[str, ...] = ("gpt2", "gptj", "gpt_neox", "llama")
Part = Literal["block", "mlp", "attn"]
_PART_OF_KIND: dict[str, Part] = {"hidden": "block", "mlp": "mlp", "attn": "attn"}


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored together for a window centred on ``layer``.

    ``[layer − window // 2, layer + ⌈window / 2⌉)`` clipped to ``[0, n_layers)``, which is the
    published code's convention (for ``window=10``: ``l−5 … l+4``).
    """
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass(frozen=True)
class TraceSpec:
    """What one trace grid restores: ``kind`` and, for hidden states, ``sever``."""

    kind: str
    sever: str | None = None

    @property
    def label(self) -> str:
        return self.kind if self.sever is None else f"{self.kind}/sever={self.sever}"


@dataclass(frozen=True)
class Cell:
    """One restoration: at ``token``, write clean values at each ``(part, layer)`` of
    ``restore`` and corrupted values at each ``(part, layer)`` of ``freeze``."""

    spec: int
    token: int
    layer: int
    restore: tuple[tuple[Part, int], ...]
    freeze: tuple[tuple[Part, int], ...] = ()


def make_cells(specs: Sequence[TraceSpec], n_tokens: int, n_layers: int, window: int,
               tokens: Sequence[int] | None = None) -> list[Cell]:
    """Every ``(token, layer)`` cell of every spec (or only those at ``tokens``)."""
    cells = []
    for k, spec in enumerate(specs):
        part = _PART_OF_KIND[spec.kind]
        for i in range(n_tokens) if tokens is None else tokens:
            for layer in range(n_layers):
                if part == "block":
                    restore: tuple[tuple[Part, int], ...] = (("block", layer),)
                    freeze: tuple[tuple[Part, int], ...] = tuple(
                        (spec.sever, j) for j in range(layer + 1, n_layers)) if spec.sever else ()
                else:
                    restore = tuple((part, j) for j in window_layers(layer, window, n_layers))
                    freeze = ()
                cells.append(Cell(k, i, layer, restore, freeze))
    return cells


@dataclass
class TraceRuns:
    """The clean and corrupted runs of one prompt, with everything the engines reuse.

    Attributes:
        input_ids: ``(T,)``.
        span: the subject's token span.
        corruption: the noise draws (``S`` samples).
        answer_id: the answer token ``o``.
        predicted_id: the clean run's greedy next token.
        high_score: ``P[o]`` in the clean run.
        corrupted_probs: ``(S,)``, ``P[o]`` in each corrupted row; ``low_score`` is their mean.
        clean: part → ``(L, T, d)`` clean block / MLP / attention outputs.
        corrupt: part → ``(L, S, T, d)`` corrupted ones.
        resid: ``(L + 1, S, T, d)`` corrupted residual stream: the input of block ``j`` is
            ``resid[j]`` (``resid[L]`` is the last block's output).
        kv: per layer, the corrupted run's cached ``(keys, values)``, ``(S, H, T, d_head)``
            (only for the prefix engine).
    """

    input_ids: Tensor
    span: tuple[int, int]
    corruption: Corruption
    answer_id: int
    predicted_id: int
    high_score: float
    corrupted_probs: Tensor
    clean: dict[str, Tensor] = field(default_factory=dict)
    corrupt: dict[str, Tensor] = field(default_factory=dict)
    resid: Tensor | None = None
    kv: list[tuple[Tensor, Tensor]] | None = None

    @property
    def samples(self) -> int:
        return self.corruption.values.shape[0]

    @property
    def low_score(self) -> float:
        return float(self.corrupted_probs.mean())


def _names(layout: ModelLayout, part: str, n_layers: int) -> list[str]:
    return [layout.name(part, j) for j in range(n_layers)]


def _accepts(model: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False


def _last_logits(model: nn.Module, input_ids: Tensor, **kwargs: object) -> Tensor:
    """Logits at the last position, ``(B, V)``, computing only those when the model allows."""
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids, **kwargs)
    return out.logits[:, -1].float()


@torch.no_grad()
def run_clean_and_corrupted(model: nn.Module, layout: ModelLayout, input_ids: Sequence[int],
                            span: tuple[int, int], corruption: Corruption,
                            answer_id: int | None, *, keep_kv: bool = False) -> TraceRuns:
    """One forward pass of ``1 + S`` rows: row 0 clean, rows ``1..S`` corrupted.

    Records every block, MLP and attention output and the first block's input, and (with
    ``keep_kv``) the key/value cache. ``answer_id=None`` takes the clean greedy prediction.
    """
    device = next(model.parameters()).device
    L = layout.n_layers(model)
    S = corruption.values.shape[0]
    ids = torch.as_tensor(list(input_ids), dtype=torch.long, device=device)  # (T,)
    batch = ids[None].expand(1 + S, -1)  # (1 + S, T)
    samples = torch.arange(-1, S)  # row 0 clean
    blocks, mlps, attns = (_names(layout, p, L) for p in ("block", "mlp", "attn"))
    embed = layout.name("embed")
    with module_hooks(model, [embed], edit_output=lambda x, _: corruption.apply(x, span, samples)), \
            module_hooks(model, blocks + mlps + attns, retain_output=True) as rec, \
            module_hooks(model, blocks[:1], retain_input=True) as rec_in:
        out = model(input_ids=batch, use_cache=keep_kv)
    probs = F.softmax(out.logits[:, -1].float(), dim=-1)  # (1 + S, V)
    predicted = int(probs[0].argmax())
    o = predicted if answer_id is None else int(answer_id)

    def stack(names: list[str]) -> Tensor:
        return torch.stack([rec[n].output for n in names])  # (L, 1 + S, T, d)

    h, m, a = stack(blocks), stack(mlps), stack(attns)
    runs = TraceRuns(
        input_ids=ids.cpu(), span=span, corruption=corruption, answer_id=o,
        predicted_id=predicted, high_score=float(probs[0, o]),
        corrupted_probs=probs[1:, o].cpu(),
        clean={"block": h[:, 0], "mlp": m[:, 0], "attn": a[:, 0]},
        corrupt={"block": h[:, 1:], "mlp": m[:, 1:], "attn": a[:, 1:]},
        resid=torch.cat([rec_in[blocks[0]].input[None, 1:], h[:, 1:]]),  # (L + 1, S, T, d)
    )
    if keep_kv:
        cache = output_cache(out)
        runs.kv = [tuple(t[1:] for t in cache_layer_kv(cache, j))  # type: ignore[misc]
                   for j in range(L)]
    return runs


# --------------------------------------------------------------------------------------------
# naive: one (1 + S)-row forward pass per cell, as in the reference code
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _score_naive(model: nn.Module, layout: ModelLayout, runs: TraceRuns,
                 cells: Sequence[Cell]) -> Tensor:
    S = runs.samples
    device = next(model.parameters()).device
    batch = runs.input_ids.to(device)[None].expand(1 + S, -1)  # (1 + S, T)
    samples = torch.arange(-1, S)
    embed = layout.name("embed")
    out = torch.empty(len(cells))
    for c, cell in enumerate(cells):
        t = cell.token
        edits = {}

        def restore(x: Tensor, name: str, t: int = t) -> Tensor:
            x = x.clone()
            x[1:, t] = x[0, t]  # (S, d) ← the clean row of this batch
            return x

        for part, j in cell.restore:
            edits[layout.name(part, j)] = restore
        for part, j in cell.freeze:
            edits[layout.name(part, j)] = replace_positions(
                t, runs.corrupt[part][j][:, t], batch=list(range(1, S + 1)))
        with module_hooks(model, [embed],
                          edit_output=lambda x, _: runs.corruption.apply(x, runs.span, samples)), \
                module_hooks(model, list(edits), edit_output=edits):
            logits = model(input_ids=batch).logits  # (1 + S, T, V), as the reference computes
        out[c] = F.softmax(logits[1:, -1].float(), dim=-1).mean(0)[runs.answer_id]
    return out


# --------------------------------------------------------------------------------------------
# batched: many cells per full forward pass (any architecture)
# --------------------------------------------------------------------------------------------
def _chunks(items: Sequence[int], per_chunk: int) -> list[list[int]]:
    items = list(items)
    return [items[k:k + per_chunk] for k in range(0, len(items), per_chunk)]


@torch.no_grad()
def _score_batched(model: nn.Module, layout: ModelLayout, runs: TraceRuns,
                   cells: Sequence[Cell], batch_tokens: int) -> Tensor:
    S, T = runs.samples, runs.input_ids.shape[0]
    device = next(model.parameters()).device
    ids = runs.input_ids.to(device)
    embed = layout.name("embed")
    out = torch.empty(len(cells))
    for chunk in _chunks(range(len(cells)), max(1, batch_tokens // (T * S))):
        R = len(chunk) * S
        sample = torch.arange(R) % S  # (R,)
        writes: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = defaultdict(list)
        for k, c in enumerate(chunk):
            cell, rows = cells[c], torch.arange(k * S, (k + 1) * S)
            for part, j in cell.restore:
                writes[layout.name(part, j)].append(
                    (rows, torch.full((S,), cell.token), runs.clean[part][j][cell.token]
                     .expand(S, -1)))
            for part, j in cell.freeze:
                writes[layout.name(part, j)].append(
                    (rows, torch.full((S,), cell.token), runs.corrupt[part][j][:, cell.token]))
        edits = {name: replace_positions(torch.cat([w[1] for w in ws]).to(device),
                                         torch.cat([w[2] for w in ws]),
                                         batch=torch.cat([w[0] for w in ws]).to(device))
                 for name, ws in writes.items()}
        with module_hooks(model, [embed],
                          edit_output=lambda x, _, s=sample: runs.corruption.apply(
                              x, runs.span, s)), \
                module_hooks(model, list(edits), edit_output=edits):
            logits = _last_logits(model, ids[None].expand(R, -1), use_cache=False)  # (R, V)
        p = F.softmax(logits, dim=-1)[:, runs.answer_id].view(len(chunk), S).mean(1)
        out[chunk] = p.cpu()
    return out


# --------------------------------------------------------------------------------------------
# prefix: reuse the corrupted run below the restored layer and before the restored token
# --------------------------------------------------------------------------------------------
def prefix_unsupported(model: nn.Module, layout: ModelLayout) -> str | None:
    """``None`` if the prefix engine is designed for this model's architecture, else why not.

    This checks the family and the configuration only; :func:`prefix_supported` also checks
    that the installed transformers lets the engine call the blocks
    (:func:`~lightning_rome.models.hf_compat.probe_prefix_blocks`).
    """
    config = getattr(model, "config", None)
    if layout.family not in PREFIX_FAMILIES:
        return f"the prefix engine supports the families {PREFIX_FAMILIES}, not {layout.family!r}"
    impl = attn_implementation(model)
    if impl not in ("eager", "sdpa"):
        return f"the prefix engine needs eager or sdpa attention, not {impl!r}"
    if getattr(config, "add_cross_attention", False):
        return "the prefix engine does not support cross-attention"
    return None


def prefix_supported(model: nn.Module, layout: ModelLayout) -> str | None:
    """``None`` if the prefix engine can run this model with the installed transformers, else
    the reason it cannot (the architecture, or what the probe of the private block-call API
    found)."""
    return prefix_unsupported(model, layout) or probe_prefix_blocks(model, layout)


class _SuffixRunner(PrefixBlocks):
    """Calls blocks on the suffix ``i..T−1`` (:class:`~lightning_rome.models.hf_compat.PrefixBlocks`)
    and reads the answer's probability from the last token's state."""

    def __init__(self, model: nn.Module, layout: ModelLayout, runs: TraceRuns) -> None:
        assert runs.resid is not None
        super().__init__(model, layout, runs.resid[0, :1])  # x: (1, T, d)
        self.final_norm = layout.module(model, "final_norm")
        self.lm_head = layout.module(model, "lm_head")

    def probs(self, h_last: Tensor, answer_id: int) -> Tensor:
        """``P[o]`` from the last token's residual ``(B, d)``."""
        logits = self.lm_head(self.final_norm(h_last)).float()  # (B, V)
        return F.softmax(logits, dim=-1)[:, answer_id]


@dataclass
class _Plan:
    """A cell as the prefix engine runs it: start at block ``join`` from the corrupted residual
    stream, with the state ``init`` (computed at layer ``init_layer``) written at the restored
    token, then apply ``edits`` inside the later blocks."""

    join: int
    init: str  # "block" | "mlp" | "attn"
    init_layer: int
    edits: list[tuple[Part, int, bool]]  # (part, layer, clean?) at layers >= join


def _plan(cell: Cell) -> _Plan:
    """Fold the cell's first restoration into a starting state:

    * ``block`` at ``l``: ``h_i^l`` is the clean state; start at block ``l + 1``;
    * ``mlp`` at ``l``: nothing else in block ``l`` depends on ``m_i^l``, so
      ``h_i^l = h*_i^l − m*_i^l + m_i^l``; start at block ``l + 1``;
    * ``attn`` at ``l``: in block ``l`` only token ``i`` changes (the other tokens' keys and
      values come from the block's corrupted input), so block ``l`` runs on token ``i`` alone;
      start at block ``l + 1``.
    """
    restore = sorted(cell.restore, key=lambda pj: pj[1])
    part0, j0 = restore[0]
    if any(j <= j0 for _, j in cell.freeze):
        raise ValueError(f"cannot plan a freeze at or before the first restoration in {cell}")
    if part0 == "block" and len(restore) > 1:
        raise ValueError(f"only one block output can be restored per cell: {cell}")
    if sum(1 for _, j in restore if j == j0) > 1:
        raise ValueError(f"only one restoration per layer is supported: {cell}")
    edits = [(p, j, True) for p, j in restore[1:]] + [(p, j, False) for p, j in cell.freeze]
    return _Plan(j0 + 1, part0, j0, edits)


@torch.no_grad()
def _score_prefix(model: nn.Module, layout: ModelLayout, runs: TraceRuns,
                  cells: Sequence[Cell], batch_tokens: int) -> Tensor:
    assert runs.resid is not None and runs.kv is not None
    S, T = runs.samples, runs.input_ids.shape[0]
    L = layout.n_layers(model)
    runner = _SuffixRunner(model, layout, runs)
    out = torch.empty(len(cells))
    by_token: dict[int, list[int]] = defaultdict(list)
    for c, cell in enumerate(cells):
        by_token[cell.token].append(c)
    attn_starts: dict[int, Tensor] = {}  # filled by _run_staircase, shared by its calls
    for i, group in sorted(by_token.items()):
        Q = T - i
        plans = {c: _plan(cells[c]) for c in group}
        group = sorted(group, key=lambda c: plans[c].join)
        for chunk in _chunks(group, max(1, batch_tokens // (Q * S))):
            out[chunk] = _run_staircase(runner, runs, [plans[c] for c in chunk], i, L,
                                        attn_starts).cpu()
    return out


def _attn_restored(runner: _SuffixRunner, runs: TraceRuns, j: int) -> Tensor:
    """``(S, T, d)``: block ``j``'s output at every token of the corrupted run, with the
    attention output of every token restored to its clean value. Once the attention output is
    replaced, nothing in the block mixes tokens, so token ``i`` of this is the block run on
    token ``i`` alone with only its attention output restored (the start state of an
    attention cell at layer ``j``), for every ``i`` in one call."""
    assert runs.resid is not None
    clean = runs.clean["attn"][j]  # (T, d)

    def fix(x: Tensor, _name: str) -> Tensor:  # x: (S, T, d)
        return clean.to(dtype=x.dtype, device=x.device).expand_as(x).clone()

    name = runner.layout.name("attn", j)
    with module_hooks(runner.model, [name], edit_output={name: fix}):
        return runner.block(j, runs.resid[j], 0, None)  # (S, T, d)


def _run_staircase(runner: _SuffixRunner, runs: TraceRuns, plans: Sequence[_Plan], i: int,
                   L: int, attn_starts: dict[int, Tensor] | None = None) -> Tensor:
    """Score cells at token ``i``: ``(n_cells,)``. ``attn_starts`` caches
    :func:`_attn_restored` per layer across the calls for one prompt.

    The batch holds *branches* of ``S`` rows (one per noise sample). A branch is a set of cells
    whose computation has been identical so far: same starting block and state, same edits.
    At block ``j`` the cells that start there join as new branches, and a branch whose cells
    disagree about the edits inside block ``j`` forks (its rows are copied) before the block
    runs. Window cells that share their first layers thus share that computation.

    In the last block only the last token's output matters: the other tokens contribute only
    their keys and values, so the block runs on the last token alone (and edits at token
    ``i < T − 1`` there change nothing the answer depends on).
    """
    S = runs.samples
    assert runs.resid is not None and runs.kv is not None
    layout = runner.layout
    T = runs.resid.shape[-2]
    Q = T - i
    edits_at: list[dict[int, tuple[tuple[str, bool], ...]]] = []
    for p in plans:
        per_layer: dict[int, list[tuple[str, bool]]] = defaultdict(list)
        for part, j, clean in p.edits:
            per_layer[j].append((part, clean))
        edits_at.append({j: tuple(sorted(v)) for j, v in per_layer.items()})

    def prefix_kv(j: int, n_branches: int) -> tuple[Tensor, Tensor] | None:
        """The corrupted keys and values of tokens ``< i`` at block ``j``, per row."""
        if i == 0:
            return None
        k, v = runs.kv[j]  # (S, H, T, d_head)
        return k[:, :, :i].repeat(n_branches, 1, 1, 1), v[:, :, :i].repeat(n_branches, 1, 1, 1)

    def edit_fns(j: int, branches: list[list[int]]) -> dict[str, EditFn]:
        """The edits inside block ``j``, per module: values at suffix position 0 (token i)."""
        writes: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
        for b, cs in enumerate(branches):
            for part, clean in edits_at[cs[0]].get(j, ()):
                value = (runs.clean[part][j][i].expand(S, -1) if clean
                         else runs.corrupt[part][j][:, i])  # (S, d)
                writes[layout.name(part, j)].append((torch.arange(b * S, (b + 1) * S), value))
        return {name: replace_positions(0, torch.cat([v for _, v in ws]),
                                        batch=torch.cat([r for r, _ in ws]).to(device))
                for name, ws in writes.items()}

    def start_state(p: _Plan) -> Tensor:
        """``(S, Q, d)``: the corrupted suffix at block ``p.join``'s input, with token ``i``
        restored as ``p`` says."""
        j0 = p.init_layer
        h = runs.resid[j0 + 1][:, i:].clone()  # (S, Q, d), corrupted
        if p.init == "block":  # h_i^l ← clean
            h[:, 0] = runs.clean["block"][j0][i]
        elif p.init == "mlp":  # m_i^l ← clean, inside h_i^l = h*_i^l − m*_i^l + m_i^l
            h[:, 0] = (runs.resid[j0 + 1][:, i] - runs.corrupt["mlp"][j0][:, i]
                       + runs.clean["mlp"][j0][i])  # (S, d)
        else:  # a_i^l ← clean: block l at token i with its attention output restored
            if j0 not in starts:
                starts[j0] = _attn_restored(runner, runs, j0)  # (S, T, d)
            h[:, 0] = starts[j0][:, i]  # (S, d)
        return h

    starts = attn_starts if attn_starts is not None else {}
    device = runs.resid.device
    branches: list[list[int]] = []  # cells per branch; branch b holds rows [b·S, (b+1)·S)
    h = runs.resid.new_empty((0, Q, runs.resid.shape[-1]))  # (0, Q, d)
    for j in range(L):
        joining: dict[tuple[str, int], list[int]] = defaultdict(list)
        for c, p in enumerate(plans):
            if p.join == j:
                joining[(p.init, p.init_layer)].append(c)
        if joining:
            branches += list(joining.values())
            h = torch.cat([h, *(start_state(plans[cs[0]]) for cs in joining.values())])
        if not branches:
            continue
        last = j == L - 1 and Q > 1
        if not last:  # fork branches whose cells edit block j differently
            forked: list[list[int]] = []
            rows: list[Tensor] = []
            for b, cs in enumerate(branches):
                by_sig: dict[tuple[tuple[str, bool], ...], list[int]] = defaultdict(list)
                for c in cs:
                    by_sig[edits_at[c].get(j, ())].append(c)
                for group in by_sig.values():
                    forked.append(group)
                    rows.append(torch.arange(b * S, (b + 1) * S))
            if len(forked) != len(branches):
                h = h[torch.cat(rows).to(device)]  # (n_branches · S, Q, d)
            branches = forked
        kv = prefix_kv(j, len(branches))
        if last:  # keys/values of tokens i..T−2, then the last token alone
            k, v = runner.keys_values(j, h[:, :-1], i, kv)  # (R, H, Q − 1, d_head)
            if kv is not None:
                k, v = torch.cat([kv[0], k], dim=-2), torch.cat([kv[1], v], dim=-2)
            h = runner.block(j, h[:, -1:], T - 1, (k, v))  # (R, 1, d)
        else:
            fns = edit_fns(j, branches)
            with module_hooks(runner.model, list(fns), edit_output=fns):
                h = runner.block(j, h, i, kv)  # (R, Q, d)
    ending: dict[tuple[str, int], list[int]] = defaultdict(list)
    for c, p in enumerate(plans):
        if p.join == L:  # restored in the last layer: only the last token's state counts
            ending[(p.init, p.init_layer)].append(c)
    if ending and Q > 1:
        # Restored at token i < T − 1 in the last layer: the last token's state is the
        # corrupted one whatever the kind (its keys and values come from the layer below), so
        # these cells share one branch.
        branches.append([c for cs in ending.values() for c in cs])
        h = torch.cat([h[:, -1:], runs.resid[L][:, -1:]])  # (R, 1, d)
    elif ending:
        branches += list(ending.values())
        h = torch.cat([h[:, -1:], *(start_state(plans[cs[0]])[:, -1:]
                                    for cs in ending.values())])  # (R, 1, d)
    p_branch = runner.probs(h[:, -1], runs.answer_id).view(len(branches), S).mean(1)
    out = torch.empty(len(plans), device=p_branch.device)
    for b, cs in enumerate(branches):
        out[cs] = p_branch[b]
    return out


@torch.no_grad()
def score_cells(model: nn.Module, layout: ModelLayout, runs: TraceRuns, cells: Sequence[Cell],
                engine: str, batch_tokens: int = 16384) -> Tensor:
    """The score ``P*,clean[o]`` of each cell, ``(n_cells,)`` float32 on the CPU.

    ``engine`` is ``naive``, ``batched`` or ``prefix`` (resolve ``auto`` before calling).
    Cells at tokens before the subject are not run by ``batched``/``prefix``: they score
    ``P*[o]`` exactly.
    """
    if engine == "naive":
        return _score_naive(model, layout, runs, cells)
    b = runs.span[0]
    out = torch.full((len(cells),), runs.low_score)
    live = [c for c, cell in enumerate(cells) if cell.token >= b]
    if not live:
        return out
    todo = [cells[c] for c in live]
    if engine == "batched":
        out[live] = _score_batched(model, layout, runs, todo, batch_tokens)
    elif engine == "prefix":
        out[live] = _score_prefix(model, layout, runs, todo, batch_tokens)
    else:
        raise ValueError(f"engine must be one of {ENGINES[1:]}, got {engine!r}")
    return out
