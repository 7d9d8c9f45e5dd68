"""LightningModules: trainable editors (FT, FT+L, MEND, KE), the evaluator and the tracer."""

from lightning_rome.modules.evaluator import EditEvaluator, evaluate_cases, evaluate_sequential
from lightning_rome.modules.ft import FTModule
from lightning_rome.modules.ke import KEModule
from lightning_rome.modules.mend import HypernetworkModule, MENDModule
from lightning_rome.modules.sequential import SequentialEditBenchmark

__all__ = ["EditEvaluator", "FTModule", "HypernetworkModule", "KEModule", "MENDModule", "SequentialEditBenchmark", "evaluate_cases", "evaluate_sequential"]
