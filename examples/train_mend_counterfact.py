"""Train MEND-CF (or KE-CF) on COUNTERFACT with ``Trainer.fit``, then evaluate the editor on
held-out cases.

Offline, in a minute or two on one CPU core with the default (small) settings (measured: 80
steps of 4 cases in 42 s and 16 evaluation cases in 7 s, 80 s in all on a shared 2-core
machine)::

    python examples/train_mend_counterfact.py --data-dir ../shared/data
    python examples/train_mend_counterfact.py --data-dir ../shared/data --method ke   # KE-CF
    tensorboard --logdir lightning_logs        # train/loss, train/edit_nll, train/loc_kl, ...

What it does:

1. builds a small GPT-2 (random weights, the real GPT-2 tokenizer; or ``--model PATH`` for a
   saved Hugging Face model such as the package's fact model);
2. trains MEND's editor networks (``--method ke``: KnowledgeEditor's) on
   ``counterfact/counterfact-train.json`` (the MEND-CF/KE-CF holdout)
   with a :class:`~lightning_rome.data.CounterFactDataModule` in ``edit_train`` mode, logging to
   TensorBoard, and saves a checkpoint;
3. reloads the editor from the checkpoint (``MEND.from_checkpoint`` /
   ``KE.from_checkpoint``), edits every one of
   ``--eval-cases`` cases of ``counterfact/counterfact-val.json`` alone (apply, score, revert),
   and prints the COUNTERFACT scores (ES, PS, NS, EM, PM, NM, S) of the unedited model, the
   untrained editor and the trained editor, scored with ``lightning_rome.scoring.candidate_nll``.

A random tiny model knows no facts, so its numbers only show the machinery at work; train on a
real model (``--model``) for meaningful scores.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_rome.data import CounterFactDataModule, EditCase
from lightning_rome.editing.hypernet import KE, MEND
from lightning_rome.metrics import compute_with_ci, counterfact_metrics, summary_table
from lightning_rome.models import load_model, load_tokenizer
from lightning_rome.modules.ke import KEModule
from lightning_rome.modules.mend import MENDModule
from lightning_rome.scoring import candidate_nll


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("LIGHTNING_ROME_DATA"),
                   help="the folder holding counterfact/ and gpt2-tokenizer/ "
                        "(default: $LIGHTNING_ROME_DATA)")
    p.add_argument("--method", choices=["mend", "ke"], default="mend",
                   help="the hypernetwork: MEND (MEND-CF) or KnowledgeEditor (KE-CF)")
    p.add_argument("--model", default=None,
                   help="a saved Hugging Face causal LM folder (default: a random tiny GPT-2)")
    p.add_argument("--n-layer", type=int, default=4, help="tiny GPT-2: layers")
    p.add_argument("--n-embd", type=int, default=64, help="tiny GPT-2: width")
    p.add_argument("--layers", type=int, nargs="*", default=None,
                   help="edited layers (default: the last three)")
    p.add_argument("--rank", type=int, default=64, help="MEND: rank of the editor networks")
    p.add_argument("--hidden", type=int, default=128, help="KE: hidden size of the editor")
    p.add_argument("--train-cases", type=int, default=256)
    p.add_argument("--eval-cases", type=int, default=16)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="editor learning rate")
    p.add_argument("--edit-lr", type=float, default=1e-2, help="MEND: initial step sizes α")
    p.add_argument("--lr-alpha", type=float, default=1e-2, help="MEND: learning rate of α")
    p.add_argument("--log-dir", default="lightning_logs", help="TensorBoard folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1 suits the tiny default model and shared "
                        "machines; 0 keeps torch's default)")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, data_dir: Path) -> tuple[torch.nn.Module, Any]:
    if args.model:
        return load_model(args.model, dtype=torch.float32, device="cpu")
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(data_dir / "gpt2-tokenizer")
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tok), n_layer=args.n_layer, n_embd=args.n_embd,
                        n_head=4, n_positions=128, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    model.config._name_or_path = f"tiny-gpt2-{args.n_layer}x{args.n_embd}-seed{args.seed}"
    return model, tok


@torch.no_grad()
def score_cases(model: torch.nn.Module, tok: Any, cases: list[EditCase], editor: Any | None,
                ) -> dict[str, Any]:
    """COUNTERFACT scores, each case edited alone (``editor=None``: the unedited model)."""
    metrics = counterfact_metrics(generation=False)
    for case in cases:
        r = case.request
        groups = {"rewrite": [r.text], "paraphrase": list(case.paraphrase_prompts),
                  "neighborhood": list(case.neighborhood_prompts)}
        prompts = [p for ps in groups.values() for p in ps]
        patch = editor.edit(model, tok, r) if editor is not None else None
        if patch is not None:
            patch.apply(model)
        try:
            nll = candidate_nll(model, tok, prompts * 2,
                                [r.target_new] * len(prompts) + [r.target_true] * len(prompts))
        finally:
            if patch is not None:
                patch.revert(model)
        mean = torch.stack([x.mean() for x in nll]).view(2, -1)  # (new/true, prompts)
        inputs, k = {}, 0
        for g, ps in groups.items():
            inputs[f"{g}_new"] = [mean[0, k:k + len(ps)]]
            inputs[f"{g}_true"] = [mean[1, k:k + len(ps)]]
            k += len(ps)
        metrics.update(**inputs)
    return compute_with_ci(metrics)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.data_dir is None:
        raise SystemExit("pass --data-dir (the folder with counterfact/ and gpt2-tokenizer/) or "
                         "set LIGHTNING_ROME_DATA")
    data_dir = Path(args.data_dir)
    os.environ["LIGHTNING_ROME_DATA"] = str(data_dir)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    model, tok = build_model(args, data_dir)

    if args.method == "mend":
        module_cls: Any = MENDModule
        hparams = {"layers": args.layers, "rank": args.rank, "lr": args.lr,
                   "edit_lr": args.edit_lr, "lr_alpha": args.lr_alpha}
    else:
        module_cls = KEModule
        hparams = {"layers": args.layers, "hidden": args.hidden, "lr": args.lr}
    name = f"{args.method.upper()}-CF"
    module = module_cls(model, tok, hparams)
    untrained_state = {k: v.clone() for k, v in module.network.state_dict().items()}

    dm = CounterFactDataModule(
        "counterfact/counterfact-train.json", mode="edit_train", tokenizer=tok,
        train_split="all", val_split="counterfact/counterfact-val.json",
        test_split="counterfact/counterfact-val.json", limit=args.train_cases,
        batch_size=args.batch_size, seed=args.seed, collator_kwargs={"seed": args.seed})
    logger = TensorBoardLogger(args.log_dir, name=name.lower())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=logger,
                        log_every_n_steps=10, val_check_interval=max(1, args.steps // 2),
                        limit_val_batches=2, check_val_every_n_epoch=None,
                        enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    ckpt = Path(logger.log_dir) / f"{name.lower()}.ckpt"
    trainer.save_checkpoint(ckpt)

    # torch.load(weights_only=True) inside; the editor is checked against this model.
    editor = (MEND.from_checkpoint(ckpt, model) if args.method == "mend"
              else KE.from_checkpoint(ckpt, model, tok))
    dm.setup("test")
    cases = dm.test_dataset.records[: args.eval_cases]
    fresh = module_cls(model, tok, hparams)
    fresh.network.load_state_dict(untrained_state)
    untrained = fresh.editor()
    t1 = time.perf_counter()
    rows = {"unedited": score_cases(model, tok, cases, None),
            f"{name} (untrained)": score_cases(model, tok, cases, untrained),
            name: score_cases(model, tok, cases, editor)}
    eval_s = time.perf_counter() - t1
    print(f"\n{name} on {model.config._name_or_path}: {args.steps} steps on {args.train_cases} "
          f"training cases in {train_s:.0f} s; {len(cases)} evaluation cases in {eval_s:.0f} s")
    print(f"checkpoint: {ckpt}\nTensorBoard: tensorboard --logdir {args.log_dir}\n")
    print(summary_table(rows))
    return rows


if __name__ == "__main__":
    main()
