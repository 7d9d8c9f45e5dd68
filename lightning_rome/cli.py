"""The ``lightning-rome`` command line.

* ``fit``, ``validate``, ``test``, ``predict``: Lightning's own CLI (LightningCLI + jsonargparse)
  over the package's LightningModules, DataModules and callbacks, configured by YAML with class
  paths in short form (``class_path: EditEvaluator``).
* One-shot jobs: ``edit``, ``apply-patch``, ``trace``, ``evaluate`` and ``demo``.

User mistakes (a bad request, a missing file, a layer out of range, a corrupt patch...) print one
line ``lightning-rome <command>: error: ...`` and exit with status 2; set
``LIGHTNING_ROME_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The package's classes that configs name in short form (``class_path: MENDModule``).
_SHORT_NAMES = {
    "modules": ("EditEvaluator", "FTModule", "MENDModule", "KEModule", "CausalTracer",
                "SequentialEditBenchmark"),
    "data": ("CounterFactDataModule", "ZsREDataModule", "KnownFactsDataModule",
             "TextCorpusDataModule"),
    "callbacks": ("ROMECallback", "MEMITCallback", "EditorCallback", "EditEvaluation",
                  "CausalTraceCallback"),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_rome.patches import PatchMismatchError

    return (ValueError, TypeError, FileNotFoundError, IndexError, KeyError, OSError,
            PatchMismatchError, FloatingPointError, MisconfigurationException)


# ---------------------------------------------------------------------------- shared options
class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (unless it is unset or the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (status 2), like the commands' own errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (online) or local folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: model's)")
    p.add_argument("--dtype", default=None, help="float32, bf16, fp16 (default: checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")


def _check_device(device: str | None) -> None:
    """A device this torch build can use, else ``ValueError`` naming it."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no GPU is visible")
            raise ValueError(f"--device {device}: CUDA is not available ({why}, torch "
                             f"{torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, "
                         "cuda or mps")


def _check_model_arg(name: str, flag: str = "--model") -> None:
    """A local-looking path must be a ``save_pretrained`` folder; hub names pass through."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"{flag} {name}: a file, not a model folder "
                                    "(save_pretrained output)")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {name}: the folder has no config.json (not a "
                                    "save_pretrained folder)")
        return
    if p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(f"{flag} {name}: no such model folder")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from lightning_rome.models import load_model

    _check_device(args.device)
    _check_model_arg(args.model)
    if args.tokenizer is not None:
        _check_model_arg(args.tokenizer, "--tokenizer")
    return load_model(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)


def _check_top_k(k: int, tok: Any) -> None:
    n = len(tok)
    if not 1 <= k <= n:
        raise ValueError(f"--top-k {k} must be between 1 and the vocabulary size ({n})")


def _check_corpus(path: str | None) -> None:
    """A statistics corpus given as a file must be UTF-8 text (checked before any work)."""
    if path is None or not Path(path).is_file():
        return  # a corpus name ("wikitext") or folder: the statistics code checks it
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if b"\x00" in chunk:
                raise ValueError(f"--stats-corpus {path}: a binary file (NUL byte at offset "
                                 f"{offset + chunk.index(0)}), not UTF-8 text")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(f"--stats-corpus {path}: not UTF-8 text (byte "
                                 f"{e.object[e.start]:#04x} near offset {offset + e.start})"
                                 ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"--stats-corpus {path}: not UTF-8 text (cut off at the end)") from None


def _print_predictions(title: str, preds: list[tuple[str, float]]) -> None:
    shown = ", ".join(f"{tok!r} {p:.3f}" for tok, p in preds)
    print(f"  {title:<7} {shown}")


def _notice(cmd: str, text: str) -> None:
    print(f"lightning-rome {cmd}: {text}", file=sys.stderr)


#: The CLI flag behind each hyperparameter override, for messages.
_OVERRIDE_FLAGS = {"mom2_dataset": "--stats-corpus", "mom2_n_samples": "--stats-samples",
                   "layer": "--layer", "layers": "--layer", "seed": "--seed"}


def _overrides(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The hyperparameters that options set (each one is used or refused by ``_editor``)."""
    out: dict[str, Any] = {}
    if getattr(args, "stats_corpus", None) is not None:
        _check_corpus(args.stats_corpus)
        out["mom2_dataset"] = args.stats_corpus
    if getattr(args, "stats_samples", None) is not None:
        out["mom2_n_samples"] = args.stats_samples
    layers = getattr(args, "layer", None)
    if layers:
        if method == "rome":
            if len(layers) != 1:
                raise ValueError(f"ROME edits one layer; got --layer {' --layer '.join(map(str, layers))}")
            out["layer"] = layers[0]
        else:
            out["layers"] = sorted(set(layers))
    if getattr(args, "seed", None) is not None:
        out["seed"] = args.seed
    return out


