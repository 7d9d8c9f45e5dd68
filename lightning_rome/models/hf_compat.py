"""Every use of a private or version-dependent ``transformers`` API, in one place, with a probe.

The rest of the package calls models only through their public ``forward``
(``model(input_ids=..., use_cache=...)``) and module hooks. Four things need more, and they
live here:

* **The cache keyword and attribute.** transformers 5.25 renamed ``past_key_values`` to
  ``cache`` (in ``model.forward``, the blocks, ``create_causal_mask`` and the model outputs; the
  old name warns and "will be removed in version 5.40.0"). :func:`cache_keyword`,
  :func:`forward_cache_kwargs` and :func:`output_cache` pick whichever name the installed version
  declares, preferring ``cache``.
* **The attention implementation** (the private ``config._attn_implementation``):
  :func:`attn_implementation`.
* **The cache layout** (``transformers.cache_utils``): :func:`cache_layer_kv` reads one layer's
  keys and values from ``cache.layers[j].keys/.values`` (a ``DynamicCache``) or a legacy tuple.
* **Calling blocks directly** (the prefix tracing engine): :class:`PrefixBlocks` calls
  ``blocks[j](h, attention_mask=..., position_ids=..., <cache keyword>=..., position_embeddings=...)``
  the way the model's own forward does, which relies on

  - ``transformers.masking_utils.create_causal_mask`` (private) for the 4-D causal mask;
  - the base model's ``rotary_emb(x, position_ids)`` (Llama, GPT-J, GPT-NeoX in transformers 5)
    for the rotary ``position_embeddings``;
  - the block call signature (its cache keyword: ``cache``, ``past_key_values``,
    ``past_key_value`` or ``layer_past``);
  - the cache ``update(key_states, value_states, layer_idx, ...)`` protocol: the attention
    calls it with the new tokens' keys and values, ``(B, H, Q, d_head)``, and attends to what it
    returns.

  None of this is public API, so :func:`probe_prefix_blocks` checks it on the actual model once
  (per model object): it runs a short input through the public ``model(...)``, recomputes every
  block's output on a suffix from the prefix's cached keys and values through
  :class:`PrefixBlocks`, and compares. If anything is missing, renamed or computes different
  numbers, it returns the reason, and callers use the engine that needs only the public
  forward (same numbers, slower), after one :class:`HFCompatWarning` (:func:`warn_once`).

Checked with transformers 5.25.0 (GPT-2, GPT-J, GPT-NeoX and Llama, eager and SDPA attention).
The fallback keeps the package working on versions that change these internals; the probe is
what decides, not the version number.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rome.models.layout import ModelLayout

__all__ = [
    "CACHE_KEYWORDS",
    "HFCompatWarning",
    "PrefixBlocks",
    "attn_implementation",
    "cache_keyword",
    "cache_layer_kv",
    "forward_cache_kwargs",
    "output_cache",
    "probe_prefix_blocks",
    "warn_once",
]

#: The names a cache argument has had, newest first (``past_key_value``: the blocks of
#: transformers 4.x; ``layer_past``: GPT-NeoX's blocks, GPT-2's in 4.x).
CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values", "past_key_value", "layer_past")


class HFCompatWarning(UserWarning):
    """A fast path that relies on transformers internals is not available with the installed
    version: the package uses its public-API path instead (same numbers, slower)."""


_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 2) -> None:
    """Issue ``message`` as an :class:`HFCompatWarning`, once per process."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, HFCompatWarning, stacklevel=stacklevel + 1)


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None


def cache_keyword(fn: Callable[..., Any] | nn.Module) -> str | None:
    """The name under which ``fn`` (a function, or a module's ``forward``) takes its cache:
    the first of :data:`CACHE_KEYWORDS` that its signature declares, else ``None``."""
    params = _parameters(fn.forward if isinstance(fn, nn.Module) else fn)
    if params is None:
        return None
    return next((name for name in CACHE_KEYWORDS if name in params), None)


def forward_cache_kwargs(model: nn.Module, cache: object) -> dict[str, object]:
    """``{keyword: cache}`` for ``model(...)``, with the keyword its forward declares.

    Raises:
        TypeError: the forward takes no cache argument under any known name.
    """
    name = cache_keyword(model)
    if name is None:
        raise TypeError(f"{type(model).__name__}.forward takes no cache argument (none of "
                        f"{CACHE_KEYWORDS}); incremental decoding needs one")
    return {name: cache}


