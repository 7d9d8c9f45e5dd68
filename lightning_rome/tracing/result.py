"""``CausalTrace``: the (tokens × layers) grid of one causal trace, with its run's context."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_rome.utils.io import CorruptFileError, atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lightning_rome.tracing.aggregate import TraceAggregate

__all__ = ["KINDS", "CausalTrace", "Kind", "Sever"]

Kind = Literal["hidden", "mlp", "attn"]
Sever = Literal["mlp", "attn"]
KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
SEVERABLE: tuple[str, ...] = ("mlp", "attn")

FORMAT = "lightning_rome.causal_trace"
FORMAT_VERSION = 1
_PROB_TOL = 1e-4  # probabilities may exceed [0, 1] by float rounding only


@dataclass
class CausalTrace:
    """One causal trace of one prompt (Meng et al. 2022, §2.1).

    Attributes:
        scores: ``(T, L)`` float32, ``P*,clean[o]``: the answer's probability in the corrupted
            run with state ``(token i, layer l)`` restored (for ``mlp``/``attn``, the window of
            layers around ``l``), averaged over the noise samples.
        high_score: ``P[o]``, the clean run's probability of the answer.
        low_score: ``P*[o]``, the corrupted run's probability (averaged over the samples).
        tokens: the prompt's tokens, decoded one by one.
        input_ids: the prompt's token ids.
        subject_range: the subject's token span ``[start, end)``.
        answer: the answer token ``o`` (its first token, decoded).
        answer_id: its id.
        kind: ``"hidden"`` (restore ``h_i^l``), ``"mlp"`` (restore ``m_i`` over a window of
            layers) or ``"attn"`` (restore ``a_i`` over a window).
        window: the number of layers restored together for ``mlp``/``attn``.
        sever: for ``kind="hidden"``, ``"mlp"`` or ``"attn"`` if the later MLP (attention)
            outputs at the restored token were frozen at their corrupted values, else ``None``.
        prompt: the prompt's full text.
        subject: the subject.
        predicted: the model's greedy next token on the clean prompt (decoded).
        noise: a description of the corruption (type, ν, ...).
        samples: the number of noise samples.
        seed: the seed of the noise draws.
    """

    scores: Tensor
    high_score: float
    low_score: float
    tokens: list[str]
    input_ids: list[int]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    kind: str
    window: int
    sever: str | None = None
    prompt: str = ""
    subject: str = ""
    predicted: str = ""
    noise: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        self.subject_range = (int(self.subject_range[0]), int(self.subject_range[1]))
        self.input_ids = [int(i) for i in self.input_ids]
        self.tokens = [str(t) for t in self.tokens]
        self.high_score, self.low_score = float(self.high_score), float(self.low_score)
        self.validate()

    # ----------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.scores.ndim != 2 or 0 in self.scores.shape:
            raise ValueError(f"scores must be a non-empty (tokens, layers) grid, got shape "
                             f"{tuple(self.scores.shape)}")
        T = self.scores.shape[0]
        if len(self.tokens) != T or len(self.input_ids) != T:
            raise ValueError(f"scores have {T} token rows but there are {len(self.tokens)} "
                             f"tokens and {len(self.input_ids)} input ids")
        b, e = self.subject_range
        if not 0 <= b < e <= T:
            raise ValueError(f"subject_range {self.subject_range} is not a span of the {T} "
                             "tokens")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.sever is not None and (self.sever not in SEVERABLE or self.kind != "hidden"):
            raise ValueError(f"sever must be None or one of {SEVERABLE}, and only for "
                             f"kind='hidden'; got sever={self.sever!r}, kind={self.kind!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        for name in ("high_score", "low_score"):
            p = getattr(self, name)
            if not math.isfinite(p) or not -_PROB_TOL <= p <= 1 + _PROB_TOL:
                raise ValueError(f"{name} must be a probability, got {p!r}")
        if not bool(torch.isfinite(self.scores).all()) or bool(
                (self.scores < -_PROB_TOL).any() or (self.scores > 1 + _PROB_TOL).any()):
            raise ValueError("scores must be finite probabilities in [0, 1]")

    # ------------------------------------------------------------------------- derived
    @property
    def n_tokens(self) -> int:
        return self.scores.shape[0]

    @property
    def n_layers(self) -> int:
        return self.scores.shape[1]

    @property
    def label(self) -> str:
        """``"hidden"``, ``"mlp"``, ``"attn"``, or ``"hidden/sever=mlp"`` etc."""
        return self.kind if self.sever is None else f"{self.kind}/sever={self.sever}"

    @property
    def total_effect(self) -> float:
        """``TE = P[o] − P*[o]``."""
        return self.high_score - self.low_score

    @property
    def indirect_effect(self) -> Tensor:
        """``IE = P*,clean[o] − P*[o]`` per cell: ``(T, L)``."""
        return self.scores - self.low_score

    @property
    def correct(self) -> bool:
        """Whether the model's greedy prediction on the clean prompt is the answer."""
        return self.predicted == self.answer

    def peak(self) -> tuple[int, int, float]:
        """The cell with the largest indirect effect: ``(token, layer, IE)``."""
        ie = self.indirect_effect
        flat = int(ie.argmax())
        t, layer = divmod(flat, self.n_layers)
        return t, layer, float(ie[t, layer])

    # ------------------------------------------------------------------------- use
    def plot(self, ax: Axes | None = None, **kwargs: Any) -> Figure:
        """The paper-style heatmap; see :func:`lightning_rome.tracing.plot.plot_trace`."""
        from lightning_rome.tracing.plot import plot_trace

        return plot_trace(self, ax=ax, **kwargs)

    @staticmethod
    def average(traces: Sequence[CausalTrace], **kwargs: Any) -> TraceAggregate:
        """Average over prompts; see :func:`lightning_rome.tracing.aggregate.average_traces`."""
        from lightning_rome.tracing.aggregate import average_traces

        return average_traces(traces, **kwargs)

    # ------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``scores`` as nested lists)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["scores"] = self.scores.tolist()
        d["subject_range"] = list(self.subject_range)
        return {"format": FORMAT, "version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CausalTrace:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed dict."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"not a causal trace: format is {d.get('format')!r}, expected "
                             f"{FORMAT!r}")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported causal trace version {d.get('version')!r}")
        names = {f.name for f in fields(cls)}
        required = ("scores", "high_score", "low_score", "tokens", "input_ids", "subject_range",
                    "answer", "answer_id", "kind", "window")
        missing = sorted(n for n in required if n not in d)
        if missing:
            raise ValueError(f"causal trace is missing the field(s) {missing}")
        kwargs = {k: v for k, v in d.items() if k in names}
        sr = kwargs["subject_range"]
        if not isinstance(sr, list | tuple) or len(sr) != 2:
            raise ValueError(f"subject_range must be two integers, got {sr!r}")
        kwargs["subject_range"] = (int(sr[0]), int(sr[1]))
        if not isinstance(kwargs["window"], int):
            raise ValueError(f"window must be an integer, got {kwargs['window']!r}")
        try:
            kwargs["scores"] = torch.tensor(kwargs["scores"], dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"scores are not a numeric grid: {err}") from err
        return cls(**kwargs)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the trace atomically: JSON for ``.json``, safetensors for ``.safetensors``."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".json", ".safetensors"):
            raise ValueError(f"save a trace as .json or .safetensors, got {path.name!r}")
        d = self.to_dict()
        with atomic_path(path) as tmp:
            if suffix == ".json":
                tmp.write_text(json.dumps(d, indent=1))
            else:
                meta = {k: v for k, v in d.items() if k not in ("scores", "input_ids")}
                save_file({"scores": self.scores.contiguous(),
                           "input_ids": torch.tensor(self.input_ids, dtype=torch.long)},
                          str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION),
                                              "meta": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CausalTrace:
        """Read a trace written by :meth:`save`, validating every field.

        Raises:
            FileNotFoundError: no such file.
            CorruptFileError: the file is truncated, not a causal trace, or inconsistent.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no causal trace at {path}")
        try:
            if path.suffix.lower() == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("format") != FORMAT:
                        raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
                    d = json.loads(meta["meta"])
                    d["scores"] = f.get_tensor("scores").tolist()
                    d["input_ids"] = f.get_tensor("input_ids").tolist()
                    d["version"] = int(meta.get("version", -1))
            else:
                d = json.loads(path.read_text())
            return cls.from_dict(d)
        except Exception as err:  # safetensors raises its own SafetensorError
            if isinstance(err, FileNotFoundError | CorruptFileError):
                raise
            raise CorruptFileError(f"{path} is not a valid causal trace: {err}") from err

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CausalTrace):
            return NotImplemented
        return all(
            bool(torch.equal(getattr(self, f.name), getattr(other, f.name)))
            if f.name == "scores" else getattr(self, f.name) == getattr(other, f.name)
            for f in fields(self)) and self.scores.shape == other.scores.shape

    __hash__ = None  # type: ignore[assignment]