def _editor(cmd: str, method: str, hparams: str | None, model: Any,
            overrides: dict[str, Any]) -> Any:
    """The editor of ``method``: ``--hparams`` (a preset name or YAML file), else the default
    for this model (one notice line); options override its fields or are refused; every layer is
    checked against the model, naming where it came from."""
    from lightning_rome.editing import get_editor
    from lightning_rome.editing.hparams import HyperParams
    from lightning_rome.presets import choose

    if hparams is None:
        choice = choose(method, model)
        notice: str | None = choice.notice  # printed once the settings are validated
        settings: Any = choice.settings
        source = (f"preset {choice.preset!r}" if choice.preset
                  else "the settings derived from the model's depth")
    else:
        notice = None
        settings = _read_hparams_file(hparams) if hparams.endswith((".yaml", ".yml")) else hparams
        source = (f"--hparams {hparams}" if hparams.endswith((".yaml", ".yml"))
                  else f"preset {hparams!r} (--hparams)")
    editor = get_editor(method, settings)
    hp = getattr(editor, "hparams", None)
    if not isinstance(hp, HyperParams):
        if overrides:
            raise ValueError(f"{', '.join(_OVERRIDE_FLAGS[k] for k in overrides)} cannot be set "
                             f"for {method}")
        if notice:
            _notice(cmd, notice)
        return editor
    fields = hp.to_dict()
    for key in overrides:
        if key not in fields and not (key == "seed" and method not in ("rome", "memit")):
            raise ValueError(f"{_OVERRIDE_FLAGS[key]} does not apply to {method} (it has no "
                             f"{key!r} setting)")
    known = {k: v for k, v in overrides.items() if k in fields}
    if known:
        editor.hparams = hp = type(hp).from_dict({**fields, **known})
    _check_layers(model, hp.to_dict(), user=("layer" in known or "layers" in known),
                  source=source)
    if notice:
        _notice(cmd, notice)
    return editor


