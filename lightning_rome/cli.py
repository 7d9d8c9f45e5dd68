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
import os
import sys
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
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (online) or local folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: model's)")
    p.add_argument("--dtype", default=None, help="float32, bf16, fp16 (default: checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cpu)")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from lightning_rome.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)


def _print_predictions(title: str, preds: list[tuple[str, float]]) -> None:
    shown = ", ".join(f"{tok!r} {p:.3f}" for tok, p in preds)
    print(f"  {title:<7} {shown}")


def _stats_override(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "stats_corpus", None):
        out["mom2_dataset"] = args.stats_corpus
    if getattr(args, "stats_samples", None):
        out["mom2_n_samples"] = args.stats_samples
    return out


def _editor(method: str, hparams: str | None, overrides: dict[str, Any]) -> Any:
    from lightning_rome.editing import get_editor
    from lightning_rome.editing.hparams import HyperParams

    editor = get_editor(method, hparams)
    hp = getattr(editor, "hparams", None)
    if isinstance(hp, HyperParams) and overrides:
        known = {k: v for k, v in overrides.items() if hasattr(hp, k)}
        editor.hparams = type(hp).from_dict({**hp.to_dict(), **known})
    return editor


# ---------------------------------------------------------------------------- edit
def _edit_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help='prompt with {} for the subject: "{} plays"')
    p.add_argument("--subject", required=True)
    p.add_argument("--target", required=True, help="the new object o*")
    p.add_argument("--target-true", default=None, help="the true object (for reporting)")
    p.add_argument("--method", default="rome",
                   choices=["rome", "memit", "alphaedit", "ft", "ft-l", "kn"])
    p.add_argument("--hparams", default=None, help="preset name (gpt2-xl, ...) or YAML file")
    p.add_argument("--layer", type=int, default=None, help="override the edited layer (ROME)")
    p.add_argument("--stats-corpus", default=None, help="corpus for C (wikitext, a .txt file)")
    p.add_argument("--stats-samples", type=int, default=None, help="texts sampled for C")
    p.add_argument("--top-k", type=int, default=5, help="predictions shown before and after")
    p.add_argument("--save", default=None, help="write the patch here (.safetensors)")


def cmd_edit(args: argparse.Namespace) -> int:
    from lightning_rome import EditRequest
    from lightning_rome.models.checks import check_texts
    from lightning_rome.scoring import top_predictions

    request = EditRequest(args.prompt, args.subject, args.target, args.target_true)
    model, tok = _load(args)
    check_texts(model, tok, [request.text])  # before scoring it (the editor checks the rest)
    overrides = _stats_override(args)
    if args.layer is not None:
        overrides["layer"] = args.layer
    editor = _editor(args.method, args.hparams, overrides)
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
    p.add_argument("--prompt", action="append", default=[], help="show predictions (repeatable)")
    p.add_argument("--force", action="store_true", help="apply despite a checksum mismatch")
    p.add_argument("--top-k", type=int, default=5)


def cmd_apply_patch(args: argparse.Namespace) -> int:
    from lightning_rome import WeightPatch
    from lightning_rome.models.checks import check_texts
    from lightning_rome.scoring import top_predictions

    patch = WeightPatch.load(args.patch)  # validated before any tensor touches the model
    model, tok = _load(args)
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
def _trace_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help='template with {} or full text containing '
                   "the subject")
    p.add_argument("--subject", required=True)
    p.add_argument("--kind", action="append", choices=["hidden", "mlp", "attn"], default=None,
                   help="repeatable (default: all three)")
    p.add_argument("--answer", default=None, help="expected answer (default: greedy prediction)")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--noise", type=float, default=None, help="fixed noise level ν (default: "
                   "3 × std of the subject embeddings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="heatmap image (.png/.pdf); {kind} is replaced, "
                   "else the kind is added before the suffix")
    p.add_argument("--save", default=None, help="also save the traces (.json)")


