"""LightningModules: trainable editors (FT, FT+L, MEND, KE), the evaluator, the sequential-editing
benchmark, the causal tracer and the distributed statistics job."""

from lightning_rome.modules.evaluator import EditEvaluator, evaluate_cases, evaluate_sequential
from lightning_rome.modules.ft import FTModule
from lightning_rome.modules.hypernet import HypernetworkModule
from lightning_rome.modules.ke import KEModule
from lightning_rome.modules.mend import MENDModule
from lightning_rome.modules.sequential import SequentialEditBenchmark
from lightning_rome.modules.stats import SecondMomentModule, compute_second_moments_distributed
from lightning_rome.modules.tracer import CausalTracer

__all__ = [
    "CausalTracer",
    "EditEvaluator",
    "FTModule",
    "HypernetworkModule",
    "KEModule",
    "MENDModule",
    "SecondMomentModule",
    "SequentialEditBenchmark",
    "compute_second_moments_distributed",
    "evaluate_cases",
    "evaluate_sequential",
]
