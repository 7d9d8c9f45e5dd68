"""Log edit metrics and causal traces to TensorBoard during a Trainer run.

A short fine-tuning run of the small fact-knowing model with three callbacks:
``ROMECallback`` edits one fact when fit starts (logging ``rome/efficacy_mean`` and the delta
norms), ``EditEvaluation`` scores the edit after every epoch (``edit_eval/post/ES``, ``.../EM``)
and ``CausalTraceCallback`` traces the edited fact (heatmap images ``causal_trace/0`` and the peak
effects as scalars)::

    python examples/tensorboard_logging.py --out outputs/tb-example
    tensorboard --logdir outputs/tb-example

``--model`` takes a hub name or local folder instead (with ``--hparams`` a ROME preset name,
e.g. ``gpt2-xl``); the default is the offline fact model.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_rome import EditRequest
from lightning_rome.callbacks import CausalTraceCallback, EditEvaluation, ROMECallback
from lightning_rome.data import EditCase


class TextLM(pl.LightningModule):
    """The user's LightningModule: a causal LM fine-tuned on plain text."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, lr: float = 1e-5) -> None:
        super().__init__()
        self.model, self.tokenizer, self.lr = model, tokenizer, lr

    def training_step(self, batch: list[str], batch_idx: int) -> torch.Tensor:
        enc = self.tokenizer(list(batch), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = self.model(**enc, labels=labels).loss
        self.log("train/lm_loss", loss, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub name or local folder (default: the "
                   "offline fact model)")
    p.add_argument("--hparams", default=None, help="ROME preset (default: fact-model)")
    p.add_argument("--out", default="outputs/tensorboard-example", help="TensorBoard folder")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.model is None:
        from lightning_rome.testing import get_fact_model

        fm = get_fact_model()
        model, tok = fm.model, fm.tokenizer
        request = fm.edit_requests(1, relation="lives_in")[0]  # see examples/edit_callback.py
        text = list(fm.kb.text_corpus())[:32]
        hparams = args.hparams or "fact-model"
    else:
        from lightning_rome.models import load_model

        model, tok = load_model(args.model)
        request = EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar")
        text = ["The Eiffel Tower is in Paris.", "Toko Yasuda plays the guitar."] * 8
        hparams = args.hparams or "gpt2-xl"

    logger = TensorBoardLogger(args.out, name="edit")
    callbacks = [
        ROMECallback([request], hparams, apply_on="fit_start"),
        EditEvaluation([EditCase(request)], when="train_epoch_end"),
        CausalTraceCallback([(request.text, request.subject)], kinds=("hidden", "mlp"),
                            window=2 if args.model is None else 10, samples=3,
                            every_n_epochs=1, trace_on_fit_end=False),
    ]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=logger,
                         callbacks=callbacks, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TextLM(model, tok), train_dataloaders=DataLoader(text, batch_size=16))
    edit_eval = callbacks[1].history[-1]["results"]
    out = {"log_dir": logger.log_dir, "efficacy": callbacks[0].last_metrics["rome/efficacy_mean"],
           "post_ES": edit_eval["post/ES"]["mean"], "trace_history": callbacks[2].history}
    print(f"edited {request.text!r} -> {request.target_new!r}: efficacy {out['efficacy']:.2f}, "
          f"ES after {args.epochs} epochs {out['post_ES']:.2f}\n"
          f"tensorboard --logdir {args.out}")
    return out


if __name__ == "__main__":
    main()
