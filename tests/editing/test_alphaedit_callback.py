"""AlphaEdit inside a Trainer through the generic EditorCallback: its preserved keys K_p are
saved in the checkpoint (loadable with weights_only=True) and restored from it."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "callbacks"))
from helpers import LMModule

from lightning_rome.callbacks import EditorCallback
from lightning_rome.editing import AlphaEdit
from lightning_rome.testing import get_fact_model, prefers
from lightning_rome.utils.io import tensor_checksum

HP = {"layers": [1], "fact_token": "last", "v_num_grad_steps": 25, "clamp_norm_factor": 12.0,
      "v_weight_decay": 0.01, "context_template_lengths": [[6, 2]],
      "context_template_starts": None, "key_average": "templates", "mom2_n_samples": 2000,
      "nullspace_threshold": 1e-3, "l2_weight": 0.01}


def test_editor_state_goes_into_the_checkpoint(tmp_path):
    fm = get_fact_model()
    corpus = list(fm.kb.text_corpus())
    reqs = fm.edit_requests(2, seed=11)
    before = {n: tensor_checksum(p) for n, p in fm.model.named_parameters()}
    cb = EditorCallback(reqs, AlphaEdit(HP, corpus=corpus), apply_on="fit_start", revert=True)
    assert cb.method == "alphaedit"
    module = LMModule(fm.model, fm.tokenizer, lr=0.0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[cb])
    seen = {}

    class Probe(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            pl_module.model.eval()  # no dropout while checking
            seen["edited"] = prefers(pl_module.model, fm.tokenizer, [r.text for r in reqs],
                                     [r.target_new for r in reqs], [r.target_true for r in reqs])

    trainer.callbacks.append(Probe())
    trainer.fit(module)
    assert all(seen["edited"])
    assert {n: tensor_checksum(p) for n, p in fm.model.named_parameters()} == before  # reverted
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][cb.state_key]
    assert "editor_state" in state
    fresh = AlphaEdit(HP, corpus=corpus)
    cb2 = EditorCallback(reqs, fresh, apply_on="fit_start")
    cb2.load_state_dict(state)
    kp = fresh.preserved_keys["transformer.h.1.mlp.c_proj"]
    assert kp.shape == (384, 2) and fresh.n_preserved_edits == 2
    assert torch.equal(kp, cb._editor.preserved_keys["transformer.h.1.mlp.c_proj"])
