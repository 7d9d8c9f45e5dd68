"""Bad input to every editor and edit callback: a clear error naming the problem (or a correct
result), and the model's weights bit-identical afterwards."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from testutils import tiny_gpt2
from torch import nn

from lightning_rome import EditRequest, WeightPatch
from lightning_rome.callbacks import EditorCallback, MEMITCallback, ROMECallback
from lightning_rome.editing import get_editor
from lightning_rome.models.checks import IncompatibleInputError
from lightning_rome.models.layout import UnknownModelFamilyError
from lightning_rome.scoring import target_nll

from .helpers import BAD_LAYER, CONTEXTS, EDITORS, assert_unchanged, second_moment, snapshot

OK = dict(prompt="{} plays the", subject="Toko Yasuda", target_new="piano", target_true="guitar")
EDITOR_NAMES = list(EDITORS)

# (id, request fields, exception type, regex the message must match)
BAD_REQUESTS = [
    ("prompt-without-braces", dict(OK, prompt="Toko Yasuda plays the"), ValueError,
     r"prompt must contain '\{\}' exactly once.*found 0"),
    ("prompt-with-two-braces", dict(OK, prompt="{} and {} play the"), ValueError,
     r"exactly once.*found 2"),
    ("prompt-with-stray-brace", dict(OK, prompt="{} plays the {0"), ValueError, r"no brace"),
    ("subject-absent", dict(OK, prompt="Paris plays the", subject="Rome"), ValueError,
     r"exactly once"),
    ("subject-empty", dict(OK, subject=""), ValueError, r"subject is empty"),
    ("subject-whitespace", dict(OK, subject="   "), ValueError, r"subject is empty"),
    ("target-empty", dict(OK, target_new=""), ValueError, r"target_new is empty"),
    ("target-whitespace", dict(OK, target_new=" \t\n"), ValueError, r"target_new is empty"),
    ("target-true-whitespace", dict(OK, target_true="  "), ValueError, r"target_true is empty"),
    ("target-not-a-string", dict(OK, target_new=5), TypeError, r"target_new must be a str.*int"),
    ("subject-none", dict(OK, subject=None), TypeError, r"subject must be a str.*NoneType"),
    ("prompt-bytes", dict(OK, prompt=b"{} plays the"), TypeError, r"prompt must be a str.*bytes"),
    ("case-id-float", dict(OK, case_id=1.5), TypeError, r"case_id must be an int or str"),
    ("unknown-field", dict(OK, taget_new="x"), ValueError, r"unknown EditRequest field.*taget"),
    ("missing-field", {k: v for k, v in OK.items() if k != "target_new"}, ValueError,
     r"'target_new' is missing"),
]


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer):
    return gpt2_tokenizer


def _edit(editor: str, model: nn.Module, tok, request) -> WeightPatch:
    return EDITORS[editor]().edit(model, tok, request)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_bad_request_dict(editor, case, tok):
    _, fields, exc, match = case
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        _edit(editor, model, tok, fields)
    assert_unchanged(model, before)


@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_bad_request_in_a_batch_fails_before_any_work(editor, tok):
    """One bad request among good ones: nothing is edited, not even the good ones first."""
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match="exactly once"):
        _edit(editor, model, tok, [OK, dict(OK, subject="Other"), dict(OK, prompt="no brace")])
    assert_unchanged(model, before)


@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_empty_request_list(editor, tok):
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no edit requests"):
        _edit(editor, model, tok, [])
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- handled correctly
GOOD_ODD = {
    "multi-token-target": EditRequest("{} plays the", "Toko Yasuda",
                                      "grand old piano of the city of Rome", "guitar"),
    "unicode": EditRequest("{} spielt das", "Tōkō Yäsuda 東京", "Klavier 🎹", "Gitarre"),
    "long-prompt": EditRequest("{} plays the" + " very" * 60, "Toko Yasuda", "piano", "guitar"),
    "long-subject": EditRequest("{} plays the", " ".join(["Toko"] * 40) + " Yasuda", "piano",
                                "guitar"),
}


@pytest.mark.parametrize("case", list(GOOD_ODD))
@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_odd_but_valid_requests_are_edited(editor, case, tok):
    """Unicode, long and multi-token inputs: a finite patch of the right shapes, model intact."""
    model = tiny_gpt2()
    before = snapshot(model)
    patch = _edit(editor, model, tok, GOOD_ODD[case])
    assert_unchanged(model, before)
    assert patch.names and patch.requests == [GOOD_ODD[case]]
    for n in patch.names:
        d = patch.dense(n)
        assert torch.isfinite(d).all() and d.abs().sum() > 0, n
        # The canonical [out, in] orientation exactly (a transposed delta is refused), with
        # Conv1D's [in, out] storage transposed by hand here.
        assert tuple(d.shape) == tuple(_canonical(model, n).shape), n
    patch.apply(model)
    for n in patch.names:  # the weight moved by exactly the delta, in that orientation
        moved = _canonical(model, n).double() - _canonical_of(before[n], model, n).double()
        torch.testing.assert_close(moved, patch.dense(n).double(), rtol=1e-3, atol=1e-5)
    patch.revert(model)
    assert_unchanged(model, before)


def _canonical_of(t: torch.Tensor, model: nn.Module, name: str) -> torch.Tensor:
    from transformers.pytorch_utils import Conv1D

    module_name, _, leaf = name.rpartition(".")
    conv = leaf == "weight" and isinstance(model.get_submodule(module_name), Conv1D)
    return t.T if conv else t


def _canonical(model: nn.Module, name: str) -> torch.Tensor:
    return _canonical_of(model.get_parameter(name).detach(), model, name)


def test_a_transposed_delta_is_refused(tok):
    """The check above would catch an editor returning [in, out]: apply refuses the shape."""
    from lightning_rome.patches import PatchMismatchError

    model = tiny_gpt2()
    before = snapshot(model)
    patch = _edit("ft", model, tok, OK)
    name = next(n for n in patch.names if n.endswith("c_proj.weight"))  # Conv1D (32, 128)
    good = patch.dense(name)
    assert tuple(good.shape) == tuple(_canonical(model, name).shape) == (32, 128)
    with pytest.raises(PatchMismatchError, match=r"shape \(128, 32\).*\(32, 128\)"):
        WeightPatch({name: good.T.contiguous()}).apply(model)
    assert_unchanged(model, before)


def test_multi_token_target_is_learned_on_every_token(tok):
    """The whole multi-token target, not its first token, gets more likely (NLL averaged over
    all its tokens, computed independently of the editor). FT only: on a random tiny model the
    closed-form editors' single-key update does not move the NLL reliably (their multi-token
    targets are covered by the fact-model behaviour tests)."""
    from lightning_rome.editing import FT

    req = GOOD_ODD["multi-token-target"]
    editor = FT({"layers": [1], "num_steps": 15, "lr": 1e-2})
    # Three layers: an MLP edit at the subject in the last layer cannot reach the last token.
    model = tiny_gpt2(n_layer=3)
    ids = tok(" grand old piano of the city of Rome")["input_ids"]
    assert len(ids) == 8
    with torch.no_grad():
        nll0 = target_nll(model, tok, [req.text], [req.target_new])
    patch = editor.edit(model, tok, req)
    patch.apply(model)
    with torch.no_grad():
        nll1 = target_nll(model, tok, [req.text], [req.target_new])
    # The target's last tokens are needed too: the NLL of the tail alone drops as well.
    with torch.no_grad():
        tail0 = target_nll(model, tok, [req.text + " grand old piano of the"], ["city of Rome"])
    patch.revert(model)
    with torch.no_grad():
        tail_before = target_nll(model, tok, [req.text + " grand old piano of the"],
                                 ["city of Rome"])
    assert float(nll1[0]) < float(nll0[0]) - 0.5
    assert float(tail0[0]) < float(tail_before[0])


# ----------------------------------------------------------------------------- model problems
@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_layer_out_of_range(editor, tok):
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(IndexError, match=r"layer -?\d+ is out of range.*2 layers"):
        BAD_LAYER[editor]().edit(model, tok, OK)
    assert_unchanged(model, before)


class _NoFamily(nn.Module):
    """A language model whose family no layout knows."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 8)
        self.out = nn.Linear(8, 100)

    def forward(self, input_ids, **kwargs):
        return self.out(self.emb(input_ids))


