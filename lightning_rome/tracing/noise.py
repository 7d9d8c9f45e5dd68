"""How the subject is corrupted in the corrupted run of causal tracing.

The paper adds Gaussian noise ``ε ~ N(0, ν²)`` to the token embeddings of every subject token,
right after the embedding layer, with ``ν = 3 ×`` the standard deviation of subject-token
embeddings measured over a sample of subjects. The ROME code also offers uniform noise and
replacing the subject by another one. All three are here:

* :class:`GaussianNoise` — ``ε ~ N(0, ν²)`` added to the subject's embeddings.
* :class:`UniformNoise` — ``ε ~ U(−ν, ν)`` added to the subject's embeddings.
* :class:`SubjectReplacement` — the subject's embeddings are replaced by those of another
  subject with the same number of tokens in the prompt (one drawn per noise sample).

``ν`` is either fixed (``nu=0.1`` is the ACL draft's value) or ``k ×`` the empirical standard
deviation measured by :func:`subject_embedding_std`. Nothing is cached between calls: the
standard deviation depends on the model's current embedding weights, which training changes, so
measure it once with :meth:`GaussianNoise.from_subjects` and reuse the resulting object when you
trace many prompts of a dataset.

Every draw comes from a seeded ``torch.Generator`` on the CPU, so the same seed gives the same
corruption on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.models import ModelLayout, get_layout
from lightning_rome.tokens import encode_prompt, fill, subject_span

__all__ = [
    "Corruption",
    "GaussianNoise",
    "Noise",
    "NoiseLike",
    "SubjectReplacement",
    "UniformNoise",
    "resolve_noise",
    "subject_embedding_std",
]


@dataclass
class Corruption:
    """One drawn corruption of the subject's embeddings.

    Attributes:
        values: ``(S, n_subject_tokens, d)`` on the CPU, one slice per noise sample.
        replace: ``True`` if ``values`` replace the subject's embeddings, ``False`` if they are
            added to them.
        description: a JSON-serialisable description (type, ν, the replacement subjects).
    """

    values: Tensor
    replace: bool
    description: dict[str, Any]

    def apply(self, x: Tensor, span: tuple[int, int], samples: Tensor) -> Tensor:
        """Corrupt the subject tokens of the embedding output ``x`` out of place.

        Args:
            x: ``(B, T, d)``, the embedding layer's output.
            span: the subject's token span ``[b, e)``.
            samples: ``(B,)``, the noise sample of each row; ``-1`` leaves a row clean.
        """
        b, e = span
        samples = samples.cpu()
        noisy = (samples >= 0).nonzero().flatten()  # (n,)
        if noisy.numel() == 0:
            return x
        x = x.clone()
        rows = noisy.to(x.device)
        eps = self.values[samples[noisy]].to(device=x.device, dtype=x.dtype)  # (n, n_subj, d)
        x[rows, b:e] = eps if self.replace else x[rows, b:e] + eps
        return x


class Noise(Protocol):
    """Anything that can draw a :class:`Corruption` for one prompt."""

    def draw(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, template: str,
             subject: str, samples: int, generator: torch.Generator,
             layout: ModelLayout | None = None) -> Corruption:
        ...


def _embed(model: nn.Module, layout: ModelLayout, ids: Sequence[int]) -> Tensor:
    """The embedding-layer output for ``ids``: ``(n, d)``."""
    embed = layout.module(model, "embed")
    device = next(model.parameters()).device
    with torch.no_grad():
        return embed(torch.as_tensor(list(ids), dtype=torch.long, device=device)[None])[0]


def subject_embedding_std(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                          subjects: Sequence[str], layout: ModelLayout | None = None) -> float:
    """The empirical standard deviation of the subjects' token embeddings.

    As in the paper's code, each subject is tokenized on its own (without special tokens), its
    tokens are embedded by the model's embedding layer, and the standard deviation is taken over
    every element of every subject's embeddings together (in float64).

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        subjects: the subjects to measure over, e.g. those of the known-facts dataset.
        layout: a layout override (default: resolved from the model).

    Returns:
        ``σ`` as a float. Nothing is cached: call it again after the embeddings change.

    Raises:
        ValueError: no subjects, or the subjects have fewer than two embedding values.
    """
    subjects = [s for s in subjects if isinstance(s, str) and s.strip()]
    if not subjects:
        raise ValueError("subject_embedding_std needs at least one non-empty subject")
    layout = layout or get_layout(model)
    rows = []
    for s in subjects:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if ids:
            rows.append(_embed(model, layout, ids).double())  # (n_s, d)
    data = torch.cat(rows) if rows else torch.empty(0)
    if data.numel() < 2:
        raise ValueError("the subjects tokenize to too few tokens to measure a standard deviation")
    return float(data.std())


def _check_scale(nu: float | None, k: float) -> None:
    if nu is not None and (not math.isfinite(nu) or nu < 0):
        raise ValueError(f"the noise scale nu must be a finite number >= 0, got {nu!r}")
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"the noise multiplier k must be a finite number >= 0, got {k!r}")


@dataclass(frozen=True)
class _ScaledNoise:
    nu: float | None = None
    k: float = 3.0
    subjects: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_scale(self.nu, self.k)
        if self.subjects is not None:
            object.__setattr__(self, "subjects", tuple(self.subjects))

    def scale(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, subject: str,
              layout: ModelLayout | None = None) -> float:
        """``ν``: fixed, or ``k ×`` the std over ``subjects`` (default: the traced subject)."""
        if self.nu is not None:
            return float(self.nu)
        return self.k * subject_embedding_std(model, tokenizer, self.subjects or (subject,),
                                              layout)

    @classmethod
    def from_subjects(cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                      subjects: Sequence[str], k: float = 3.0,
                      layout: ModelLayout | None = None) -> Any:
        """Measure ``ν = k × σ`` over ``subjects`` once and return a noise with that fixed ν."""
        return cls(nu=k * subject_embedding_std(model, tokenizer, subjects, layout), k=k)

    def _draw_unit(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def draw(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, template: str,
             subject: str, samples: int, generator: torch.Generator,
             layout: ModelLayout | None = None) -> Corruption:
        layout = layout or get_layout(model)
        nu = self.scale(model, tokenizer, subject, layout)
        b, e = subject_span(tokenizer, template, subject)
        d = _embed(model, layout, [0]).shape[-1]
        unit = self._draw_unit((samples, e - b, d), generator)  # (S, n, d), float32 on CPU
        return Corruption(nu * unit, replace=False,
                          description={"type": self.kind, "nu": nu, "k": self.k if self.nu is None
                                       else None})

    kind = "noise"


@dataclass(frozen=True)
class GaussianNoise(_ScaledNoise):
    """Add ``ε ~ N(0, ν²)`` to each subject token's embedding (the paper's default).

    Args:
        nu: a fixed ``ν``; ``None`` (the default) measures ``ν = k × σ`` at each call, with ``σ``
            from :func:`subject_embedding_std` over ``subjects``, or over the traced subject
            alone when ``subjects`` is not given. For a dataset, prefer
            ``GaussianNoise.from_subjects(model, tokenizer, all_subjects)``, which measures once.
        k: the multiplier (3 in the paper).
        subjects: the subjects to measure ``σ`` over.
    """

    kind = "gaussian"

    def _draw_unit(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class UniformNoise(_ScaledNoise):
    """Add ``ε ~ U(−ν, ν)`` to each subject token's embedding (the ROME code's uniform option).

    ``nu``, ``k`` and ``subjects`` mean what they mean for :class:`GaussianNoise`.
    """

    kind = "uniform"

    def _draw_unit(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1


@dataclass(frozen=True)
class SubjectReplacement:
    """Replace the subject's embeddings by those of another subject.

    For each noise sample one subject is drawn (uniformly, from the seeded generator) among the
    candidates that take the same number of tokens as the traced subject in the same prompt, so
    every position keeps its meaning. The traced subject itself is never drawn.

    Args:
        subjects: the candidate replacement subjects.

    Raises:
        ValueError (at draw time): no candidate has the traced subject's token count.
    """

    subjects: tuple[str, ...]
    kind = "replace"

    def __post_init__(self) -> None:
        object.__setattr__(self, "subjects", tuple(self.subjects))
        if not self.subjects:
            raise ValueError("SubjectReplacement needs at least one candidate subject")

    def draw(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, template: str,
             subject: str, samples: int, generator: torch.Generator,
             layout: ModelLayout | None = None) -> Corruption:
        layout = layout or get_layout(model)
        b, e = subject_span(tokenizer, template, subject)
        ids = encode_prompt(tokenizer, fill(template, subject)[0])
        candidates: list[tuple[str, list[int]]] = []
        for other in dict.fromkeys(self.subjects):
            if other == subject or not other.strip():
                continue
            o_ids = encode_prompt(tokenizer, fill(template, other)[0])
            ob, oe = subject_span(tokenizer, template, other)
            if (ob, oe) == (b, e) and o_ids[:b] == ids[:b] and o_ids[e:] == ids[e:]:
                candidates.append((other, o_ids[b:e]))
        if not candidates:
            raise ValueError(
                f"no replacement subject takes the same {e - b} token(s) as {subject!r} in "
                f"{template!r}; give subjects of the same token length")
        pick = torch.randint(len(candidates), (samples,), generator=generator).tolist()
        values = torch.stack([_embed(model, layout, candidates[p][1]).float().cpu()
                              for p in pick])  # (S, n, d)
        return Corruption(values, replace=True, description={
            "type": self.kind, "subjects": [candidates[p][0] for p in pick]})


NoiseLike = GaussianNoise | UniformNoise | SubjectReplacement | float | int | None


def resolve_noise(noise: NoiseLike | Noise) -> Noise:
    """``None`` → ``GaussianNoise()`` (``ν = 3σ``); a number → ``GaussianNoise(nu=number)``."""
    if noise is None:
        return GaussianNoise()
    if isinstance(noise, bool):
        raise TypeError("noise must be a Noise object or a number, not a bool")
    if isinstance(noise, int | float):
        return GaussianNoise(nu=float(noise))
    if not hasattr(noise, "draw"):
        raise TypeError(f"noise must be GaussianNoise, UniformNoise, SubjectReplacement or a "
                        f"number, got {type(noise).__name__}")
    return noise
