"""What the trained hypernetwork editors (:class:`~lightning_rome.editing.hypernet.MEND`,
:class:`~lightning_rome.editing.hypernet.KE`) share: the network they hold, loading it from a
module's checkpoint for a model it fits, and the checks every edit makes before any work."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import Self

from lightning_rome.editing.hparams import HyperParams
from lightning_rome.editing.hypernet.checkpoint import read_editor_checkpoint
from lightning_rome.editing.hypernet.rows import checked_requests
from lightning_rome.editing.hypernet.weights import check_editor_fits
from lightning_rome.models.modes import in_eval_mode
from lightning_rome.models.weights import weight_param_name
from lightning_rome.patches import WeightPatch
from lightning_rome.requests import EditRequest
from lightning_rome.scoring import model_device
from lightning_rome.utils.modules import unwrap_model

__all__ = ["HypernetEditor"]


class HypernetEditor:
    """A trained hypernetwork editor: ``edit(model, tokenizer, requests)`` returns a low-rank
    :class:`~lightning_rome.patches.WeightPatch`; the model is left bit-identical.

    Args:
        network: the trained network (``module_names``, ``shapes``, ``hparams``).
        fingerprint: ``{parameter: checksum}`` of the weights it was trained on (a record;
            :meth:`from_checkpoint` checks it, while :meth:`edit` only checks that the edited
            weights exist with their shapes, so that edits can follow other edits).
        model_name: the base model it was trained on (for messages and patches).

    Subclasses set :attr:`method` and :attr:`hparams_class` and define :meth:`build_network`
    and :meth:`patch_for`.
    """

    method: ClassVar[str] = ""
    hparams_class: ClassVar[type[HyperParams]] = HyperParams

    def __init__(self, network: nn.Module, *, fingerprint: Mapping[str, str] | None = None,
                 model_name: str | None = None) -> None:
        self.network = network
        self.fingerprint = dict(fingerprint) if fingerprint else None
        self.model_name = model_name

    @property
    def hparams(self) -> Any:
        return self.network.hparams

    @classmethod
    def build_network(cls, shapes: Mapping[str, Sequence[int]], hparams: Any,
                      meta: Mapping[str, Any]) -> nn.Module:
        """An untrained network of the checkpoint's shapes (its metadata ``meta`` gives what
        else the network needs)."""
        raise NotImplementedError(f"{cls.__name__} does not build a network")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], model: nn.Module,
                        tokenizer: PreTrainedTokenizerBase | None = None, *,
                        check_fingerprint: bool = True) -> Self:
        """Load the editor of a module checkpoint (``MENDModule``/``KEModule``) for ``model``.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file holds no editor, or one of another method.
            EditorMismatchError: the checkpoint was trained for another model (a missing
                weight, another shape, or a fingerprint mismatch).
        """
        saved, state, meta = read_editor_checkpoint(path, cls.method)
        hp = cls.hparams_class.from_dict(saved["hparams"])
        check_editor_fits(model, meta["shapes"], meta["fingerprint"] if check_fingerprint
                          else None, trained_on=meta.get("model_name"))
        shapes = {m: meta["shapes"][weight_param_name(m)] for m in meta["module_names"]}
        network = cls.build_network(shapes, hp, meta)
        network.load_state_dict(state)
        network.to(model_device(model)).eval()
        return cls(network, fingerprint=meta["fingerprint"] if check_fingerprint else None,
                   model_name=meta.get("model_name"))

    @in_eval_mode
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Any,
             ) -> WeightPatch:
        """The update for ``requests`` as a :class:`~lightning_rome.patches.WeightPatch`; the
        model is not changed.

        Raises:
            ValueError: no requests, or a malformed one.
            SubjectNotFoundError: a request's subject is not in its prompt's tokens.
            EditorMismatchError: the model lacks an edited weight or has another shape.
        """
        model = unwrap_model(model)  # a torch.compile wrapper: its module
        reqs = checked_requests(tokenizer, requests, self.method)
        check_editor_fits(model, {weight_param_name(m): s for m, s in
                                  self.network.shapes.items()}, None, trained_on=self.model_name)
        return self.patch_for(model, tokenizer, reqs)

    def patch_for(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                  requests: list[EditRequest]) -> WeightPatch:
        """The patch of checked requests (the model in eval mode, unwrapped)."""
        raise NotImplementedError(f"{type(self).__name__} does not edit")
