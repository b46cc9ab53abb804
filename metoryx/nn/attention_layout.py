"""``AttentionLayout``: where Hugging Face models keep the projections of an attention layer.

``mx.MultiHeadAttention`` has four ``Dense`` projections, ``query``, ``key``, ``value`` and
``out``, each with a kernel ``(in, out)``. By default they read the ``state_dict`` of
``torch.nn.MultiheadAttention`` (a fused ``in_proj_weight``). Hugging Face models store them
otherwise, and ``MultiHeadAttention(..., torch_layout=AttentionLayout(...))`` names their
layout, so that their checkpoints load without a subclass:

- separate ``nn.Linear`` layers, weights ``(out, in)``: Llama, Mistral, Qwen
  (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; fewer key/value heads with grouped-query
  attention), BERT (``self.query``, ``self.key``, ``self.value``, ``output.dense``);
- one fused projection of the queries, keys and values concatenated on the output axis:
  GPT-2's ``c_attn``, a ``Conv1D`` whose weight is stored ``(in, out)``, with ``c_proj``.

The layout only renames and reshapes entries (:mod:`metoryx.layout`): the variables and the
computation of the layer are the same with every layout.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from metoryx import errors
from metoryx.layout import TorchConversion, fused, same, transposed

__all__ = ["AttentionLayout"]

_PROJECTIONS = ("query", "key", "value")
_ALL = (*_PROJECTIONS, "out")


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """The names and storage of an attention layer's projections in a PyTorch ``state_dict``.

    Give either ``query``, ``key`` and ``value`` (three projections) or ``qkv`` (one fused
    projection, the query, key and value features concatenated on its output axis, in that
    order), and ``out``. Each name is a module path relative to the attention layer, dotted
    as PyTorch writes it (``"q_proj"``, ``"self.query"``); its entries are ``<name>.weight``
    and, if the layer has biases, ``<name>.bias``.

    Args:
        query: the query projection's name (with ``key`` and ``value``).
        key: the key projection's name; with grouped-query attention it has
            ``num_kv_heads * head_dim`` outputs, as have Llama's and Mistral's ``k_proj``.
        value: the value projection's name.
        qkv: the fused projection's name, instead of the three above.
        out: the output projection's name.
        weights: how weights are stored: ``"linear"``, ``(out, in)`` as ``torch.nn.Linear``
            (transposed into our ``(in, out)`` kernels); ``"conv1d"``, ``(in, out)`` as the
            ``Conv1D`` of GPT-2 and its family (taken as they are).

    Raises:
        LayerConfigError: if the names are neither the three separate ones nor ``qkv``, a
            name is not a non-empty str, or ``weights`` is not ``"linear"`` or ``"conv1d"``.

    Example:
        Llama with grouped-query attention, 8 query heads sharing 2 key/value heads:

        >>> import metoryx as mx
        >>> llama = mx.AttentionLayout(query="q_proj", key="k_proj", value="v_proj", out="o_proj")
        >>> layer = mx.MultiHeadAttention(8, 64, num_kv_heads=2, use_bias=False,
        ...                               torch_layout=llama)
        >>> [c.torch_keys[0] for c in mx.layout.torch_conversions(layer)]
        ['q_proj.weight', 'k_proj.weight', 'v_proj.weight', 'o_proj.weight']

        GPT-2's fused ``c_attn`` (weight ``(64, 192)``) and ``c_proj``:

        >>> gpt2 = mx.AttentionLayout(qkv="c_attn", out="c_proj", weights="conv1d")
        >>> layer = mx.MultiHeadAttention(4, 64, torch_layout=gpt2)
        >>> [c.torch_keys[0] for c in mx.layout.torch_conversions(layer)]
        ['c_attn.weight', 'c_proj.weight', 'c_attn.bias', 'c_proj.bias']
    """

    query: str | None = None
    key: str | None = None
    value: str | None = None
    qkv: str | None = None
    out: str = "out_proj"
    weights: Literal["linear", "conv1d"] = "linear"

    def __post_init__(self) -> None:
        separate = (self.query, self.key, self.value)
        if (self.qkv is None) == any(n is None for n in separate) or (
            self.qkv is not None and any(n is not None for n in separate)
        ):
            raise errors.LayerConfigError(
                f"AttentionLayout: name either the three projections (query, key, value) or "
                f"the fused one (qkv), got query={self.query!r}, key={self.key!r}, "
                f"value={self.value!r}, qkv={self.qkv!r}. E.g. AttentionLayout(query="
                f"'q_proj', key='k_proj', value='v_proj', out='o_proj') for Llama, or "
                f"AttentionLayout(qkv='c_attn', out='c_proj', weights='conv1d') for GPT-2."
            )
        for field in ("query", "key", "value", "qkv", "out"):
            name = getattr(self, field)
            if name is not None and (not isinstance(name, str) or not name):
                raise errors.LayerConfigError(
                    f"AttentionLayout: `{field}` must be the projection's module name as "
                    f"PyTorch writes it (a non-empty str such as 'q_proj' or 'self.query'), "
                    f"got {name!r}."
                )
        if self.weights not in ("linear", "conv1d"):
            raise errors.LayerConfigError(
                f"AttentionLayout: `weights` must be 'linear' (stored (out, in), as "
                f"torch.nn.Linear) or 'conv1d' (stored (in, out), as GPT-2's Conv1D), got "
                f"{self.weights!r}."
            )

    def conversions(self, qkv_size: int, kv_size: int, use_bias: bool) -> list[TorchConversion]:
        """The conversions of a ``MultiHeadAttention``'s four projections in this layout.

        Args:
            qkv_size: the outputs of the query projection (``num_heads * head_dim``).
            kv_size: the outputs of the key and of the value projections.
            use_bias: whether the projections have biases.

        Example:
            >>> import metoryx as mx
            >>> gpt2 = mx.AttentionLayout(qkv="c_attn", out="c_proj", weights="conv1d")
            >>> [c.variables for c in gpt2.conversions(16, 16, use_bias=False)]
            [('query/kernel', 'key/kernel', 'value/kernel'), ('out/kernel',)]
        """
        linear = self.weights == "linear"

        def weight(name: str, variable: str) -> TorchConversion:
            if linear:
                return transposed(f"{name}.weight", variable, (1, 0))
            return same(f"{name}.weight", variable)

        if self.qkv is None:
            pairs = list(zip((self.query, self.key, self.value, self.out), _ALL, strict=True))
            result = [weight(str(n), f"{v}/kernel") for n, v in pairs]
            biases = [same(f"{n}.bias", f"{v}/bias") for n, v in pairs]
        else:
            sizes = (qkv_size, kv_size, kv_size)
            kernels = [f"{v}/kernel" for v in _PROJECTIONS]
            result = [
                fused(f"{self.qkv}.weight", kernels, sizes, transpose=linear),
                weight(self.out, "out/kernel"),
            ]
            biases = [
                fused(f"{self.qkv}.bias", [f"{v}/bias" for v in _PROJECTIONS], sizes, False),
                same(f"{self.out}.bias", "out/bias"),
            ]
        return result + biases if use_bias else result
