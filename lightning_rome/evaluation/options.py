"""The options of an edit evaluation, written once: :class:`EvalOptions`.

The run loops (:func:`~lightning_rome.evaluation.evaluate`), the ``EditEvaluator`` module and the
``EditEvaluation`` callback all take their settings from one frozen :class:`EvalOptions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = ["GENERATION_DEFAULTS", "EvalOptions", "Kind", "Mode", "OnError"]

Kind = Literal["counterfact", "zsre"]
OnError = Literal["raise", "skip"]
Mode = Literal["independent", "sequential"]

#: Generation defaults of ROME's GE/RS evaluation: top-k = 5 sampling of 100 new tokens.
GENERATION_DEFAULTS: Mapping[str, Any] = MappingProxyType({"max_new_tokens": 100, "top_k": 5})


@dataclass(frozen=True)
class EvalOptions:
    """How the cases of an edit evaluation are run and measured.

    Args:
        mode: ``"independent"`` (each case edited on its own and reverted: the COUNTERFACT and
            zsRE tables) or ``"sequential"`` (the cases of a group edited one after another
            without reverting, then measured together: ROME's multiple-rewrites experiment).
        baseline: also measure the unedited model (the ``pre`` scores).
        generation: sample text from the cases' generation prompts, for GE and RS.
        generation_kwargs: for :func:`~lightning_rome.scoring.generate`, over
            :data:`GENERATION_DEFAULTS` (100 new tokens, top-k 5); the sampling is seeded per
            case.
        score_batch_size: rows per scoring forward pass (``None``: all at once).
        seed: the seed of the generation sampling.
        on_error: ``"raise"``: an exception in the editor, in applying its patch or in scoring
            stops the evaluation (after the model is restored); ``"skip"``: the case is recorded
            with ``status="error"`` and its message, and the evaluation goes on.
        verify_revert: check, with a checksum of every parameter and buffer, that the model is
            bit-identical to its start after every case (or group); costly for large models.

    Raises:
        ValueError: a value outside the choices above.
        TypeError: ``generation_kwargs`` not a mapping with string keys.

    Example:
        >>> opts = EvalOptions(generation=True, generation_kwargs={"max_new_tokens": 20})
        >>> opts.generation_settings()["max_new_tokens"], opts.generation_settings()["top_k"]
        (20, 5)
    """

    mode: Mode = "independent"
    baseline: bool = True
    generation: bool = False
    generation_kwargs: Mapping[str, Any] = field(default_factory=dict)
    score_batch_size: int | None = None
    seed: int = 0
    on_error: OnError = "raise"
    verify_revert: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("independent", "sequential"):
            raise ValueError(f"mode must be 'independent' or 'sequential', got {self.mode!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        for name in ("baseline", "generation", "verify_revert"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.score_batch_size is not None and (
                isinstance(self.score_batch_size, bool) or not isinstance(self.score_batch_size, int)
                or self.score_batch_size < 1):
            raise ValueError(f"score_batch_size must be None or an integer >= 1, got "
                             f"{self.score_batch_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        kw = self.generation_kwargs if self.generation_kwargs is not None else {}
        if not isinstance(kw, Mapping) or not all(isinstance(k, str) for k in kw):
            raise TypeError(f"generation_kwargs must be a mapping of keyword arguments, got "
                            f"{type(kw).__name__}")
        # A read-only copy: the options stay what they were when the run started.
        object.__setattr__(self, "generation_kwargs", MappingProxyType(dict(kw)))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A read-only mapping does not pickle (DDP spawn sends the options to every process):
        # rebuild from the fields, with the keyword arguments as a plain dict.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["generation_kwargs"] = dict(fields["generation_kwargs"])
        return (_rebuild_options, (type(self), fields))

    @classmethod
    def from_settings(cls, options: EvalOptions | None = None, **settings: Any) -> EvalOptions:
        """``options`` (default: the defaults) with the given fields replaced.

        Raises:
            TypeError: a setting that is not a field of :class:`EvalOptions`.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown evaluation option(s) {', '.join(unknown)}; the options "
                            f"are {', '.join(sorted(names))}")
        base = cls() if options is None else options
        if not isinstance(base, EvalOptions):
            raise TypeError(f"options must be an EvalOptions, got {type(base).__name__}")
        return dataclasses.replace(base, **settings) if settings else base

    def generation_settings(self) -> dict[str, Any]:
        """The keyword arguments of the generation calls: the defaults, then the user's."""
        return {**GENERATION_DEFAULTS, **self.generation_kwargs}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (``generation_kwargs`` with the defaults filled in), as it is
        recorded in a results folder's ``run.json``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["generation_kwargs"] = self.generation_settings()
        return out


def _rebuild_options(cls: type[EvalOptions], fields: dict[str, Any]) -> EvalOptions:
    return cls(**fields)
