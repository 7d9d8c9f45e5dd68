"""Hypernetwork editors: MEND (Mitchell et al., 2022) and KnowledgeEditor (De Cao et al., 2021).

Both are trained networks that turn the fine-tuning gradient of an edit into a weight update, and
share everything but that network. One concept per file:

- :mod:`~lightning_rome.editing.hypernet.rows`: the ``prompt ‖ target`` token rows and the
  per-row measures (target NLL and accuracy, locality KL and agreement);
- :mod:`~lightning_rome.editing.hypernet.gradients`: the gradient decomposition
  ``∇_W L = Σ_t δ_t u_tᵀ``, the edited forward pass through hooks, edits as a patch;
- :mod:`~lightning_rome.editing.hypernet.objective`: the training objective's edit and
  locality terms, shared by both methods;
- :mod:`~lightning_rome.editing.hypernet.weights`: which weights are edited, and whether a
  trained editor fits a model;
- :mod:`~lightning_rome.editing.hypernet.checkpoint`: the editor entry of a module's checkpoint;
- :mod:`~lightning_rome.editing.hypernet.editor`: what a trained editor does around its network
  (loading it from a checkpoint, the checks before every edit);
- :mod:`~lightning_rome.editing.hypernet.mend` and :mod:`~lightning_rome.editing.hypernet.ke`:
  each method's hyperparameters, network, losses and editor (:class:`MEND`, :class:`KE`).

The Lightning side (training with ``Trainer.fit``) is :class:`lightning_rome.modules.MENDModule`
and :class:`lightning_rome.modules.KEModule`.
"""

from lightning_rome.editing.hypernet.checkpoint import CHECKPOINT_KEY, read_editor_checkpoint
from lightning_rome.editing.hypernet.editor import HypernetEditor
from lightning_rome.editing.hypernet.gradients import (
    LowRankEdit,
    TokenFactors,
    decompose_gradient,
    edited_logits,
    edits_to_patch,
)
from lightning_rome.editing.hypernet.ke import (
    KE,
    KEHyperParams,
    KENetwork,
    condition_ids,
    ke_losses,
    ke_margin,
)
from lightning_rome.editing.hypernet.mend import (
    MEND,
    LowRankMLP,
    MENDHyperParams,
    MENDNetwork,
    RunningMoments,
    mend_losses,
)
from lightning_rome.editing.hypernet.objective import check_training_batch, edit_objective
from lightning_rome.editing.hypernet.rows import (
    TokenRows,
    edit_rows,
    locality_agreement,
    locality_kl,
    target_accuracy,
    target_row_nll,
)
from lightning_rome.editing.hypernet.weights import (
    EditorMismatchError,
    check_editor_fits,
    resolve_layers,
    weights_fingerprint,
)

__all__ = [
    "CHECKPOINT_KEY",
    "KE",
    "MEND",
    "EditorMismatchError",
    "HypernetEditor",
    "KEHyperParams",
    "KENetwork",
    "LowRankEdit",
    "LowRankMLP",
    "MENDHyperParams",
    "MENDNetwork",
    "RunningMoments",
    "TokenFactors",
    "TokenRows",
    "check_editor_fits",
    "check_training_batch",
    "condition_ids",
    "decompose_gradient",
    "edit_objective",
    "edit_rows",
    "edited_logits",
    "edits_to_patch",
    "ke_losses",
    "ke_margin",
    "locality_agreement",
    "locality_kl",
    "mend_losses",
    "read_editor_checkpoint",
    "resolve_layers",
    "target_accuracy",
    "target_row_nll",
    "weights_fingerprint",
]
