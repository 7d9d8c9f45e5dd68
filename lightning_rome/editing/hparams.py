"""Hyperparameter dataclasses and the named presets that the papers publish."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

__all__ = ["FINITE", "INT", "NONNEG", "POSITIVE", "POSITIVE_INT", "HyperParams", "Num",
           "list_presets", "load_preset_file"]

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


@dataclasses.dataclass(frozen=True)
class Num:
    """The allowed values of one numeric hyperparameter: an ``int`` (``integer``) or a finite
    real number (an ``int`` is accepted for a real), within ``[low, high]`` (``low_open`` /
    ``high_open`` exclude the bound), ``None`` when ``optional``. ``depth`` 1 is a list of such
    numbers, 2 a list of lists of them (e.g. ``[[length, count], ...]``).

    Example:
        >>> Num(low=0, low_open=True).describe()
        'a finite number > 0'
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    depth: int = 0

    def describe(self) -> str:
        what = "an integer" if self.integer else "a finite number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = f"{what} {' and '.join(bounds)}".rstrip()
        text = ["", "a list of ", "a list of lists of "][self.depth] + (
            text if not self.depth else text.replace("an integer", "integers").replace(
                "a finite number", "finite numbers"))
        return f"{text} or None" if self.optional else text

    def problem(self, value: Any, depth: int | None = None) -> str | None:
        """Why ``value`` is not allowed (``None``: it is)."""
        depth = self.depth if depth is None else depth
        if value is None and depth == self.depth:
            return None if self.optional else "it may not be None"
        if depth:
            if not isinstance(value, list | tuple):
                return f"got {type(value).__name__} {value!r}, not a list"
            return next((p for v in value if (p := self.problem(v, depth - 1))), None)
        if isinstance(value, str):
            hint = ""
            try:
                float(value)
                hint = (" (YAML reads a number without a dot in its mantissa, e.g. 1e-3, as "
                        "text: write 1.0e-3)")
            except ValueError:
                pass
            return f"got the string {value!r}{hint}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"got {type(value).__name__} {value!r}"
        if self.integer and not isinstance(value, int):
            return f"got {value!r}, not an integer"
        if not math.isfinite(value):
            return f"got {value!r}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"got {value!r}"
        if self.high is not None and (value > self.high or (
                self.high_open and value == self.high)):
            return f"got {value!r}"
        return None


FINITE = Num()
NONNEG = Num(low=0)
POSITIVE = Num(low=0, low_open=True)
INT = Num(integer=True)
POSITIVE_INT = Num(low=1, integer=True)


@dataclasses.dataclass
class HyperParams:
    """Base class: conversion to and from dicts, YAML files and named presets, and the range
    check of every numeric field.

    Subclasses set ``METHOD`` (the preset file's name), define their fields, and list every
    numeric field in ``RANGES`` (``{field: Num(...)}``); the check runs at construction, before
    a subclass's own ``__post_init__`` checks (which call ``super().__post_init__()`` first).
    """

    METHOD = ""
    RANGES: ClassVar[Mapping[str, Num]] = {}

    def __post_init__(self) -> None:
        """Raise ``ValueError`` naming the first numeric field out of its range."""
        for name, spec in self.RANGES.items():
            problem = spec.problem(getattr(self, name))
            if problem is not None:
                raise ValueError(f"{type(self).__name__}.{name} must be {spec.describe()}; "
                                 f"{problem}")

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