def _yaml_problem(e: Exception) -> str:
    """A YAML error's problem and position on one line."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if problem is None:
        return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def _read_hparams_file(path: str) -> dict[str, Any]:
    """``--hparams FILE.yaml`` as a mapping (safe YAML: no Python tags), naming the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--hparams {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--hparams {path}: not valid safe YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--hparams {path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ValueError(f"--hparams {path}: expected a mapping of hyperparameter fields")
    return data


def _check_layers(model: Any, fields: dict[str, Any], *, user: bool, source: str) -> None:
    from lightning_rome.models import get_layout

    n = get_layout(model).n_layers(model)
    layers = [fields["layer"]] if "layer" in fields else list(fields.get("layers") or [])
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n]
    if not bad:
        return
    shown = " ".join(map(str, bad))
    if user:
        raise IndexError(f"--layer {shown} is out of range: this model has {n} layers "
                         f"(0..{n - 1})")
    raise IndexError(f"{source} edits layer {shown}, which is out of range: this model has {n} "
                     f"layers (0..{n - 1}); pass --hparams with a preset or YAML file for this "
                     "model, or --layer")


def _seed(args: argparse.Namespace) -> None:
    if getattr(args, "seed", None) is not None:
        import torch

        torch.manual_seed(args.seed)


# ---------------------------------------------------------------------------- edit
def _edit_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help='prompt with {} for the subject: "{} plays"')
    p.add_argument("--subject", required=True, help="the subject s, as it appears in the prompt")
    p.add_argument("--target", required=True, help="the new object o*")
    p.add_argument("--target-true", default=None, help="the true object (for reporting)")
    p.add_argument("--method", default="rome",
                   choices=["rome", "memit", "alphaedit", "ft", "ft-l", "kn"],
                   help="the editing method")
    p.add_argument("--hparams", default=None, help="preset name (gpt2-xl, ...) or YAML file "
                   "(default: the preset for the model's family and size, else settings "
                   "derived from its depth)")
    p.add_argument("--layer", type=_int_at_least(0), action="append", default=None,
                   help="the edited layer (ROME), or a layer of the edited set (repeatable; "
                   "MEMIT, FT, FT-L, KN), instead of the preset's")
    p.add_argument("--stats-corpus", default=None, help="corpus for C (wikitext, a .txt file; "
                   "default: the preset's)")
    p.add_argument("--stats-samples", type=_int_at_least(1), default=None,
                   help="texts sampled for C (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the context templates and "
                   "of torch (default: the preset's seed)")
    p.add_argument("--top-k", type=_int_at_least(1), default=5,
                   help="predictions shown before and after")
    p.add_argument("--save", default=None, help="write the patch here (.safetensors)")


def cmd_edit(args: argparse.Namespace) -> int:
    from lightning_rome import EditRequest
    from lightning_rome.models.checks import check_texts
    from lightning_rome.scoring import top_predictions

    request = EditRequest(args.prompt, args.subject, args.target, args.target_true)
    overrides = _overrides(args, args.method)
    model, tok = _load(args)
    _check_top_k(args.top_k, tok)
    check_texts(model, tok, [request.text])  # before scoring it (the editor checks the rest)
    editor = _editor("edit", args.method, args.hparams, model, overrides)
    _seed(args)
    print(f"{args.method.upper()} edit: {request.text!r} -> {args.target!r}")
    _print_predictions("before", top_predictions(model, tok, [request.text], args.top_k)[0])
    patch = editor.edit(model, tok, [request])
    patch.apply(model)
    _print_predictions("after", top_predictions(model, tok, [request.text], args.top_k)[0])
    norms = ", ".join(f"{n}: {v:.4g}" for n, v in patch.norms().items())
    print(f"  delta   {norms}")
    if args.save:
        path = patch.save(args.save)
        print(f"  saved   {path}")
    return 0


# ---------------------------------------------------------------------------- apply-patch
def _apply_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--patch", required=True, help="a patch file written by `edit --save`")
    p.add_argument("--out", default=None, help="save the edited model here (save_pretrained)")
    p.add_argument("--prompt", action="append", default=[], help="show predictions (repeatable; "
                   "default: the patch's own prompts)")
    p.add_argument("--force", action="store_true", help="apply despite a checksum mismatch")
    p.add_argument("--top-k", type=_int_at_least(1), default=5,
                   help="predictions shown before and after")


def cmd_apply_patch(args: argparse.Namespace) -> int:
    from lightning_rome import WeightPatch
    from lightning_rome.models.checks import check_texts
    from lightning_rome.scoring import top_predictions

    patch = WeightPatch.load(args.patch)  # validated before any tensor touches the model
    model, tok = _load(args)
    _check_top_k(args.top_k, tok)
    prompts = list(args.prompt) or [r.text for r in patch.requests]
    check_texts(model, tok, prompts)  # before scoring them or touching the model
    before = top_predictions(model, tok, prompts, args.top_k) if prompts else []
    patch.apply(model, force=args.force)
    print(f"applied {patch!r}")
    after = top_predictions(model, tok, prompts, args.top_k) if prompts else []
    for prompt, b, a in zip(prompts, before, after):
        print(f"{prompt!r}")
        _print_predictions("before", b)
        _print_predictions("after", a)
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        print(f"saved the edited model to {args.out}")
    return 0


