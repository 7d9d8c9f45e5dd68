"""The objective that MEND and KE train under: the edit loss on the equivalence rows and the
locality KL, from batched edited forward passes (each case edited on its own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rome.editing.hypernet.gradients import LowRankEdit, edited_logits
from lightning_rome.editing.hypernet.rows import (
    locality_agreement,
    locality_kl,
    rows_to_device,
    target_accuracy,
    target_row_nll,
)
from lightning_rome.scoring import forward_logits, model_device

__all__ = ["check_training_batch", "edit_objective"]


def check_training_batch(batch: Any, method: str) -> None:
    """Refuse what is not a training batch with edit, equivalence and locality rows."""
    for part in ("edit", "equiv", "loc"):
        if not hasattr(batch, part):
            raise TypeError(
                f"{method} trains on EditTrainingBatch (edit, equiv and loc rows), got "
                f"{type(batch).__name__}; use a DataModule with mode='edit_train' or "
                "lightning_rome.data.EditTrainingCollator as the collate_fn")
    if batch.loc is None or len(batch.loc) == 0:
        raise ValueError(f"{method} needs locality examples, but this batch has no locality rows "
                         "(batch.loc is empty): the locality loss cannot be computed; give the "
                         "cases neighborhood prompts or let the collator draw them from other "
                         "cases (locality='other' with a pool of several cases)")
    if len(batch.edit) == 0 or len(batch.equiv) == 0:
        raise ValueError(f"{method} needs edit and equivalence rows; this batch has "
                         f"{len(batch.edit)} and {len(batch.equiv)}")


def edit_objective(model: nn.Module, edits: Mapping[str, LowRankEdit], batch: Any, *,
                    c_edit: float, c_loc: float, edit_rows_too: bool) -> dict[str, Tensor]:
    """``c_edit · L_e + c_loc · L_loc`` and diagnostics, shared by MEND and KE. ``L_e`` is the
    mean over the equivalence rows (and the edit rows too with ``edit_rows_too``, KE's ``{x} ∪
    P^x``) of each row's mean per-token NLL of the new target."""
    with torch.inference_mode(False), torch.enable_grad():
        device = model_device(model)
        loc = rows_to_device(batch.loc, device)
        with torch.no_grad():
            base_loc = forward_logits(model, loc)  # (N_loc, T, V)  p_θ
        equiv_logits = edited_logits(model, batch.equiv, edits)  # (N_eq, T, V)
        equiv = rows_to_device(batch.equiv, device)
        nll = target_row_nll(equiv_logits, equiv)  # (N_eq,)
        acc = target_accuracy(equiv_logits.detach(), equiv)
        if edit_rows_too:
            ed = rows_to_device(batch.edit, device)
            edit_logits = edited_logits(model, ed, edits)
            nll = torch.cat([target_row_nll(edit_logits, ed), nll])
            acc = torch.cat([target_accuracy(edit_logits.detach(), ed), acc])
        loc_logits = edited_logits(model, loc, edits)  # (N_loc, T, V)  p_θ̃
        L_e = nll.mean()
        L_loc = locality_kl(base_loc, loc_logits, loc)
        loss = c_edit * L_e + c_loc * L_loc
    return {"loss": loss, "edit_nll": L_e, "loc_kl": L_loc, "edit_acc": acc.mean(),
            "loc_agree": locality_agreement(base_loc, loc_logits.detach(), loc)}
