"""Named hyperparameter presets (YAML), one file per method, and the choice of a default for a
model.

:func:`for_model` picks settings for a model when the user names none: the paper's preset for the
model's family and size where one exists (``gpt2-xl`` for a 48-layer GPT-2 of width 1,600, ...),
else settings derived from the model's depth, so that every layer is in range. It says what it
chose in one :class:`PresetNotice` warning; the CLI prints that line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["PresetChoice", "PresetNotice", "choose", "for_model", "preset_signature"]


class PresetNotice(UserWarning):
    """Which settings were chosen for a model whose hyperparameters were not given."""


# The architectures the named presets were published (or tuned) for:
# (model_type, layers, hidden size, vocabulary size or None for any).
_SIGNATURES: dict[str, tuple[str, int, int, int | None]] = {
    "gpt2-medium": ("gpt2", 24, 1024, None),
    "gpt2-large": ("gpt2", 36, 1280, None),
    "gpt2-xl": ("gpt2", 48, 1600, None),
    "gpt-j-6b": ("gptj", 28, 4096, None),
    "gpt-neox-20b": ("gpt_neox", 44, 6144, None),
    "llama-7b": ("llama", 32, 4096, None),
    "llama3-8b": ("llama", 32, 4096, 128256),
    # The package's own small test models (lightning_rome.testing).
    "fact-model": ("gpt2", 4, 96, 2048),
    "demo-model": ("gpt2", 4, 128, 4096),
}

#: Where ROME's layer sits in the published presets: GPT-2 XL 17 of 48 (0.35 of the depth).
_ROME_DEPTH = 0.35


@dataclass(frozen=True)
class PresetChoice:
    """What :func:`choose` picked.

    Attributes:
        method: the editing method (``rome``, ``memit``, ...).
        preset: the preset's name, or ``None`` for settings derived from the depth.
        settings: the hyperparameter fields (a dict for ``HyperParams.from_dict``).
        notice: one line saying what was chosen and how to choose otherwise.
    """

    method: str
    preset: str | None
    settings: dict[str, Any]
    notice: str


def preset_signature(model: nn.Module) -> tuple[str, int, int, int]:
    """``(model_type, layers, hidden size, vocabulary size)`` of ``model`` (``""``/0 if unknown)."""
    from lightning_rome.models import get_layout

    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or "")
    try:
        n_layers = get_layout(model).n_layers(model)
    except (ValueError, KeyError, AttributeError):
        n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    return model_type, n_layers, hidden, vocab


def _matching_preset(method: str, sig: tuple[str, int, int, int]) -> str | None:
    from lightning_rome.editing.hparams import load_preset_file

    names = load_preset_file(method)
    for name, (mtype, layers, hidden, vocab) in _SIGNATURES.items():
        if name in names and (mtype, layers, hidden) == sig[:3] and vocab in (None, sig[3]):
            return name
    return None


def _derived(method: str, n: int) -> dict[str, Any]:
    """Settings whose layers fit an ``n``-layer model, in the published presets' proportions."""
    layer = min(n - 1, round(_ROME_DEPTH * (n - 1)))
    if method == "rome":
        return {"layer": layer}
    if method in ("memit", "alphaedit"):
        # GPT-2 XL edits 5 of 48 layers ending at ROME's layer, GPT-J 6 of 28: about 1/9.
        count = max(1, min(layer + 1, round(n / 9)))
        return {"layers": list(range(layer - count + 1, layer + 1))}
    if method == "ft":
        return {"layers": [min(1, n - 1)]}  # the published FT edits layer 1
    if method == "ft-l":
        return {"layers": [0]}
    return {}  # KN: attributions over every layer by default


def choose(method: str, model: nn.Module) -> PresetChoice:
    """The default settings of ``method`` for ``model`` (see the module docstring)."""
    key = method.lower()
    sig = preset_signature(model)
    mtype, n, hidden, _ = sig
    what = f"{mtype or type(model).__name__} model, {n} layers, width {hidden}"
    name = _matching_preset(key, sig)
    if name is not None:
        from lightning_rome.editing.hparams import load_preset_file

        settings = dict(load_preset_file(key)[name])
        notice = (f"{key}: no hyperparameters given; using preset {name!r} for this {what} "
                  "(choose with --hparams / hparams=)")
        return PresetChoice(key, name, settings, notice)
    if n < 1:
        raise ValueError(f"cannot derive {key} settings for a model with {n} layers; pass "
                         "--hparams (a preset name or a YAML file)")
    settings = _derived(key, n)
    shown = ", ".join(f"{k} {v}" for k, v in settings.items()) or "the method's defaults"
    notice = (f"{key}: no hyperparameters given and no preset for this {what}; using settings "
              f"derived from its depth: {shown} (choose with --hparams / hparams=)")
    return PresetChoice(key, None, settings, notice)


def for_model(method: str, model: nn.Module) -> dict[str, Any]:
    """The default hyperparameters of ``method`` for ``model``, as a dict that every editor
    accepts as ``hparams``; warns one :class:`PresetNotice` line saying what was chosen.

    Example:
        >>> rome = ROME(for_model("rome", model))   # gpt2-xl's preset on GPT-2 XL
    """
    choice = choose(method, model)
    warnings.warn(choice.notice, PresetNotice, stacklevel=2)
    return choice.settings