@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_unknown_model_family(editor, tok):
    model = _NoFamily()
    before = snapshot(model)
    with pytest.raises(UnknownModelFamilyError, match=r"unknown model family.*layout"):
        _edit(editor, model, tok, OK)
    assert_unchanged(model, before)


@pytest.mark.parametrize("editor", ["rome", "ft", "ft-l", "kn"])
def test_tokenizer_larger_than_the_model(editor, tok):
    """GPT-2's 50,257-token tokenizer on a model with 1,000 embedding rows."""
    model = tiny_gpt2(vocab_size=1000)
    before = snapshot(model)
    with pytest.raises(IncompatibleInputError, match=r"token id \d+.*only 1000 rows.*not match"):
        _edit(editor, model, tok, OK)
    assert_unchanged(model, before)


@pytest.mark.parametrize("editor", ["rome", "ft", "ft-l", "kn"])
def test_prompt_longer_than_the_model_accepts(editor, tok):
    model = tiny_gpt2()  # 128 positions
    before = snapshot(model)
    req = dict(OK, prompt="{} plays the" + " very" * 200)
    with pytest.raises(IncompatibleInputError, match=r"\d+ tokens long.*at most 128"):
        _edit(editor, model, tok, req)
    assert_unchanged(model, before)


def _poison_activations(model: nn.Module, value: float) -> None:
    """Every output of layer 0's MLP becomes ``value`` (NaN or inf)."""
    model.transformer.h[0].mlp.register_forward_hook(lambda m, i, o: torch.full_like(o, value))