def output_cache(out: object) -> object | None:
    """The cache a model output returned (``out.cache`` in transformers >= 5.25, else
    ``out.past_key_values``), or ``None``."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        if name in fields:
            return getattr(out, name)
    return None


def attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation the model runs (``"eager"``, ``"sdpa"``, ...), from the
    private ``config._attn_implementation``; ``None`` when it cannot be read."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def cache_layer_kv(cache: object, layer: int) -> tuple[Tensor, Tensor]:
    """Layer ``layer``'s keys and values in ``cache``, ``(B, H, T, d_head)`` each."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    k, v = cache[layer][:2]  # type: ignore[index]  # legacy tuple caches
    return k, v


# --------------------------------------------------------------------------------------------
# calling blocks on a suffix, from the prefix's keys and values
# --------------------------------------------------------------------------------------------
class _PrefixKV:
    """Stands in for a cache inside one block call: the attention calls ``update`` with the new
    tokens' keys and values and attends to the prefix's + them. With ``capture`` it keeps the new
    keys and values and stops the block (:class:`_KVCaptured`)."""

    def __init__(self, keys: Tensor | None, values: Tensor | None, capture: bool = False) -> None:
        self.keys, self.values = keys, values  # (B, H, i, d_head) or None for no prefix
        self.capture = capture

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        if self.capture:
            self.keys, self.values = key_states, value_states  # (B, H, Q, d_head)
            raise _KVCaptured
        if self.keys is None or self.values is None:
            return key_states, value_states
        return (torch.cat([self.keys, key_states], dim=-2),  # (B, H, i + Q, d_head)
                torch.cat([self.values, value_states], dim=-2))


class _KVCaptured(Exception):
    """Raised inside a block once its attention has produced the keys and values we need."""


def _causal_mask(model: nn.Module, x: Tensor, pos: Tensor) -> Tensor:
    """The model's own 4-D causal mask for ``x`` ``(1, T, d)``: ``(1, 1, T, T)``."""
    from transformers.masking_utils import create_causal_mask  # private

    params = _parameters(create_causal_mask) or {}
    kwargs: dict[str, object] = {}
    name = cache_keyword(create_causal_mask)
    if name is None:
        raise TypeError("create_causal_mask takes no cache argument")
    kwargs[name] = None
    if "allow_is_causal_skip" in params:
        kwargs["allow_is_causal_skip"] = False  # always a tensor, never "no mask needed"
    mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None,
                              position_ids=pos, **kwargs)
    if not isinstance(mask, Tensor) or mask.ndim != 4:
        raise TypeError(f"create_causal_mask returned {type(mask).__name__}, not a 4-D tensor")
    return mask


