"""The suffix pass of the value optimisation: nothing before the lookup token sees δ.

ROME's v* and MEMIT's z are optimised by adding δ at one module's output at each row's lookup
token (the subject's fact token) and scoring the target tokens after it. The tokens *before* the
lookup token never see δ (attention is causal), so their keys and values in every layer are the
same at every step. :class:`SuffixRows` computes them once, in one pass over the prefixes (the
tokens before each row's lookup token), and each optimisation step then runs the model only over
the suffixes (the lookup token and everything after it), attending to the cached prefix through
the model's public cache argument (``cache``; ``past_key_values`` before transformers 5.25:
:func:`~lightning_rome.models.hf_compat.forward_cache_kwargs`). With 21 context
templates of up to 10 tokens before a 10-token prompt, a step runs about a quarter of the tokens.

Layout. A row of real length ``n_r`` with lookup index ``l_r`` splits into the prefix
``x[:l_r]`` and the suffix ``x[l_r:n_r]``. Prefixes are right-padded to ``P = max l_r`` and
computed with every position attended (so that no query of a padding token is fully masked; the
real tokens come first and, by causality, never see the padding); the suffix pass masks the
padding columns of the prefix out. Suffixes are right-padded to ``S = max (n_r − l_r)``. Position
ids are the rows' own, so a row's suffix is computed exactly as in the full row.

:func:`suffix_pass_agrees` checks once per model, on the first optimisation, that the suffix
pass gives the full pass's numbers; a model whose cache does not support it (another cache
class, a model that ignores ``position_ids``) keeps the full pass.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rome.models.hf_compat import forward_cache_kwargs, output_cache

__all__ = ["SuffixRows", "known_verdict", "suffix_pass_agrees"]


@dataclass
class SuffixRows:
    """Rows split at their lookup tokens, with the prefix's keys and values cached.

    Attributes:
        input_ids: ``(R, S)`` the suffix tokens, right-padded.
        attention_mask: ``(R, P + S)`` the prefix's real tokens and the suffix's.
        position_ids: ``(R, S)`` the suffix tokens' positions in their full rows.
        cache: the prefix's ``past_key_values`` (``None`` when no row has a prefix).
        offset: ``(R,)`` each row's lookup index: full position ``p`` is suffix position
            ``p − offset``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    cache: Any
    offset: Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, body: nn.Module, input_ids: Tensor, attention_mask: Tensor,
              position_ids: Tensor, lookup: Tensor) -> SuffixRows:
        """Split right-padded rows ``(R, T)`` at ``lookup`` ``(R,)`` and run the prefix pass.

        Raises:
            ValueError: a lookup index is outside its row.
        """
        lens = attention_mask.sum(1)  # (R,)
        if bool((lookup < 0).any()) or bool((lookup >= lens).any()):
            raise ValueError("every lookup index must lie inside its row")
        R, T = input_ids.shape
        dev = input_ids.device
        P = int(lookup.max())
        S = int((lens - lookup).max())
        # Suffix: full position lookup + j, right-padded.
        src = lookup[:, None] + torch.arange(S, device=dev)[None]  # (R, S)
        real = src < lens[:, None]  # (R, S)
        src = src.clamp(max=T - 1)
        s_ids = input_ids.gather(1, src).masked_fill(~real, 0)  # (R, S)
        s_pos = position_ids.gather(1, src)  # (R, S) (a pad repeats a real position)
        cache = None
        mask = real.long()  # (R, S)
        if P > 0:
            cols = torch.arange(P, device=dev)[None].expand(R, P)  # (R, P)
            p_real = cols < lookup[:, None]  # (R, P)
            p_ids = input_ids[:, :P].masked_fill(~p_real, 0)  # (R, P) right-padded
            p_pos = position_ids[:, :P]  # (R, P)
            out = body(input_ids=p_ids, attention_mask=torch.ones_like(p_ids),
                       position_ids=p_pos, use_cache=True)
            cache = output_cache(out)
            if cache is None:
                raise TypeError(f"{type(body).__name__} returned no cache for the prefixes")
            mask = torch.cat([p_real.long(), mask], 1)  # (R, P + S)
        return cls(s_ids, mask, s_pos, cache, lookup.clone())

    def hidden(self, body: nn.Module) -> Tensor:
        """The body's last hidden states at the suffix tokens, ``(R, S, d)`` (the cached prefix
        is copied, so every call starts from the same prefix)."""
        if self.cache is None:
            return body(input_ids=self.input_ids, attention_mask=self.attention_mask,
                        position_ids=self.position_ids, use_cache=False)[0]  # (R, S, d)
        past = copy.deepcopy(self.cache)  # the model appends the suffix to the cache it gets
        out = body(input_ids=self.input_ids, attention_mask=self.attention_mask,
                   position_ids=self.position_ids, use_cache=True,
                   **forward_cache_kwargs(body, past))
        return out[0]  # (R, S, d)


_VERDICT: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def suffix_pass_agrees(model: nn.Module, full: tuple[Tensor, Tensor],
                       suffix: tuple[Tensor, Tensor] | None) -> bool:
    """Record (once per model) whether the suffix pass's log-probabilities and lookup values
    equal the full pass's at δ = 0; ``suffix=None`` records a suffix pass that failed.

    The tolerance is 1e-3 in float32/float64 (the two passes sum attention in another order)
    and 0.25 for 16-bit models (a model that ignores the cache or the positions is off by
    whole nats)."""
    ok = False
    if suffix is not None:
        dtype = next(model.parameters()).dtype
        tol = 0.25 if dtype in (torch.float16, torch.bfloat16) else 1e-3
        ok = all(a.shape == b.shape and bool(torch.isfinite(b).all())
                 and float((a - b).abs().max()) <= tol * max(1.0, float(a.abs().max()))
                 for a, b in zip(full, suffix))
    _VERDICT[model] = ok
    return ok


def known_verdict(model: nn.Module) -> bool | None:
    """Whether the suffix pass was found to agree on this model (``None``: not checked yet)."""
    return _VERDICT.get(model)