NAN_ERRORS = {"rome": ("ValueOptimisationError", "non-finite"),
              "memit": ("ValueOptimisationError", "non-finite"),
              "ft": ("FloatingPointError", "loss became nan"),
              "ft-l": ("FloatingPointError", "loss became nan"),
              "kn": ("FloatingPointError", "NaN or inf")}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_non_finite_activations(editor, value, tok):
    model = tiny_gpt2()
    _poison_activations(model, value)
    before = snapshot(model)
    with pytest.raises(Exception) as info:
        _edit(editor, model, tok, OK)
    name, match = NAN_ERRORS[editor]
    assert type(info.value).__name__ == name or isinstance(info.value, FloatingPointError)
    assert any(s in str(info.value).lower() for s in (match.lower(), "nan", "inf"))
    assert_unchanged(model, before)


@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_inf_weight(editor, tok):
    """An inf in a weight that the edit's forward passes read."""
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises((FloatingPointError, ValueError)) as info:
        _edit(editor, model, tok, OK)
    assert "nan" in str(info.value).lower() or "inf" in str(info.value).lower()
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("editor", EDITOR_NAMES)
def test_half_precision_models(editor, dtype, tok):
    """fp16/bf16: a finite patch that applies and reverts bit-exactly, or (FT on fp16) a clear
    error; the model is untouched either way."""
    model = tiny_gpt2(n_layer=3).to(dtype)
    before = snapshot(model)
    if editor in ("ft", "ft-l") and dtype == torch.float16:
        with pytest.raises(TypeError, match="float16"):
            _edit(editor, model, tok, OK)
        assert_unchanged(model, before)
        return
    patch = _edit(editor, model, tok, OK)
    assert_unchanged(model, before)
    for n in patch.names:
        assert torch.isfinite(patch.dense(n)).all()
    patch.apply(model)
    assert any(not torch.equal(model.get_parameter(n), before[n]) for n in patch.names)
    assert all(model.get_parameter(n).dtype == dtype for n in patch.names)
    patch.revert(model)
    assert_unchanged(model, before)


def test_unknown_editor_name():
    with pytest.raises(ValueError, match=r"unknown editing method 'roem'.*known"):
        get_editor("roem")


@pytest.mark.parametrize("name,cls", [("mend", "MEND"), ("KE", "KE")])
def test_hypernetwork_editor_by_name_points_to_its_checkpoint(name, cls):
    with pytest.raises(ValueError, match=rf"{cls} edits with a trained network.*"
                                         rf"{cls}\.from_checkpoint"):
        get_editor(name)


@pytest.mark.parametrize("editor,hp,match", [
    ("rome", {"layer": 1, "lyer": 2}, "unknown ROMEHyperParams field.*lyer"),
    ("rome", {"key_mode": "bogus"}, "key_mode"),
    ("rome", {"v_num_grad_steps": 0}, r"v_num_grad_steps must be an integer >= 1"),
    ("rome", {"context_templates": ["no brace"]}, "exactly once"),
    ("memit", "no-such-preset", "unknown memit preset"),
    ("ft", {"layers": [0], "nmu_steps": 1}, "unknown FTHyperParams field"),
    ("kn", {"layrs": [0]}, "unknown KNHyperParams field"),
])
def test_bad_hyperparameters(editor, hp, match):
    with pytest.raises(ValueError, match=match):
        get_editor(editor, hp)


