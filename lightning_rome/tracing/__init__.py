"""Causal tracing (Meng et al. 2022, §2): where a model stores a fact.

Core functions work on any Hugging Face causal LM without a Trainer::

    from lightning_rome.tracing import trace, trace_all, GaussianNoise, average_traces

    t = trace(model, tok, "{} is located in the city of", "The Space Needle", kind="mlp")
    t.plot()                      # the paper's heatmap
    t.save("space_needle.json")   # or .safetensors

For a dataset, measure the noise once, trace every prompt, and average::

    noise = GaussianNoise.from_subjects(model, tok, subjects)       # ν = 3σ
    traces = [trace(model, tok, p, s, "mlp", noise=noise) for p, s in facts]
    agg = average_traces(traces)   # AIE per token class and layer, ATE, 95% CIs
    layer = suggest_edit_layer(agg)

The Lightning side: :class:`lightning_rome.modules.CausalTracer` (a LightningModule for
``Trainer.predict``/``test`` over known facts, distributed across ranks) and
:class:`lightning_rome.callbacks.trace.CausalTraceCallback`.
"""

from lightning_rome.tracing.aggregate import (
    TOKEN_CLASSES,
    TraceAggregate,
    aggregate_effects,
    average_traces,
    class_effects,
    suggest_edit_layer,
    token_classes,
)
from lightning_rome.tracing.core import (
    AnswerMismatchWarning,
    as_template,
    trace,
    trace_all,
)
from lightning_rome.tracing.engine import ENGINES, window_layers
from lightning_rome.tracing.noise import (
    Corruption,
    GaussianNoise,
    SubjectReplacement,
    UniformNoise,
    subject_embedding_std,
)
from lightning_rome.tracing.result import KINDS, CausalTrace

__all__ = [
    "ENGINES",
    "KINDS",
    "TOKEN_CLASSES",
    "AnswerMismatchWarning",
    "CausalTrace",
    "Corruption",
    "GaussianNoise",
    "SubjectReplacement",
    "TraceAggregate",
    "UniformNoise",
    "aggregate_effects",
    "as_template",
    "average_traces",
    "class_effects",
    "subject_embedding_std",
    "suggest_edit_layer",
    "token_classes",
    "trace",
    "trace_all",
    "window_layers",
]

