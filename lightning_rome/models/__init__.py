"""Model access: layouts, canonical weights and loading."""

from lightning_rome.models.layout import (
    LAYOUTS,
    ModelLayout,
    UnknownModelFamilyError,
    get_layout,
    register_layout,
)
from lightning_rome.models.loading import (
    load_model,
    load_tokenizer,
    prepare_tokenizer,
    resolve_dtype,
)
from lightning_rome.models.weights import (
    canonical_weight,
    is_transposed,
    set_canonical_weight,
    weight_param_name,
)

__all__ = [
    "LAYOUTS",
    "ModelLayout",
    "UnknownModelFamilyError",
    "canonical_weight",
    "get_layout",
    "is_transposed",
    "load_model",
    "load_tokenizer",
    "prepare_tokenizer",
    "register_layout",
    "resolve_dtype",
    "set_canonical_weight",
    "weight_param_name",
]