# ---------------------------------------------------------------------------- trace
#: The paper's tracing window (layers restored or severed around each layer).
PAPER_WINDOW = 10


def _trace_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help='template with {} or full text containing '
                   "the subject")
    p.add_argument("--subject", required=True, help="the subject whose embeddings are corrupted")
    p.add_argument("--kind", action="append", choices=["hidden", "mlp", "attn"], default=None,
                   help="repeatable (default: all three)")
    p.add_argument("--answer", default=None, help="expected answer (default: greedy prediction)")
    p.add_argument("--samples", type=_int_at_least(1), default=10,
                   help="noise samples per restored state")
    p.add_argument("--window", type=_int_at_least(1), default=None,
                   help=f"layers restored together for mlp/attn (default: {PAPER_WINDOW}, the "
                   "paper's, or the model's depth if smaller)")
    p.add_argument("--noise", type=float, default=None, help="fixed noise level ν (default: "
                   "3 × std of the subject embeddings)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out", required=True, help="heatmap image (.png/.pdf); {kind} is replaced, "
                   "else the kind is added before the suffix")
    p.add_argument("--save", default=None, help="also save the traces (.json)")


def cmd_trace(args: argparse.Namespace) -> int:
    import math

    from matplotlib.backend_bases import FigureCanvasBase

    from lightning_rome.models import get_layout
    from lightning_rome.tracing import GaussianNoise, trace_all

    out = Path(args.out)
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"--out {args.out}: unknown image type {out.suffix!r}; use one of "
                         f"{sorted('.' + f for f in formats)}")
    if args.noise is not None and not (math.isfinite(args.noise) and args.noise >= 0):
        raise ValueError(f"--noise must be a finite number >= 0, got {args.noise}")
    model, tok = _load(args)
    n_layers = get_layout(model).n_layers(model)
    window = args.window
    if window is None:
        window = min(PAPER_WINDOW, n_layers)
        if window != PAPER_WINDOW:
            _notice("trace", f"--window not given; using {window} (the model has {n_layers} "
                    f"layers, fewer than the paper's window of {PAPER_WINDOW})")
    elif window > n_layers:
        raise ValueError(f"--window {window} must be between 1 and the model's {n_layers} layers")
    kinds = list(dict.fromkeys(args.kind or ["hidden", "mlp", "attn"]))
    noise: Any = args.noise if args.noise is not None else GaussianNoise.from_subjects(
        model, tok, [args.subject])
    # Every trace first, then the files: a failure writes nothing. One call for all kinds: one
    # clean/corrupted run, and a notice (e.g. the model does not predict --answer) once.
    traces = trace_all(model, tok, args.prompt, args.subject, kinds, window=window,
                       samples=args.samples, noise=noise, answer=args.answer, seed=args.seed)
    for kind in kinds:
        t = traces[kind]
        path = Path(str(out).replace("{kind}", kind)) if "{kind}" in str(out) else (
            out if len(kinds) == 1 else out.with_name(f"{out.stem}-{kind}{out.suffix}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        t.plot().savefig(path, bbox_inches="tight")
        best = int(t.scores[t.subject_range[1] - 1].argmax())  # layer of the largest effect
        print(f"{kind:>6}: P(answer) clean {t.high_score:.3f}, corrupted {t.low_score:.3f}; "
              f"strongest layer at the last subject token: {best} -> {path}")
        if args.save:
            save = Path(args.save)
            t.save(save.with_name(f"{save.stem}-{kind}{save.suffix or '.json'}"))
    return 0


# ---------------------------------------------------------------------------- evaluate
#: Files of the offline data folder (``$LIGHTNING_ROME_DATA``) used when the release's own file
#: is not there: COUNTERFACT's evaluation split; zsRE's only offline file (MEND's training split).
OFFLINE_FILES = {"counterfact": ("counterfact/counterfact-val.json",),
                 "zsre": ("zsre/zsre_mend_train_1k.json",)}


def _data_file(data: str, path: str | None) -> str | None:
    """``--path``, else the first file of the DataModule's defaults or :data:`OFFLINE_FILES`
    under ``$LIGHTNING_ROME_DATA``; ``None`` leaves the choice (download) to the DataModule."""
    from lightning_rome.data import CounterFactDataModule, ZsREDataModule
    from lightning_rome.utils.paths import data_root

    if path is not None:
        return path
    root = data_root()
    if root is None:
        return None
    dm_cls = CounterFactDataModule if data == "counterfact" else ZsREDataModule
    for name in (*dm_cls.default_files, *OFFLINE_FILES[data]):
        if (root / name).is_file():
            return str(root / name)
    return None


def _evaluate_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--method", default="rome", choices=["rome", "memit", "alphaedit", "ft",
                                                        "ft-l", "kn", "none"],
                   help="the editor (none: the unedited model only)")
    p.add_argument("--hparams", default=None, help="preset name or YAML file (default: the "
                   "preset for the model's family and size, else settings derived from its "
                   "depth)")
    p.add_argument("--layer", type=_int_at_least(0), action="append", default=None,
                   help="the edited layer(s), instead of the preset's (repeatable)")
    p.add_argument("--data", default="counterfact", choices=["counterfact", "zsre"],
                   help="the benchmark")
    p.add_argument("--path", default=None, help="data file (default: the release's file under "
                   "LIGHTNING_ROME_DATA, else its offline file: counterfact/counterfact-val.json"
                   ", zsre/zsre_mend_train_1k.json)")
    p.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="evaluate at most this many cases")
    p.add_argument("--stats-corpus", default=None, help="corpus for C (default: the preset's)")
    p.add_argument("--stats-samples", type=_int_at_least(1), default=None,
                   help="texts sampled for C (default: the preset's)")
    p.add_argument("--generation", action="store_true", help="also GE (and RS) from generation")
    p.add_argument("--seed", type=int, default=None, help="seed of torch, the editor's context "
                   "templates and generation (default: 0)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the results already in --out (--no-resume: start afresh)")
    p.add_argument("--out", default="outputs/evaluate", help="results folder (TensorBoard logs, "
                   "per-case JSONL, summary)")