# ----------------------------------------------------------------------------- callbacks
def _callbacks(requests, hparams=None):
    hp = hparams or {"layer": 1, "v_num_grad_steps": 2, "context_templates": CONTEXTS}
    return {
        "rome": lambda: ROMECallback(requests, hp, second_moment=second_moment),
        "memit": lambda: MEMITCallback(requests, {"layers": [0, 1], "v_num_grad_steps": 2,
                                                  "context_templates": CONTEXTS},
                                       second_moment=second_moment),
        "editor": lambda: EditorCallback(requests, "ft", {"layers": [1], "num_steps": 2}),
    }


CALLBACKS = ["rome", "memit", "editor"]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
@pytest.mark.parametrize("callback", CALLBACKS)
def test_callback_rejects_bad_requests_at_construction(callback, case):
    """A bad request fails when the callback is built, before any Trainer runs."""
    _, fields, exc, match = case
    with pytest.raises(exc, match=match):
        _callbacks([fields])[callback]()


@pytest.mark.parametrize("callback", CALLBACKS)
def test_callback_requests_file_problems(callback, tmp_path):
    with pytest.raises(FileNotFoundError, match="requests file not found"):
        _callbacks(str(tmp_path / "missing.json"))[callback]()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "{} plays", "subject": "A", "target_new": ')  # truncated
    with pytest.raises(ValueError, match=r"Expecting value|Expecting|delimiter"):
        _callbacks(str(bad))[callback]()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("- prompt: '{} plays'\n  subject: A\n  target_new: '  '\n")
    with pytest.raises(ValueError, match="target_new is empty"):
        _callbacks(str(wrong))[callback]()
    notlist = tmp_path / "scalar.json"
    notlist.write_text("42")
    with pytest.raises(TypeError, match=r"list of edit requests.*int"):
        _callbacks(str(notlist))[callback]()


def test_callback_bad_apply_on_and_editor():
    with pytest.raises(MisconfigurationException, match="apply_on must be one of"):
        ROMECallback([OK], {"layer": 1}, apply_on="epoch_start")
    with pytest.raises(MisconfigurationException, match="no edit"):
        EditorCallback([OK], object())
    with pytest.raises(ValueError, match="unknown editing method"):
        EditorCallback([OK], "nope")


class _Module:
    """Stands in for a LightningModule: ``model`` and ``tokenizer`` attributes only."""

    def __init__(self, model, tok):
        self.model, self.tokenizer = model, tok


class _Trainer:
    """The little of a Trainer that ``EditCallback._apply`` reads (one process)."""

    world_size = 1
    is_global_zero = True
    logger = None
    global_step = 0

    class strategy:
        pass


@pytest.mark.parametrize("problem", ["layer", "nan", "vocab", "no-tokenizer"])
@pytest.mark.parametrize("callback", CALLBACKS)
def test_callback_failure_leaves_model_untouched(callback, problem, tok):
    """The edit fails inside the callback's hook: the error surfaces, the weights are intact and
    the callback records nothing applied."""
    model = tiny_gpt2(vocab_size=1000) if problem == "vocab" else tiny_gpt2()
    if problem == "nan":
        _poison_activations(model, float("nan"))
    hp = {"layer": 5, "v_num_grad_steps": 2, "context_templates": CONTEXTS} if (
        problem == "layer") else None
    cb = _callbacks([OK], hp)[callback]()
    if problem == "layer" and callback == "memit":
        cb = MEMITCallback([OK], {"layers": [1, 5], "context_templates": CONTEXTS},
                           second_moment=second_moment)
    if problem == "layer" and callback == "editor":
        cb = EditorCallback([OK], "ft", {"layers": [5]})
    before = snapshot(model)
    expected = {"layer": (IndexError, "out of range"),
                "nan": ((FloatingPointError, ValueError), "non-finite|nan"),
                "vocab": ((IncompatibleInputError, IndexError), "rows|out of range"),
                "no-tokenizer": (MisconfigurationException, "needs a tokenizer")}[problem]
    module = _Module(model, None if problem == "no-tokenizer" else tok)
    with pytest.raises(expected[0], match=expected[1]):
        cb._apply(_Trainer(), module)
    assert not cb.applied and cb.patch is None
    assert_unchanged(model, before)
