"""Hyperparameter dataclasses and the named presets that the papers publish."""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["HyperParams", "list_presets", "load_preset_file"]

H = TypeVar("H", bound="HyperParams")


def load_preset_file(method: str) -> dict[str, dict[str, Any]]:
    """All named presets of ``method`` from ``lightning_rome/presets/{method}.yaml``."""
    try:
        text = resources.files("lightning_rome.presets").joinpath(f"{method}.yaml").read_text()
    except FileNotFoundError:
        return {}
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset file for {method!r} must map preset names to settings")
    return data


def list_presets(method: str) -> list[str]:
    return sorted(load_preset_file(method))


@dataclasses.dataclass
class HyperParams:
    """Base class: conversion to and from dicts, YAML files and named presets.

    Subclasses set ``METHOD`` (the preset file's name) and define their fields.
    """

    METHOD = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[H], d: dict[str, Any]) -> H:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls: type[H], path: str | os.PathLike[str]) -> H:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of {cls.__name__} fields")
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls: type[H], name: str, **overrides: Any) -> H:
        """A named preset (e.g. ``"gpt2-xl"``), with fields overridden by keyword."""
        presets = load_preset_file(cls.METHOD)
        if name not in presets:
            raise ValueError(f"unknown {cls.METHOD} preset {name!r}; known: {sorted(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    @classmethod
    def resolve(cls: type[H], hparams: H | dict[str, Any] | str | os.PathLike[str] | None,
                ) -> H:
        """Accept an instance, a dict, a preset name, or a path to a YAML file."""
        if hparams is None:
            return cls()
        if isinstance(hparams, cls):
            return hparams
        if isinstance(hparams, dict):
            return cls.from_dict(hparams)
        if isinstance(hparams, str | os.PathLike) and str(hparams).endswith((".yaml", ".yml")):
            return cls.from_yaml(hparams)
        if isinstance(hparams, str):
            return cls.from_preset(hparams)
        raise TypeError(f"cannot make {cls.__name__} from {type(hparams).__name__}")