def _trainer_device(device: str | None) -> dict[str, Any]:
    """The Trainer's ``accelerator``/``devices`` for ``--device`` (default: Lightning's auto)."""
    if device is None:
        return {"accelerator": "auto", "devices": 1}
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return {"accelerator": "gpu", "devices": [dev.index or 0]}
    return {"accelerator": dev.type, "devices": 1}


def cmd_evaluate(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_rome.data import CounterFactDataModule, ZsREDataModule
    from lightning_rome.modules.evaluator import EditEvaluator

    overrides = _overrides(args, args.method) if args.method != "none" else {}
    if args.method == "none":
        given = [f for f, v in (("--hparams", args.hparams), ("--layer", args.layer),
                                ("--stats-corpus", args.stats_corpus),
                                ("--stats-samples", args.stats_samples)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be used with --method none (no editor)")
    path = _data_file(args.data, args.path)
    if path is not None and args.path is None:
        _notice("evaluate", f"data: {path}")
    model, tok = _load(args)
    editor = None if args.method == "none" else _editor("evaluate", args.method, args.hparams,
                                                         model, overrides)
    seed = 0 if args.seed is None else args.seed
    pl.seed_everything(seed, verbose=False)
    dm_cls = CounterFactDataModule if args.data == "counterfact" else ZsREDataModule
    dm = dm_cls(path=path, limit=args.limit)
    out = Path(args.out)
    evaluator = EditEvaluator(model, tokenizer=tok, editor=editor, generation=args.generation,
                              results_dir=str(out), resume=args.resume, seed=seed,
                              verbose=False)
    trainer = pl.Trainer(default_root_dir=out, logger=TensorBoardLogger(out, name="tb",
                                                                         default_hp_metric=False),
                         enable_checkpointing=False, enable_progress_bar=True,
                         enable_model_summary=False, **_trainer_device(args.device))
    trainer.test(evaluator, datamodule=dm, verbose=False)
    # The summary (values × 100, 95% intervals) instead of Lightning's per-key dump.
    print(f"\n{evaluator.results['table']}\n\nresults: {out}")
    return 0


# ---------------------------------------------------------------------------- demo
def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", help="where the demo writes its results")
    p.add_argument("--cases", type=int, default=None, help="COUNTERFACT cases the model learns")
    p.add_argument("--retrain", action="store_true", help="retrain the demo model")
    p.add_argument("--memit", type=int, default=100, help="MEMIT edits in the one batch")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the traces' noise and of the editors' context templates")


def cmd_demo(args: argparse.Namespace) -> int:
    from lightning_rome.demo import run_demo

    run_demo(out=args.out, n_cases=args.cases, retrain=args.retrain, n_memit=args.memit,
             seed=args.seed)
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int], str]] = {
    "edit": (_edit_parser, cmd_edit, "edit one fact and show predictions before and after"),
    "apply-patch": (_apply_parser, cmd_apply_patch, "apply a saved patch to a model"),
    "trace": (_trace_parser, cmd_trace, "causal trace of one prompt, saved as heatmaps"),
    "evaluate": (_evaluate_parser, cmd_evaluate, "evaluate an editor on COUNTERFACT or zsRE"),
    "demo": (_demo_parser, cmd_demo, "the offline demo: trace, ROME, MEMIT, evaluation"),
}


