"""Lightning callbacks: edits applied during a Trainer run, and trace logging."""

from lightning_rome.callbacks.edit import (
    EditCallback,
    EditorCallback,
    MEMITCallback,
    ROMECallback,
    load_requests,
)
from lightning_rome.callbacks.evaluation import EditEvaluation
from lightning_rome.callbacks.trace import CausalTraceCallback

__all__ = ["CausalTraceCallback", "EditCallback", "EditEvaluation", "EditorCallback", "MEMITCallback",
           "ROMECallback", "load_requests"]
