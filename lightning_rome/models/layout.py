"""Where the parts of each Hugging Face causal LM live, as module-name templates."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

__all__ = ["LAYOUTS", "ModelLayout", "UnknownModelFamilyError", "get_layout", "register_layout"]


class UnknownModelFamilyError(ValueError):
    """The model's ``config.model_type`` has no registered :class:`ModelLayout`."""


@dataclass(frozen=True)
class ModelLayout:
    """Module-name templates for one model family; ``{}`` stands for the layer index.

    Attributes:
        family: the ``config.model_type`` this layout is for.
        blocks: the ``nn.ModuleList`` of transformer blocks.
        mlp_in: the MLP's input projection ``W_in`` (for gated MLPs, the up projection).
        mlp_out: the MLP's output projection ``W_out``, the rewrite target of ROME and MEMIT.
        mlp: the whole MLP (its output is ``m^l``).
        attn: the whole attention module (its first output is ``a^l``).
        attn_out: the attention's output projection.
        embed: the token embedding.
        final_norm: the norm before the LM head.
        lm_head: the unembedding.
        n_layers_attr: candidate names of the layer count in the model's config.
    """

    family: str
    blocks: str
    mlp_in: str
    mlp_out: str
    mlp: str
    attn: str
    attn_out: str
    embed: str
    final_norm: str
    lm_head: str
    n_layers_attr: tuple[str, ...] = ("num_hidden_layers", "n_layer")

    def block(self, layer: int) -> str:
        """The name of block ``layer`` (its output is the residual stream ``h^l``)."""
        return f"{self.blocks}.{layer}"

    def name(self, part: str, layer: int | None = None) -> str:
        """The module name of ``part`` (a field name such as ``"mlp_out"``, or ``"block"``)."""
        if part == "block":
            if layer is None:
                raise ValueError("part 'block' needs a layer index")
            return self.block(layer)
        template = getattr(self, part, None)
        if not isinstance(template, str) or part in ("family",):
            raise ValueError(f"unknown layout part {part!r}; expected one of {self.parts()}")
        if "{}" in template:
            if layer is None:
                raise ValueError(f"layout part {part!r} is per layer: give a layer index")
            return template.format(layer)
        return template

    @staticmethod
    def parts() -> list[str]:
        return ["block"] + [f.name for f in fields(ModelLayout) if f.name not in
                            ("family", "blocks", "n_layers_attr")]

    def n_layers(self, model: nn.Module) -> int:
        """The number of transformer blocks."""
        config = getattr(model, "config", None)
        for attr in self.n_layers_attr:
            if config is not None and isinstance(getattr(config, attr, None), int):
                return int(getattr(config, attr))
        return len(model.get_submodule(self.blocks))

    def check_layer(self, model: nn.Module, layer: int) -> int:
        """Return ``layer`` if it is a valid block index, else raise ``IndexError``."""
        n = self.n_layers(model)
        # numpy and other integer types count as ints (they would otherwise be reported as out
        # of range); bools and floats do not.
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < n:
            raise IndexError(f"layer {layer!r} is out of range: this {self.family} model has "
                             f"{n} layers (0..{n - 1})")
        return int(layer)

    def module(self, model: nn.Module, part: str, layer: int | None = None) -> nn.Module:
        """The module for ``part`` at ``layer``, checking the layer index."""
        if layer is not None:
            self.check_layer(model, layer)
        try:
            return model.get_submodule(self.name(part, layer))
        except AttributeError:
            fallback = {"lm_head": "get_output_embeddings", "embed": "get_input_embeddings"}
            if part in fallback and hasattr(model, fallback[part]):
                module = getattr(model, fallback[part])()
                if module is not None:
                    return module
            raise


_GPT2 = ModelLayout(
    family="gpt2",
    blocks="transformer.h",
    mlp_in="transformer.h.{}.mlp.c_fc",
    mlp_out="transformer.h.{}.mlp.c_proj",
    mlp="transformer.h.{}.mlp",
    attn="transformer.h.{}.attn",
    attn_out="transformer.h.{}.attn.c_proj",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
)
_LLAMA = ModelLayout(
    family="llama",
    blocks="model.layers",
    mlp_in="model.layers.{}.mlp.up_proj",
    mlp_out="model.layers.{}.mlp.down_proj",
    mlp="model.layers.{}.mlp",
    attn="model.layers.{}.self_attn",
    attn_out="model.layers.{}.self_attn.o_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

LAYOUTS: dict[str, ModelLayout] = {
    "gpt2": _GPT2,
    "gptj": replace(
        _GPT2,
        family="gptj",
        mlp_in="transformer.h.{}.mlp.fc_in",
        mlp_out="transformer.h.{}.mlp.fc_out",
        attn_out="transformer.h.{}.attn.out_proj",
    ),
    "gpt_neo": replace(
        _GPT2,
        family="gpt_neo",
        attn="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.attention.out_proj",
        n_layers_attr=("num_layers", "num_hidden_layers"),
    ),
    "gpt_neox": ModelLayout(
        family="gpt_neox",
        blocks="gpt_neox.layers",
        mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        mlp="gpt_neox.layers.{}.mlp",
        attn="gpt_neox.layers.{}.attention",
        attn_out="gpt_neox.layers.{}.attention.dense",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # "embed_out" before transformers 5; module() falls back
    ),
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, family="mistral"),
    "qwen2": replace(_LLAMA, family="qwen2"),
    "phi": replace(
        _LLAMA,
        family="phi",
        mlp_in="model.layers.{}.mlp.fc1",
        mlp_out="model.layers.{}.mlp.fc2",
        attn_out="model.layers.{}.self_attn.dense",
        final_norm="model.final_layernorm",
    ),
}


def register_layout(layout: ModelLayout, *, overwrite: bool = False) -> None:
    """Register a layout for a new ``config.model_type``."""
    if layout.family in LAYOUTS and not overwrite:
        raise ValueError(f"a layout for {layout.family!r} exists; pass overwrite=True")
    LAYOUTS[layout.family] = layout


def get_layout(model: nn.Module, override: ModelLayout | dict[str, Any] | str | None = None,
               ) -> ModelLayout:
    """Resolve the layout of ``model`` from ``config.model_type``.

    Args:
        model: a Hugging Face causal LM.
        override: a full :class:`ModelLayout`, a family name to use instead of the model's, or a
            dict of fields that replace those of the resolved layout.

    Raises:
        UnknownModelFamilyError: the family has no layout (the message lists the known ones).
    """
    if isinstance(override, ModelLayout):
        return override
    config = getattr(model, "config", None)
    family = override if isinstance(override, str) else getattr(config, "model_type", None)
    if family not in LAYOUTS:
        raise UnknownModelFamilyError(
            f"unknown model family {family!r}: known families are {sorted(LAYOUTS)}; pass a "
            "ModelLayout (or a dict of module-name templates) as the layout override"
        )
    layout = LAYOUTS[family]
    if isinstance(override, dict):
        # Name a misspelt field instead of dataclasses.replace's bare TypeError.
        known = [f.name for f in fields(ModelLayout)]
        unknown = sorted(set(override) - set(known))
        if unknown:
            raise ValueError(f"unknown layout field(s) {unknown} in the override; expected some "
                             f"of {known}")
        layout = replace(layout, **override)
    return layout
