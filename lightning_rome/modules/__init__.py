"""LightningModules: trainable editors (FT, FT+L, MEND, KE), the evaluator and the tracer."""

from lightning_rome.modules.ft import FTModule

__all__ = ["FTModule"]
