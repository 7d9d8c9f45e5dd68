"""lightning-rome: causal tracing, ROME, MEMIT and knowledge-editing baselines for PyTorch
Lightning."""

from lightning_rome.models import ModelLayout, get_layout, load_model
from lightning_rome.patches import LowRankDelta, WeightPatch
from lightning_rome.requests import EditRequest

__version__ = "0.1.0"

__all__ = [
    "EditRequest",
    "LowRankDelta",
    "ModelLayout",
    "WeightPatch",
    "__version__",
    "get_layout",
    "load_model",
]
