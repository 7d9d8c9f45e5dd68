"""An edit callback in an existing Trainer: ROME rewrites one fact of the small fact-knowing model
when validation starts, and the example prints the fact before and after.

    python examples/edit_callback.py            # offline; needs LIGHTNING_ROME_DATA the first
                                                # time the fact model is trained
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_rome.callbacks import ROMECallback
from lightning_rome.scoring import candidate_probs, generate
from lightning_rome.stats import get_second_moment
from lightning_rome.testing import get_fact_model


class FactLM(pl.LightningModule):
    """The user's LightningModule: a causal LM with a validation loss on its knowledge base."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def validation_step(self, batch: list[str], batch_idx: int) -> None:
        enc = self.tokenizer(list(batch), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = self.model(**enc, labels=labels).loss
        self.log("val_loss", loss, batch_size=len(batch))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fm = get_fact_model()
    # lives_in: the essence-drift KL prompt "{} is a" asks for a profession in this KB, so a
    # profession edit is held back by its own KL term (see tests/editing/test_rome_behaviour.py).
    request = fm.edit_requests(1, seed=args.seed, relation="lives_in")[0]
    corpus = list(fm.kb.text_corpus())

    def second_moment(model, tok, name):  # C over the model's own training text
        return get_second_moment(model, tok, name, corpus=corpus, n_samples=2000,
                                 progress=False).mom2

    module = FactLM(fm.model, fm.tokenizer)

    def show(title: str) -> dict[str, float]:
        p = candidate_probs(fm.model, fm.tokenizer, [request.text] * 2,
                            [request.target_true, request.target_new])
        text = generate(fm.model, fm.tokenizer, [request.text], max_new_tokens=4)[0]
        print(f"{title:>6}: {text!r}  P({request.target_true})={p[0]:.3f} "
              f"P({request.target_new})={p[1]:.3f}")
        return {"p_true": float(p[0]), "p_new": float(p[1])}

    print(f"edit: {request.text!r}: {request.target_true!r} -> {request.target_new!r}")
    before = show("before")
    edit = ROMECallback([request], "fact-model", second_moment=second_moment,
                        apply_on="validation_start", revert=False)
    loader = DataLoader(corpus[:64], batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[edit])
    trainer.validate(module, dataloaders=loader, verbose=False)
    after = show("after")
    return {"before_new": before["p_new"], "after_new": after["p_new"],
            "after_true": after["p_true"]}


if __name__ == "__main__":
    main()
