"""The Trainer-free evaluation core (no Lightning imports): the sequential-editing benchmark."""

from lightning_rome.evaluation.sequential import (
    RetainFact,
    SequentialInterrupt,
    SequentialResult,
    SequentialSettings,
    fact_model_benchmark,
    load_curve,
    run_key,
    run_sequential,
)

__all__ = [
    "RetainFact",
    "SequentialInterrupt",
    "SequentialResult",
    "SequentialSettings",
    "fact_model_benchmark",
    "load_curve",
    "run_key",
    "run_sequential",
]
