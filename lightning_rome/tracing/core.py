"""``trace`` and ``trace_all``: causal traces of one prompt (Meng et al. 2022, §2.1)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rome.models import ModelLayout, get_layout
from lightning_rome.models.checks import check_token_ids
from lightning_rome.models.hf_compat import probe_prefix_blocks, warn_once
from lightning_rome.models.modes import eval_mode
from lightning_rome.tokens import (
    SubjectNotFoundError,
    continuation_ids,
    decode_tokens,
    encode_prompt,
    fill,
    subject_span,
)
from lightning_rome.tracing.engine import (
    ENGINES,
    TraceSpec,
    make_cells,
    prefix_unsupported,
    run_clean_and_corrupted,
    score_cells,
)
from lightning_rome.tracing.noise import Noise, NoiseLike, resolve_noise
from lightning_rome.tracing.result import KINDS, SEVERABLE, CausalTrace

__all__ = [
    "AnswerMismatchWarning",
    "as_template",
    "parse_spec",
    "resolve_engine",
    "trace",
    "trace_all",
]

DEFAULT_BATCH_TOKENS = 16384


class AnswerMismatchWarning(UserWarning):
    """The model does not complete the prompt with the expected answer."""


def as_template(prompt: str, subject: str) -> str:
    """A template with ``{}`` for the subject, from a template or from a full text.

    A ``prompt`` containing ``{}`` is taken as a template. Otherwise the first occurrence of
    ``subject`` in ``prompt`` is where the subject is.

    Raises:
        SubjectNotFoundError: the subject is empty or does not occur in the prompt.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the prompt is empty: {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise SubjectNotFoundError(f"the subject is empty: {subject!r}")
    if "{}" in prompt:
        fill(prompt, subject)  # validates a single {}
        return prompt
    at = prompt.find(subject)
    if at < 0:
        raise SubjectNotFoundError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    return prompt[:at] + "{}" + prompt[at + len(subject):]


def parse_spec(spec: str | tuple[str, str | None] | TraceSpec) -> TraceSpec:
    """``"hidden"``, ``"mlp"``, ``"attn"``, ``"hidden/sever=mlp"`` or ``(kind, sever)``."""
    if isinstance(spec, TraceSpec):
        kind, sever = spec.kind, spec.sever
    elif isinstance(spec, tuple):
        kind, sever = spec
    elif isinstance(spec, str):
        kind, _, rest = spec.partition("/sever=")
        sever = rest or None
    else:
        raise TypeError(f"a trace kind is a string or (kind, sever), got {spec!r}")
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r}: expected one of {KINDS}")
    if sever is not None and (kind != "hidden" or sever not in SEVERABLE):
        raise ValueError(f"sever must be one of {SEVERABLE} and only with kind='hidden'; got "
                         f"kind={kind!r}, sever={sever!r}")
    return TraceSpec(kind, sever)


