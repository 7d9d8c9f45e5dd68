"""Lightning callbacks: edits applied during a Trainer run, and trace logging."""

from lightning_rome.callbacks.edit import (
    EditorCallback,
    MEMITCallback,
    ROMECallback,
    load_requests,
)
from lightning_rome.callbacks.evaluation import EditEvaluation
from lightning_rome.callbacks.trace import CausalTraceCallback

__all__ = ["CausalTraceCallback", "EditEvaluation", "EditorCallback", "MEMITCallback",
           "ROMECallback", "load_requests"]