def cmd_trace(args: argparse.Namespace) -> int:
    from lightning_rome.tracing import GaussianNoise, trace

    model, tok = _load(args)
    kinds = args.kind or ["hidden", "mlp", "attn"]
    noise: Any = args.noise if args.noise is not None else GaussianNoise.from_subjects(
        model, tok, [args.subject])
    out = Path(args.out)
    for kind in kinds:
        t = trace(model, tok, args.prompt, args.subject, kind=kind, window=args.window,
                  samples=args.samples, noise=noise, answer=args.answer, seed=args.seed)
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
def _evaluate_parser(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--method", default="rome",
                   help="rome, memit, alphaedit, ft, ft-l, kn, or none")
    p.add_argument("--hparams", default=None, help="preset name or YAML file")
    p.add_argument("--data", default="counterfact", choices=["counterfact", "zsre"])
    p.add_argument("--path", default=None, help="data file (default: from LIGHTNING_ROME_DATA)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many cases")
    p.add_argument("--stats-corpus", default=None)
    p.add_argument("--stats-samples", type=int, default=None)
    p.add_argument("--generation", action="store_true", help="also GE (and RS) from generation")
    p.add_argument("--out", default="outputs/evaluate", help="results folder (TensorBoard logs, "
                   "per-case JSONL, summary)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_rome.data import CounterFactDataModule, ZsREDataModule
    from lightning_rome.modules.evaluator import EditEvaluator

    model, tok = _load(args)
    editor = None if args.method == "none" else _editor(args.method, args.hparams,
                                                         _stats_override(args))
    dm_cls = CounterFactDataModule if args.data == "counterfact" else ZsREDataModule
    dm = dm_cls(path=args.path, limit=args.limit)
    out = Path(args.out)
    evaluator = EditEvaluator(model, tokenizer=tok, editor=editor, generation=args.generation,
                              results_dir=str(out))
    trainer = pl.Trainer(default_root_dir=out, logger=TensorBoardLogger(out, name="tb"),
                         enable_checkpointing=False, enable_progress_bar=True,
                         accelerator="auto", devices=1)
    trainer.test(evaluator, datamodule=dm)
    return 0


# ---------------------------------------------------------------------------- demo
def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", help="where the demo writes its results")
    p.add_argument("--cases", type=int, default=None, help="COUNTERFACT cases the model learns")
    p.add_argument("--retrain", action="store_true", help="retrain the demo model")
    p.add_argument("--memit", type=int, default=100, help="MEMIT edits in the one batch")


def cmd_demo(args: argparse.Namespace) -> int:
    from lightning_rome.demo import run_demo

    run_demo(out=args.out, n_cases=args.cases, retrain=args.retrain, n_memit=args.memit)
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

    with warnings.catch_warnings():
        # Called from Python with explicit args (tests, scripts): not a mistake.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        LightningCLI(args=None if argv is None else list(argv), subclass_mode_model=True,
                     subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                     auto_configure_optimizers=False)
    return 0


def _run_guarded(cmd: str, run: Callable[[], int]) -> int:
    """Run a command; user mistakes become one line on stderr and exit status 2."""
    try:
        return run()
    except _user_errors() as e:
        if os.environ.get("LIGHTNING_ROME_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lightning-rome {cmd}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-rome`` console script."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    cmd = argv[0]
    if cmd in LIGHTNING_SUBCOMMANDS:
        # LightningCLI warns when given args while sys.argv holds others: let it read sys.argv.
        return _run_guarded(cmd, lambda: _lightning_cli(None if from_sys else argv))
    if cmd not in COMMANDS:
        print(f"lightning-rome: error: unknown command {cmd!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our messages
    hf_logging.set_verbosity_error()
    build, run, desc = COMMANDS[cmd]
    parser = argparse.ArgumentParser(prog=f"lightning-rome {cmd}", description=desc)
    build(parser)
    args = parser.parse_args(argv[1:])
    return _run_guarded(cmd, lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
