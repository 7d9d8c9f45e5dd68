"""Issue 18, item 7: every numeric hyperparameter is checked (type, finite, range) when the
hyperparameters are built — from keywords, dicts, YAML files and presets with overrides — and
the message names the field."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from lightning_rome.editing import (
    FTHyperParams,
    HyperParams,
    KEHyperParams,
    KNHyperParams,
    MEMITHyperParams,
    MENDHyperParams,
    ROMEHyperParams,
    list_presets,
)
from lightning_rome.editing.ft import FTLHyperParams

ALL = [ROMEHyperParams, MEMITHyperParams, FTHyperParams, FTLHyperParams, KNHyperParams,
       MENDHyperParams, KEHyperParams]
NAN, INF = float("nan"), float("inf")

BAD = [
    (ROMEHyperParams, "clamp_norm_factor", NAN),
    (ROMEHyperParams, "clamp_norm_factor", 0),
    (ROMEHyperParams, "clamp_norm_factor", -1.0),
    (ROMEHyperParams, "clamp_norm_factor", INF),
    (ROMEHyperParams, "v_lr", 0),
    (ROMEHyperParams, "v_lr", NAN),
    (ROMEHyperParams, "v_weight_decay", -0.1),
    (ROMEHyperParams, "kl_factor", NAN),
    (ROMEHyperParams, "early_stop_loss", -1.0),
    (ROMEHyperParams, "mom2_n_samples", 0),
    (ROMEHyperParams, "v_num_grad_steps", 2.5),
    (ROMEHyperParams, "v_num_grad_steps", True),
    (ROMEHyperParams, "layer", "17"),
    (ROMEHyperParams, "context_template_lengths", [[5, 0]]),
    (ROMEHyperParams, "context_template_lengths", [[-1, 3]]),
    (MEMITHyperParams, "mom2_update_weight", 0),
    (MEMITHyperParams, "mom2_update_weight", NAN),
    (MEMITHyperParams, "z_batch_size", -1),
    (MEMITHyperParams, "z_batch_size", 0),
    (MEMITHyperParams, "key_batch_size", 0),
    (MEMITHyperParams, "clamp_norm_factor", NAN),
    (MEMITHyperParams, "v_lr", 0.0),
    (MEMITHyperParams, "layers", [0, 1.5]),
    (FTHyperParams, "num_steps", 0),
    (FTHyperParams, "lr", 0.0),
    (FTHyperParams, "lr", NAN),
    (FTHyperParams, "early_stop_loss", NAN),
    (FTHyperParams, "weight_decay", -1.0),
    (FTHyperParams, "norm_constraint", NAN),
    (FTLHyperParams, "norm_constraint", 0.0),
    (KNHyperParams, "steps", 0),
    (KNHyperParams, "adaptive_threshold", NAN),
    (KNHyperParams, "p", NAN),
    (KNHyperParams, "erase_scale", INF),
    (MENDHyperParams, "lr", 0.0),
    (MENDHyperParams, "edit_lr", NAN),
    (MENDHyperParams, "norm_eps", 0.0),
    (MENDHyperParams, "rank", 0),
    (MENDHyperParams, "c_loc", NAN),
    (KEHyperParams, "lr", -1e-3),
    (KEHyperParams, "init_gamma", NAN),
    (KEHyperParams, "margin", NAN),
    (KEHyperParams, "margin_start", -1.0),
    (KEHyperParams, "hidden", 0),
    (KEHyperParams, "lambda_init", INF),
]


@pytest.mark.parametrize(("cls", "field", "value"), BAD,
                         ids=[f"{c.__name__}-{f}-{v}" for c, f, v in BAD])
def test_bad_value_is_refused_naming_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        cls(**{field: value})
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        cls.from_dict({field: value})


@pytest.mark.parametrize(("cls", "field", "value"), [
    (ROMEHyperParams, "clamp_norm_factor", ".nan"),
    (ROMEHyperParams, "v_lr", "0"),
    (MEMITHyperParams, "mom2_update_weight", "0"),
    (MEMITHyperParams, "z_batch_size", "-1"),
    (FTHyperParams, "num_steps", "0"),
    (ROMEHyperParams, "v_lr", "1e-3"),  # YAML 1.1 reads this as the string "1e-3"
])
def test_bad_value_from_yaml_is_refused(cls, field, value, tmp_path):
    path = tmp_path / "hp.yaml"
    path.write_text(f"{field}: {value}\n")
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        cls.from_yaml(path)


def test_bad_override_of_a_preset_is_refused():
    with pytest.raises(ValueError, match="clamp_norm_factor"):
        ROMEHyperParams.from_preset("gpt2-xl", clamp_norm_factor=NAN)
    with pytest.raises(ValueError, match="mom2_update_weight"):
        MEMITHyperParams.from_preset("gpt2-xl", mom2_update_weight=0.0)


def test_yaml_string_number_message_says_why(tmp_path):
    path = tmp_path / "hp.yaml"
    path.write_text("v_lr: 1e-3\n")
    with pytest.raises(ValueError, match=r"v_lr.*str.*1\.0e-3"):
        ROMEHyperParams.from_yaml(path)


@pytest.mark.parametrize("cls", ALL)
def test_defaults_and_every_preset_are_valid(cls):
    cls()
    for name in list_presets(cls.METHOD):
        cls.from_preset(name)


@pytest.mark.parametrize(("cls", "field", "value"), [
    (ROMEHyperParams, "v_lr", 1),  # an int where a float is expected
    (ROMEHyperParams, "early_stop_loss", 0.0),
    (ROMEHyperParams, "kl_factor", 0),
    (ROMEHyperParams, "v_loss_layer", None),
    (MEMITHyperParams, "z_batch_size", None),
    (FTHyperParams, "norm_constraint", None),
    (MENDHyperParams, "edit_lr", 0.0),
    (KEHyperParams, "margin_start", None),
])
def test_edge_values_that_are_meaningful_are_accepted(cls, field, value):
    assert getattr(cls(**{field: value}), field) == value


def _numeric(tp: object) -> bool:
    args = typing.get_args(tp)
    if args:
        return any(_numeric(a) for a in args)
    return tp in (int, float)


@pytest.mark.parametrize("cls", ALL)
def test_every_numeric_field_has_a_range(cls):
    """A new numeric field without an entry in the class's ``RANGES`` table fails here."""
    hints = typing.get_type_hints(cls)
    numeric = {f.name for f in dataclasses.fields(cls) if _numeric(hints[f.name])}
    assert numeric, cls
    missing = numeric - set(cls.RANGES)
    assert not missing, f"{cls.__name__}: no range for {sorted(missing)}"
    assert set(cls.RANGES) <= {f.name for f in dataclasses.fields(cls)}


def test_base_class_is_a_hyperparams():
    assert all(issubclass(c, HyperParams) for c in ALL)
    assert math.isnan(NAN)
