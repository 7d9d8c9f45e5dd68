"""Lightning callbacks: edits applied during a Trainer run, and trace logging."""

from lightning_rome.callbacks.edit import (
    EditCallback,
    EditorCallback,
    MEMITCallback,
    ROMECallback,
    load_requests,
)

__all__ = ["EditCallback", "EditorCallback", "MEMITCallback", "ROMECallback", "load_requests"]