class PrefixBlocks:
    """Calls a model's blocks on a suffix of a ``T``-token sequence, attending to the prefix's
    keys and values, the way the model's own forward calls them.

    Args:
        model: the causal LM (in eval mode).
        layout: its layout.
        x: ``(1, T, d)``, any tensor of the sequence's length, dtype and device (for the mask and
            the rotary embeddings).

    Raises:
        ImportError, TypeError, AttributeError: the installed transformers does not offer what
            this needs (see the module docstring); :func:`probe_prefix_blocks` turns these into
            a reason.
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, x: Tensor) -> None:
        self.model, self.layout = model, layout
        self.blocks = model.get_submodule(layout.blocks)
        T = x.shape[1]
        self.pos = torch.arange(T, device=x.device)[None]  # (1, T)
        self.mask = _causal_mask(model, x, self.pos)  # (1, 1, T, T)
        params = _parameters(self.blocks[0].forward) or {}
        name = cache_keyword(self.blocks[0])
        if name is None:
            raise TypeError(f"{type(self.blocks[0]).__name__}.forward takes no cache argument "
                            f"(none of {CACHE_KEYWORDS})")
        self.cache_name = name
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.pass_position_ids = "position_ids" in params or var_kw
        self.rope: tuple[Tensor, ...] | None = None
        base = model.get_submodule(layout.blocks.rsplit(".", 1)[0])
        rotary = getattr(base, "rotary_emb", None)
        if rotary is not None:
            if "position_embeddings" not in params:
                raise TypeError(f"the model has rotary_emb but {type(self.blocks[0]).__name__} "
                                "takes no position_embeddings")
            self.rope = tuple(rotary(x, position_ids=self.pos))  # e.g. cos, sin: (1, T, d_rot)

    def _call(self, j: int, h: Tensor, start: int, cache: _PrefixKV | None) -> Tensor:
        stop = start + h.shape[1]
        kwargs: dict[str, object] = {
            "attention_mask": self.mask[:, :, start:stop, :stop],  # (1, 1, Q, stop)
            self.cache_name: cache,
            "use_cache": False,
        }
        if self.pass_position_ids:
            kwargs["position_ids"] = self.pos[:, start:stop]
        if self.rope is not None:
            kwargs["position_embeddings"] = tuple(t[:, start:stop] for t in self.rope)
        out = self.blocks[j](h, **kwargs)
        return out if isinstance(out, Tensor) else out[0]

    def block(self, j: int, h: Tensor, start: int, kv: tuple[Tensor, Tensor] | None) -> Tensor:
        """Block ``j`` on tokens ``start .. start + Q − 1`` (``h``: ``(B, Q, d)``), attending to
        ``kv``, the keys and values of the tokens before ``start`` (``None`` when
        ``start == 0``). Returns ``(B, Q, d)``."""
        return self._call(j, h, start, _PrefixKV(*kv) if kv is not None else None)

    def keys_values(self, j: int, h: Tensor, start: int, kv: tuple[Tensor, Tensor] | None,
                    ) -> tuple[Tensor, Tensor]:
        """The keys and values block ``j`` computes for tokens ``start .. start + Q − 1``,
        ``(B, H, Q, d_head)`` each, without running the rest of the block."""
        cache = _PrefixKV(*(kv or (None, None)), capture=True)
        try:
            self._call(j, h, start, cache)
        except _KVCaptured:
            assert cache.keys is not None and cache.values is not None
            return cache.keys, cache.values
        raise TypeError(f"block {j} did not call its cache's update()")


# --------------------------------------------------------------------------------------------
# the probe
# --------------------------------------------------------------------------------------------
_PROBE_T, _PROBE_SPLIT = 5, 2
_probes: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], str | None]] = (
    weakref.WeakKeyDictionary())


def _probe_key(model: nn.Module) -> tuple[object, ...]:
    import transformers

    return (transformers.__version__, attn_implementation(model), next(model.parameters()).dtype)


def _close(got: Tensor, want: Tensor) -> bool:
    tol = 1e-4 if want.dtype in (torch.float32, torch.float64) else 3e-2
    scale = float(want.abs().max().clamp_min(1.0))
    return got.shape == want.shape and bool(((got - want).abs() <= tol * scale).all())


@torch.no_grad()
def _probe(model: nn.Module, layout: ModelLayout) -> str | None:
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = (torch.arange(_PROBE_T, device=device) * 7 + 3) % vocab  # (T,)
    blocks = model.get_submodule(layout.blocks)
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}
    handles = []
    for j, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, kwargs, j=j: inputs.__setitem__(
                j, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda _m, _a, out, j=j: outputs.__setitem__(
                j, out if isinstance(out, Tensor) else out[0])))
    try:
        out = model(input_ids=ids[None], use_cache=True)
    finally:
        for h in handles:
            h.remove()
    cache = output_cache(out)
    if cache is None:
        return "the model returned no cache with use_cache=True"
    runner = PrefixBlocks(model, layout, inputs[0])
    s = _PROBE_SPLIT
    for j in range(len(blocks)):
        k, v = cache_layer_kv(cache, j)  # (1, H, T, d_head)
        x, y = inputs[j], outputs[j]  # (1, T, d)
        if not _close(runner.block(j, x, 0, None), y):
            return f"block {j} called directly on the whole sequence disagrees with the model"
        if not _close(runner.block(j, x[:, s:], s, (k[:, :, :s], v[:, :, :s])), y[:, s:]):
            return f"block {j} run on a suffix from the cached prefix disagrees with the model"
        k2, v2 = runner.keys_values(j, x[:, s:], s, (k[:, :, :s], v[:, :, :s]))
        if not (_close(k2, k[:, :, s:]) and _close(v2, v[:, :, s:])):
            return f"the keys and values block {j} passes to its cache differ from the model's"
    return None


def probe_prefix_blocks(model: nn.Module, layout: ModelLayout) -> str | None:
    """``None`` if :class:`PrefixBlocks` reproduces ``model``'s own forward with the installed
    transformers, else the reason it does not. Runs once per model (and transformers version,
    attention implementation and dtype) in eval mode; every submodule's mode is restored."""
    key = _probe_key(model)
    hit = _probes.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        reason = _probe(model, layout)
    except Exception as err:  # any failure of a private API means "fall back"
        reason = f"{type(err).__name__}: {err}"
    finally:
        for m, mode in modes:  # every submodule's own flag, as it was
            m.training = mode
    _probes[model] = (key, reason)
    return reason