def _top_help() -> str:
    lines = ["usage: lightning-rome <command> [options]", "",
             "Knowledge editing of language models in PyTorch Lightning.", "",
             "Lightning commands (LightningCLI with YAML configs):"]
    for c in LIGHTNING_SUBCOMMANDS:
        lines.append(f"  {c:<12} Trainer.{c} with --config FILE.yaml (see `lightning-rome {c} "
                     "--help`)")
    lines += ["  Presets of the papers' set-ups are in configs/ (configs/README.md); short class "
              "paths:", "    modules: " + ", ".join(_SHORT_NAMES["modules"]),
              "    data: " + ", ".join(_SHORT_NAMES["data"]),
              "    callbacks: " + ", ".join(_SHORT_NAMES["callbacks"]),
              "  e.g. lightning-rome test --config configs/rome-gpt2xl-counterfact.yaml",
              "       lightning-rome test --model.help EditEvaluator"]
    lines += ["", "One-shot commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "Set LIGHTNING_ROME_DEBUG=1 to see tracebacks for errors."]
    return "\n".join(lines)


#: ``--model.init_args.hparams.FIELD VALUE`` (or ``--model.hparams.FIELD=VALUE``).
_HPARAM_FIELD = re.compile(r"^--model\.(?:init_args\.)?hparams\.([A-Za-z_]\w*)(?:=(.*))?$", re.S)
#: The method whose presets a module's ``hparams`` names (EditEvaluator: its ``editor``).
_MODULE_METHODS = {"MENDModule": "mend", "KEModule": "ke", "FTModule": "ft"}


def _split_hparam_fields(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take the per-field hparams overrides out of ``argv`` (values read as YAML)."""
    import yaml

    rest: list[str] = []
    fields: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        m = _HPARAM_FIELD.match(argv[i])
        if m is None:
            rest.append(argv[i])
            i += 1
            continue
        if m.group(2) is not None:
            value, i = m.group(2), i + 1
        elif i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        else:
            raise ValueError(f"{argv[i]} needs a value")
        try:
            fields[m.group(1)] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"{argv[i - 1]}: not a YAML value: {_yaml_problem(e)}") from None
    return rest, fields


def _merged_hparams(base: Any, method: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a preset name, a YAML file, a mapping or ``None``) with ``fields`` replaced."""
    from lightning_rome.editing.hparams import load_preset_file

    if base is None:
        settings: dict[str, Any] = {}
    elif isinstance(base, str) and base.endswith((".yaml", ".yml")):
        settings = _read_hparams_file(base)
    elif isinstance(base, str):
        if method is None:
            raise ValueError(f"hparams {base!r}: cannot tell which method's preset it names")
        presets = load_preset_file(method)
        if base not in presets:
            raise ValueError(f"unknown {method} preset {base!r} (--model.init_args.hparams); "
                             f"known: {sorted(presets)}")
        settings = dict(presets[base])
    elif hasattr(base, "as_dict"):
        settings = base.as_dict()
    elif isinstance(base, dict):
        settings = dict(base)
    elif hasattr(base, "to_dict"):
        settings = base.to_dict()
    else:
        raise TypeError(f"cannot override fields of hparams of type {type(base).__name__}")
    return {**settings, **fields}


def _class_help(name: str, root: str = "model") -> str:
    """A short help for one of the package's classes: each init argument with its type,
    default and the first line of its docstring entry (no list of every ``torch.nn`` class)."""
    import importlib
    import inspect

    cls = None
    for pkg, names in _SHORT_NAMES.items():
        mod = {"modules": "lightning_rome.modules", "data": "lightning_rome.data",
               "callbacks": "lightning_rome.callbacks"}[pkg]
        if name in names or (name.rsplit(".", 1)[-1] in names
                             and name.startswith("lightning_rome")):
            short = name.rsplit(".", 1)[-1]
            module = importlib.import_module(mod)
            cls = getattr(module, short, None)
            if cls is None and short == "CausalTraceCallback":
                cls = importlib.import_module("lightning_rome.callbacks.trace").CausalTraceCallback
            if cls is not None:
                break
    if cls is None:
        raise ValueError(f"unknown class {name!r}; the package's: "
                         f"{', '.join(n for ns in _SHORT_NAMES.values() for n in ns)}")
    doc = inspect.getdoc(cls) or ""
    described: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_args = False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):
            break
        m = re.match(r"^ {4}([\w, *]+): (.*)$", line)
        if m:
            current = [m.group(2).strip()]
            for arg in m.group(1).split(","):
                described[arg.strip().lstrip("*")] = current
        elif current is not None and line.startswith(" " * 6):
            current.append(line.strip())
    sig = inspect.signature(cls.__init__)
    lines = [f"{cls.__module__}.{cls.__name__}: {doc.splitlines()[0] if doc else ''}", "",
             f"init arguments (--{root}.NAME VALUE on the command line, NAME: under init_args "
             "in YAML):"]
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(
            p.annotation)
        default = "required" if p.default is p.empty else f"default: {p.default!r}"
        lines.append(f"  --{root}.{p.name}: {ann} ({default})")
        if p.name in described:
            lines += textwrap.wrap(" ".join(described[p.name]), 96, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
    return "\n".join(lines)


def _lightning_cli(argv: Sequence[str] | None) -> int:
    """``fit``/``validate``/``test``/``predict`` through LightningCLI (``argv`` includes the
    subcommand; ``None`` reads ``sys.argv``)."""
    from lightning.pytorch.cli import LightningCLI

    # Import the package's LightningModules, DataModules and callbacks so that jsonargparse
    # resolves their short names (``class_path: EditEvaluator``, ``CounterFactDataModule``,
    # ``ROMECallback``, ``CausalTracer``...).
    import lightning_rome.callbacks
    import lightning_rome.callbacks.trace
    import lightning_rome.data
    import lightning_rome.modules  # noqa: F401

    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):  # the package's own short class help
        for flag in ("--model.help", "--data.help", "--trainer.callbacks.help"):
            if (a == flag and i + 1 < len(args)) or a.startswith(flag + "="):
                name = a.split("=", 1)[1] if "=" in a else args[i + 1]
                print(_class_help(name, flag[2:].removesuffix(".help")))
                return 0
    args, fields = _split_hparam_fields(args)

    class CLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            if not fields:
                return
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            init = cfg["model"]["init_args"]
            cls_name = str(cfg["model"]["class_path"]).rsplit(".", 1)[-1]
            editor = init.get("editor") if hasattr(init, "get") else None
            method = editor if isinstance(editor, str) else _MODULE_METHODS.get(cls_name)
            init["hparams"] = _merged_hparams(init.get("hparams"), method, fields)

    with warnings.catch_warnings():
        # Called from Python with explicit args (tests, scripts): not a mistake.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        no_exit = {"exit_on_error": False}
        CLI(args=args, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
            parser_kwargs={**no_exit, **{c: dict(no_exit) for c in LIGHTNING_SUBCOMMANDS}})
    return 0


#: Python-argument hints in library messages, as each command's CLI flags.
_FLAG_HINTS = {"apply-patch": {"force=True": "--force"},
               "evaluate": {"resume=False": "--no-resume"}}


def _one_line(cmd: str, e: BaseException) -> str:
    import yaml

    text = str(e).strip()
    if isinstance(e, yaml.YAMLError):  # the problem and where it is, on one line
        msg = _yaml_problem(e)
    elif isinstance(e, argparse.ArgumentError):  # jsonargparse: the problem and where, joined
        msg = "; ".join(line.strip() for line in text.splitlines() if line.strip())
        msg = msg if len(msg) <= 400 else msg[:400] + " ..."

    elif "Does not validate against any of the Union subtypes" in text:
        # jsonargparse wraps an error raised while building a class: show that error.
        causes = [line.strip()[2:] for line in text.splitlines()
                  if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
        msg = causes[0] if causes else text.splitlines()[0]
    else:
        msg = text.splitlines()[0] if text else type(e).__name__
    for py, flag in _FLAG_HINTS.get(cmd, {}).items():
        if py in msg and flag not in msg:
            msg = msg.replace(py, flag)
    return msg


def _run_guarded(cmd: str, run: Callable[[], int]) -> int:
    """Run a command; user mistakes become one line on stderr and exit status 2."""
    import yaml

    try:
        return run()
    except (*_user_errors(), yaml.YAMLError, argparse.ArgumentError) as e:
        if os.environ.get("LIGHTNING_ROME_DEBUG"):
            raise
        print(f"lightning-rome {cmd}: error: {type(e).__name__}: {_one_line(cmd, e)}",
              file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-rome`` console script."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    cmd = argv[0]
    from lightning_rome.utils.console import quiet_console

    if cmd in LIGHTNING_SUBCOMMANDS:
        # LightningCLI warns when given args while sys.argv holds others: let it read sys.argv.
        with quiet_console(lightning_info=True):  # no tips; Lightning's own lines stay
            return _run_guarded(cmd, lambda: _lightning_cli(None if from_sys else argv))
    if cmd not in COMMANDS:
        print(f"lightning-rome: error: unknown command {cmd!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our messages
    hf_logging.set_verbosity_error()
    build, run, desc = COMMANDS[cmd]
    parser = _Parser(prog=f"lightning-rome {cmd}", description=desc,
                     formatter_class=_HelpFormatter)
    build(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as e:  # a usage error (one line already printed): its status, not an exit
        if e.code in (0, None):
            raise
        return int(e.code) if isinstance(e.code, int) else 2
    with quiet_console(lightning_info=False):  # only the command's own progress and results
        return _run_guarded(cmd, lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