def resolve_engine(model: nn.Module, layout: ModelLayout, engine: str) -> str:
    """``auto`` → ``prefix`` where supported, else ``batched``; checks explicit choices.

    ``prefix`` (explicit or from ``auto``) on a supported architecture whose blocks the
    installed transformers does not let the engine call (the probe of
    :func:`~lightning_rome.models.hf_compat.probe_prefix_blocks` fails) becomes ``batched``,
    which gives the same scores through the public ``model(...)`` only, with one
    :class:`~lightning_rome.models.hf_compat.HFCompatWarning` per process.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine in ("naive", "batched"):
        return engine
    reason = prefix_unsupported(model, layout)
    if reason:
        if engine == "prefix":
            raise ValueError(reason)
        return "batched"
    probe = probe_prefix_blocks(model, layout)
    if probe is None:
        return "prefix"
    import transformers

    warn_once(f"causal tracing: the prefix engine cannot call the blocks of this "
              f"{layout.family} model with transformers {transformers.__version__} ({probe}); "
              "using the batched engine instead (same scores, slower)")
    return "batched"


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def trace_all(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    kinds: Sequence[str | tuple[str, str | None] | TraceSpec] = KINDS,
    *,
    window: int = 10,
    samples: int = 10,
    noise: NoiseLike | Noise = None,
    answer: str | int | None = None,
    seed: int = 0,
    engine: str = "auto",
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    layout: ModelLayout | None = None,
    _stacklevel: int = 2,
) -> dict[str, CausalTrace]:
    """Several causal traces of one prompt that share the clean and corrupted runs.

    Args:
        model: a Hugging Face causal LM (its train/eval flags are restored afterwards).
        tokenizer: its tokenizer.
        prompt: a template with ``{}`` for the subject, or the full text containing
            ``subject``.
        subject: the subject whose token embeddings are corrupted.
        kinds: which grids: ``"hidden"``, ``"mlp"``, ``"attn"``, and severed hidden traces
            ``"hidden/sever=mlp"`` / ``"hidden/sever=attn"`` (or ``(kind, sever)`` tuples).
        window: layers restored together for ``mlp``/``attn`` (1 … number of layers).
        samples: noise samples ``S`` per prompt.
        noise: a :class:`GaussianNoise` (default ``ν = 3σ``), :class:`UniformNoise`,
            :class:`SubjectReplacement`, or a number ``ν``.
        answer: the expected answer ``o``: a string (the first token of its continuation
            tokens, :func:`~lightning_rome.tokens.continuation_ids`, is scored, as in the paper)
            or a token id. ``None`` uses the model's own greedy prediction.
        seed: seeds the ``torch.Generator`` of the noise draws.
        engine: ``auto`` (``prefix`` where supported, else ``batched``), ``prefix``,
            ``batched`` or ``naive`` (one forward pass per cell, the reference). All give the
            same scores; ``prefix`` on an architecture it does not support is an error, and
            where the installed transformers fails its probe it runs as ``batched`` (one
            :class:`~lightning_rome.models.hf_compat.HFCompatWarning`).
        batch_tokens: the most (rows × tokens) per forward pass, bounding memory.
        layout: a layout override.

    Returns:
        ``{trace.label: CausalTrace}``, in the order of ``kinds``.

    Raises:
        SubjectNotFoundError: the subject is not in the prompt.
        ValueError: an unknown kind or engine, a window outside ``[1, n_layers]``, samples < 1.

    Warns:
        AnswerMismatchWarning: the model's greedy prediction is not ``answer``'s first token
            (the clean probability of the answer is in the message).
    """
    layout = layout or get_layout(model)
    specs = [parse_spec(k) for k in kinds]
    if not specs:
        raise ValueError("kinds is empty: ask for at least one of " + ", ".join(KINDS))
    if len({s.label for s in specs}) != len(specs):
        raise ValueError(f"kinds has duplicates: {[s.label for s in specs]}")
    L = layout.n_layers(model)
    # The window only matters for MLP and attention traces; there it must fit in the model.
    _check_int("window", window, 1, L if any(s.kind != "hidden" for s in specs) else None)
    _check_int("samples", samples, 1)
    _check_int("batch_tokens", batch_tokens, 1)
    engine = resolve_engine(model, layout, engine)
    noise_obj = resolve_noise(noise)
    for name, value in (("prompt", prompt), ("subject", subject)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r}")
    template = as_template(prompt, subject)
    text, _ = fill(template, subject)
    span = subject_span(tokenizer, template, subject)
    ids = encode_prompt(tokenizer, text)
    check_token_ids(model, [ids], what=f"prompt {text[:60]!r}")
    if answer is None or isinstance(answer, str):
        answer_id = None if answer is None else continuation_ids(tokenizer, answer)[0]
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(tokenizer):
        answer_id = answer
    else:
        raise ValueError(f"answer must be a string, a token id in [0, {len(tokenizer)}) or None, "
                         f"got {answer!r}")

    generator = torch.Generator().manual_seed(int(seed))
    with eval_mode(model), torch.no_grad():
        corruption = noise_obj.draw(model, tokenizer, template, subject, samples, generator,
                                    layout=layout)
        runs = run_clean_and_corrupted(model, layout, ids, span, corruption, answer_id,
                                       keep_kv=engine == "prefix")
        if not (math.isfinite(float(runs.high_score)) and math.isfinite(float(runs.low_score))):
            raise FloatingPointError(
                f"the model's output on {text[:60]!r} is NaN or inf (clean P = "
                f"{runs.high_score}, corrupted P = {runs.low_score}): check its weights and dtype")
        if answer is not None and runs.predicted_id != runs.answer_id:
            warnings.warn(
                f"the model does not complete {text!r} with {answer!r}: its greedy prediction "
                f"is {tokenizer.decode([runs.predicted_id])!r}; the clean probability of "
                f"{tokenizer.decode([runs.answer_id])!r} is {runs.high_score:.4g}",
                AnswerMismatchWarning, stacklevel=_stacklevel)
        T = len(ids)
        cells = make_cells(specs, T, L, window)
        scores = score_cells(model, layout, runs, cells, engine, batch_tokens)
    scores = scores.view(len(specs), T, L)

    tokens = decode_tokens(tokenizer, ids)
    answer_text = tokenizer.decode([runs.answer_id])
    predicted = tokenizer.decode([runs.predicted_id])
    return {
        spec.label: CausalTrace(
            scores=scores[k], high_score=runs.high_score, low_score=runs.low_score,
            tokens=tokens, input_ids=ids, subject_range=span, answer=answer_text,
            answer_id=runs.answer_id, kind=spec.kind, window=window, sever=spec.sever,
            prompt=text, subject=subject, predicted=predicted,
            noise=dict(corruption.description), samples=samples, seed=int(seed))
        for k, spec in enumerate(specs)
    }


def trace(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    kind: str = "hidden",
    *,
    sever: str | None = None,
    window: int = 10,
    samples: int = 10,
    noise: NoiseLike | Noise = None,
    answer: str | int | None = None,
    seed: int = 0,
    engine: str = "auto",
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    layout: ModelLayout | None = None,
) -> CausalTrace:
    """The causal trace of one prompt: one ``(tokens × layers)`` grid.

    ``kind`` is ``"hidden"`` (restore ``h_i^l``), ``"mlp"`` or ``"attn"`` (restore the MLP or
    attention outputs at token ``i`` for ``window`` layers around ``l``). ``sever="mlp"`` or
    ``"attn"`` (hidden only) freezes the later MLP or attention outputs at token ``i`` to their
    corrupted values, the paper's severed paths. The other arguments are those of
    :func:`trace_all`.

    Example:
        >>> t = trace(model, tok, "{} is located in the city of", "The Space Needle", "mlp")
        >>> t.scores.shape  # (tokens, layers)
        >>> t.high_score, t.low_score  # P[o] clean, P*[o] corrupted
    """
    spec = parse_spec((kind, sever))
    return next(iter(trace_all(
        model, tokenizer, prompt, subject, [spec], window=window, samples=samples, noise=noise,
        answer=answer, seed=seed, engine=engine, batch_tokens=batch_tokens,
        layout=layout, _stacklevel=3).values()))
