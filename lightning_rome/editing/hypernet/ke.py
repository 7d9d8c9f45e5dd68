"""KE: KnowledgeEditor (De Cao, Aziz & Titov, EMNLP 2021), a hypernetwork trained with a
constrained objective to turn the fine-tuning gradient of an edit into a weight update.

**What is implemented, exactly.** For an edit ``(x, y, a)`` (prompt ``x`` with the subject filled
in, its current answer ``y = o^c`` when known, the new answer ``a = o*``):

1. *Condition.* The token sequence ``x ‖ y ‖ <eos> ‖ a`` (``y`` left out when unknown or
   ``condition_on_true=False``) is embedded, with the base model's input embeddings (frozen,
   ``embedding="base"``) or an embedding of the editor's own (``"own"``), and read by a
   bidirectional LSTM; the condition ``h ∈ R^{2H}`` is the concatenation of the last forward and
   the last backward hidden state.
2. *Update.* For every edited weight ``W ∈ R^{m×n}`` (canonical ``[out, in]``: ``m = d_out``,
   ``n = d_in``; by default ``W_out`` of the last three MLPs, as for MEND) a feed-forward network
   ``FFNN_W(h) = Linear(tanh(Linear(h)))`` predicts ``α, δ ∈ R^m``, ``γ, β ∈ R^n`` and ``η ∈ R``,
   and (the paper's eq. for ``Δθ``)::

       α̂ = σ(α) γᵀ,   β̂ = σ(δ) βᵀ,   ΔW = σ(η) · (α̂ ⊙ ∇_W L(W; x, a) + β̂),   W̃ = W + ΔW

   with ``σ`` the logistic sigmoid and ``L(W; x, a)`` the mean per-token NLL of ``a`` after ``x``.
   The gradient is decomposed as for MEND, ``∇_W L = Σ_t δ_t u_tᵀ``
   (:func:`~lightning_rome.editing.hypernet.gradients.decompose_gradient`), so that ``ΔW`` stays low-rank::

       ΔW = Σ_t (σ(η) σ(α) ⊙ δ_t)(γ ⊙ u_t)ᵀ + (σ(η) σ(δ)) βᵀ        (rank K + 1)

3. *Training* (:func:`ke_losses`): the constrained problem of the paper::

       min_φ  L_e = mean_{x̂ ∈ {x} ∪ P^x} −log p_θ̃(a | x̂)
       s.t.   C = KL(p_θ(· | x_loc) ‖ p_θ̃(· | x_loc)) ≤ m

   (``P^x`` the paraphrases, ``C`` averaged over the locality rows' predicted tokens), solved by
   Lagrangian relaxation ``min_φ max_{λ≥0} L_e + λ (C − m)``: the editor minimises
   ``L_e + λ (C − m)`` by Adam while ``λ`` takes a projected gradient-ascent step
   ``λ ← max(0, λ + lr_lambda · (C − m))`` after every batch (``C`` averaged over processes
   under DDP). The margin ``m`` may be annealed linearly from ``margin_start`` to ``margin`` over
   ``margin_anneal_steps`` steps (a large margin first, then a tight one).

Initialisation (ours; the paper does not fix it): the output layer of each FFNN starts at zero
weights with biases giving ``α = δ = η = 0`` (``σ = ½``), ``β = 0`` and ``γ = init_gamma``
(default −1), so the untrained editor takes a small step against the gradient,
``ΔW = ¼ · init_gamma · ∇_W L``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_rome.editing.hparams import FINITE, NONNEG, POSITIVE, POSITIVE_INT, HyperParams, Num
from lightning_rome.editing.hypernet.editor import HypernetEditor
from lightning_rome.editing.hypernet.gradients import LowRankEdit, TokenFactors, decompose_gradient
from lightning_rome.editing.hypernet.objective import check_training_batch, edit_objective
from lightning_rome.editing.hypernet.rows import edit_rows
from lightning_rome.editing.hypernet.weights import edited_shapes
from lightning_rome.models.layout import ModelLayout
from lightning_rome.models.modes import eval_mode
from lightning_rome.models.weights import weight_param_name
from lightning_rome.patches import LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import pad_sequences
from lightning_rome.tokens import continuation_ids, encode_prompt

__all__ = [
    "KE",
    "KEHyperParams",
    "KENetwork",
    "condition_ids",
    "ke_losses",
    "ke_margin",
]


@dataclasses.dataclass
class KEHyperParams(HyperParams):
    """KnowledgeEditor's settings.

    Attributes:
        layers: edited layers (``None``: the last three).
        part: the layout part edited (``mlp_out``).
        positions: tokens of the gradient decomposition, as for MEND (``"target"``/``"all"``).
        embedding: ``"base"`` (the base model's frozen input embeddings) or ``"own"``.
        embed_dim: the size of the editor's own embedding (``embedding="own"``).
        lstm_hidden: ``H``, the hidden size of each LSTM direction.
        hidden: the hidden size of each per-weight FFNN.
        condition_on_true: include the current answer ``y`` in the condition text.
        init_gamma: the initial ``γ`` (see the module docstring).
        lr: Adam learning rate of the editor.
        margin: the KL margin ``m`` (at the end of annealing).
        margin_start: the margin at step 0 (``None``: ``margin``, no annealing).
        margin_anneal_steps: steps over which the margin goes from ``margin_start`` to ``margin``.
        lr_lambda: the step size of the ascent on the Lagrange multiplier ``λ``.
        lambda_init: the initial ``λ``.
    """

    METHOD = "ke"
    RANGES: ClassVar[Mapping[str, Num]] = {
        "layers": Num(integer=True, optional=True, depth=1), "embed_dim": POSITIVE_INT,
        "lstm_hidden": POSITIVE_INT, "hidden": POSITIVE_INT, "init_gamma": FINITE,
        "lr": POSITIVE, "margin": NONNEG, "margin_start": Num(low=0, optional=True),
        "margin_anneal_steps": Num(low=0, integer=True), "lr_lambda": NONNEG,
        "lambda_init": NONNEG,
    }

    layers: list[int] | None = None
    part: str = "mlp_out"
    positions: str = "target"
    embedding: str = "base"
    embed_dim: int = 128
    lstm_hidden: int = 128
    hidden: int = 256
    condition_on_true: bool = True
    init_gamma: float = -1.0
    lr: float = 3e-4
    margin: float = 1e-3
    margin_start: float | None = None
    margin_anneal_steps: int = 0
    lr_lambda: float = 1e-2
    lambda_init: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and not self.layers:
            raise ValueError("KE needs at least one layer (or layers=None for the last three)")
        if self.embedding not in ("base", "own"):
            raise ValueError(f"embedding must be 'base' or 'own', got {self.embedding!r}")
        if self.positions not in ("target", "all"):
            raise ValueError(f"positions must be 'target' or 'all', got {self.positions!r}")


def ke_margin(hparams: KEHyperParams, step: int) -> float:
    """The KL margin ``m`` at a training step (linear annealing)."""
    start = hparams.margin if hparams.margin_start is None else hparams.margin_start
    if hparams.margin_anneal_steps <= 0:
        return hparams.margin
    frac = min(1.0, max(0, step) / hparams.margin_anneal_steps)
    return start + (hparams.margin - start) * frac


def condition_ids(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], *,
                  with_true: bool = True) -> tuple[Tensor, Tensor]:
    """Token ids of the condition texts ``x ‖ y ‖ <eos> ‖ a``, right-padded.

    Returns:
        ``ids`` ``(C, L)`` and ``lengths`` ``(C,)``.
    """
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    seqs = []
    for r in requests:
        ids = encode_prompt(tokenizer, r.text)
        if with_true and r.target_true is not None:
            ids = ids + continuation_ids(tokenizer, r.target_true)
        if sep is not None:
            ids = [*ids, int(sep)]
        seqs.append(ids + continuation_ids(tokenizer, r.target_new))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep or 0)
    batch = pad_sequences(seqs, int(pad), "right")
    return batch.input_ids, batch.lengths


class _KEHead(nn.Module):
    """``FFNN_W(h)`` → ``(α, γ, δ, β, η)`` for one weight of shape ``(m, n)``."""

    def __init__(self, cond_dim: int, hidden: int, d_out: int, d_in: int,
                 init_gamma: float) -> None:
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.inner = nn.Linear(cond_dim, hidden)
        self.outer = nn.Linear(hidden, 2 * d_out + 2 * d_in + 1)
        nn.init.zeros_(self.outer.weight)
        with torch.no_grad():
            self.outer.bias.zero_()
            self.outer.bias[d_out:d_out + d_in] = init_gamma  # γ

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        out = self.outer(torch.tanh(self.inner(h)))  # (C, 2m + 2n + 1)
        m, n = self.d_out, self.d_in
        alpha, gamma = out[:, :m], out[:, m:m + n]  # (C, m), (C, n)
        delta, beta = out[:, m + n:2 * m + n], out[:, 2 * m + n:2 * m + 2 * n]  # (C, m), (C, n)
        eta = out[:, -1:]  # (C, 1)
        return alpha, gamma, delta, beta, eta


class KENetwork(nn.Module):
    """KnowledgeEditor's trainable state: the condition encoder (BiLSTM, optionally its own
    embedding) and one FFNN per edited weight.

    Args:
        shapes: ``{module name: (d_out, d_in)}`` of the edited linear modules.
        hparams: the :class:`KEHyperParams`.
        input_dim: the size of the embeddings read by the LSTM: the base model's hidden size
            (``embedding="base"``); ignored with ``"own"``.
        vocab_size: the tokenizer's size (``embedding="own"``).
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], hparams: KEHyperParams, *,
                 input_dim: int | None = None, vocab_size: int | None = None) -> None:
        super().__init__()
        self.hparams = hparams
        self.module_names = list(shapes)
        self.shapes = {n: (int(s[0]), int(s[1])) for n, s in shapes.items()}
        if hparams.embedding == "own":
            if not vocab_size:
                raise ValueError("KE with embedding='own' needs the vocabulary size")
            self.embedding: nn.Embedding | None = nn.Embedding(vocab_size, hparams.embed_dim)
            input_dim = hparams.embed_dim
        else:
            if not input_dim:
                raise ValueError("KE with embedding='base' needs the base model's embedding size")
            self.embedding = None
        self.input_dim = int(input_dim)
        self.vocab_size = vocab_size
        self.lstm = nn.LSTM(self.input_dim, hparams.lstm_hidden, batch_first=True,
                            bidirectional=True)
        self.heads = nn.ModuleList(
            _KEHead(2 * hparams.lstm_hidden, hparams.hidden, d_out, d_in, hparams.init_gamma)
            for d_out, d_in in self.shapes.values())

    @classmethod
    def for_model(cls, model: nn.Module, hparams: KEHyperParams,
                  tokenizer: PreTrainedTokenizerBase | None = None,
                  layout: ModelLayout | None = None) -> KENetwork:
        """The network for ``hparams.layers`` of ``model``.

        Raises:
            IndexError: a layer does not exist.
        """
        embed = model.get_input_embeddings()
        vocab = len(tokenizer) if tokenizer is not None else int(embed.weight.shape[0])
        return cls(edited_shapes(model, hparams.layers, hparams.part, layout), hparams,
                   input_dim=int(embed.weight.shape[1]), vocab_size=vocab)

    def embed(self, model: nn.Module, ids: Tensor) -> Tensor:
        """Embeddings ``(C, L, e)`` of condition ids: the editor's own, or the base model's
        (detached: they are frozen)."""
        if self.embedding is not None:
            return self.embedding(ids.to(self.embedding.weight.device))
        emb = model.get_input_embeddings()
        dtype = self.lstm.weight_ih_l0.dtype  # the editor's precision (bf16-true: bfloat16)
        with torch.no_grad():
            return emb(ids.to(emb.weight.device)).detach().to(dtype).clone()

    def condition(self, embeds: Tensor, lengths: Tensor) -> Tensor:
        """``h = [last forward state; last backward state]`` ``(C, 2H)``."""
        packed = pack_padded_sequence(embeds, lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (2, C, H)
        return torch.cat([h_n[0], h_n[1]], dim=-1)  # (C, 2H)

    def forward(self, factors: Mapping[str, TokenFactors], h: Tensor) -> dict[str, LowRankEdit]:
        """Per-case ``ΔW_c = σ(η)(σ(α)γᵀ ⊙ Σ_t δ_t u_tᵀ + σ(δ)βᵀ)`` as low-rank factors."""
        out: dict[str, LowRankEdit] = {}
        for head, n in zip(self.heads, self.module_names):
            f = factors[n]
            alpha, gamma, delta, beta, eta = head(h)  # (C, m), (C, n), (C, m), (C, n), (C, 1)
            s_eta = torch.sigmoid(eta)[:, None, :]  # (C, 1, 1)
            keep = f.mask[..., None].to(f.u.dtype)  # (C, K, 1)
            left_t = s_eta * torch.sigmoid(alpha)[:, None, :] * f.delta * keep  # (C, K, m)
            right_t = gamma[:, None, :] * f.u * keep  # (C, K, n)
            left_o = s_eta * torch.sigmoid(delta)[:, None, :]  # (C, 1, m)
            right_o = beta[:, None, :]  # (C, 1, n)
            out[n] = LowRankEdit(left=torch.cat([left_t, left_o], 1),  # (C, K + 1, m)
                                 right=torch.cat([right_t, right_o], 1))  # (C, K + 1, n)
        return out

    def edits_for(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                  requests: Sequence[EditRequest], factors: Mapping[str, TokenFactors],
                  ) -> dict[str, LowRankEdit]:
        """The edits of ``requests`` (case ``c`` = request ``c``) from their gradient factors."""
        ids, lengths = condition_ids(tokenizer, requests,
                                     with_true=self.hparams.condition_on_true)
        if self.embedding is not None and int(ids.max()) >= self.embedding.num_embeddings:
            raise ValueError(f"token id {int(ids.max())} is outside the editor's vocabulary of "
                             f"{self.embedding.num_embeddings}: another tokenizer?")
        h = self.condition(self.embed(model, ids), lengths)  # (C, 2H)
        return self(factors, h)


def ke_losses(model: nn.Module, network: KENetwork, tokenizer: PreTrainedTokenizerBase,
              batch: Any, *, lam: float, margin: float) -> dict[str, Tensor]:
    """KE's Lagrangian on one :class:`~lightning_rome.data.EditTrainingBatch`.

    Args:
        lam: the current multiplier ``λ ≥ 0``.
        margin: the KL margin ``m``.

    Returns:
        ``loss = L_e + λ (C − m)`` (differentiable), ``edit_nll`` (``L_e`` over the edit and
        equivalence rows), ``loc_kl`` (``C``), ``constraint`` (``C − m``), ``edit_acc``,
        ``loc_agree``.
    """
    check_training_batch(batch, "KE")
    requests = [c.request for c in batch.cases]
    if len(requests) != len(batch.edit):
        raise ValueError(f"the batch has {len(requests)} cases but {len(batch.edit)} edit rows")
    factors = decompose_gradient(model, batch.edit, network.module_names,
                                 positions=network.hparams.positions, n_cases=len(requests))
    with torch.inference_mode(False), torch.enable_grad():
        edits = network.edits_for(model, tokenizer, requests, factors)
    out = edit_objective(model, edits, batch, c_edit=1.0, c_loc=0.0, edit_rows_too=True)
    constraint = out["loc_kl"] - margin
    out["loss"] = out["edit_nll"] + lam * constraint
    out["constraint"] = constraint.detach()
    return out


class KE(HypernetEditor):
    """A trained KnowledgeEditor: ``edit(model, tokenizer, requests)`` returns a low-rank
    :class:`~lightning_rome.patches.WeightPatch` (one forward/backward of the base model, one
    pass of the editor); the model is left bit-identical. Several requests are each conditioned
    on their own text and their updates add up.

    Args:
        network: the trained :class:`KENetwork`.
        fingerprint, model_name: see :class:`~lightning_rome.editing.hypernet.editor.HypernetEditor`.
    """

    method = "ke"
    hparams_class = KEHyperParams
    network: KENetwork

    @classmethod
    @override
    def build_network(cls, shapes: Mapping[str, Sequence[int]], hparams: Any,
                      meta: Mapping[str, Any]) -> KENetwork:
        return KENetwork(shapes, hparams, input_dim=meta["input_dim"],
                         vocab_size=meta.get("vocab_size"))

    @override
    def patch_for(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                  requests: list[EditRequest]) -> WeightPatch:
        """One low-rank delta per edited weight: each request's ``K`` target tokens and its
        offset term (rank ``K + 1`` per request)."""
        reqs = requests
        rows = edit_rows(tokenizer, [r.text for r in reqs], [r.target_new for r in reqs])
        factors = decompose_gradient(model, rows, self.network.module_names,
                                     positions=self.hparams.positions, n_cases=len(reqs))
        with eval_mode(self.network), torch.no_grad():
            edits = self.network.edits_for(model, tokenizer, reqs, factors)
        deltas: dict[str, LowRankDelta] = {}
        for module_name, e in edits.items():
            f = factors[module_name]
            keep = torch.cat([f.mask, torch.ones_like(f.mask[:, :1])], 1)  # (C, K + 1)
            left = e.left[keep]  # (R, m): every request's real tokens and its offset term
            right = e.right[keep]  # (R, n)
            deltas[weight_param_name(module_name)] = LowRankDelta(
                left.T.float().contiguous().cpu(), right.float().contiguous().cpu())
        return WeightPatch.from_model(model, deltas, method=self.method,
                                      hparams=self.hparams.to_dict(), requests=reqs)
