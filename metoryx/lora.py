"""LoRA: low-rank adapters on a pretrained model's Dense, Einsum, Conv and Embed layers.

``mx.lora(model, rank)`` returns a copy of the model in which each chosen layer computes
``base(x) + (alpha / rank) * B(A(x))``: the pretrained layer, unchanged, plus a product of two
small matrices (Hu et al., 2021). Only ``A`` and ``B`` are trained, so a fine-tune stores and
updates a small fraction of the parameters. ``mx.merge_lora`` folds the trained adapters back
into the base weights, which gives the original architecture again, with no extra cost at
inference.

The wrapper, :class:`LoRA`, is transparent in paths, as the lifted wrappers are: the base
layer's variables keep their paths (``params/fc/kernel``), so a pretrained checkpoint still
loads, and the adapters sit beside them (``params/fc/lora_a``, ``params/fc/lora_b``), tagged
``"lora"`` for the filters: ``mx.partition(variables, mx.filters.tag("lora"), info)`` splits
what trains from what stays.
"""

from __future__ import annotations

import builtins
import difflib
import math
import string
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._core.paths import (
    Path,
    flatten_variables,
    path_str,
    unflatten_variables,
)
from metoryx._core.transform import mismatch_report
from metoryx._core.tree import walk
from metoryx._core.variables import Parameter
from metoryx.initializers import Initializer
from metoryx.nn._arguments import check_number, positive_int
from metoryx.nn._compute import (
    at_least_float32,
    bad_training_switch,
    cast,
    conv_dimension_numbers,
    mode_repr,
    one_batch_axis,
    training_flag,
)
from metoryx.nn.conv import Conv
from metoryx.nn.dropout import dropout as apply_dropout
from metoryx.nn.linear import Dense, Einsum, Embed
from metoryx.surgery import modules, replace, where_matcher

#: The tag of every adapter variable: ``mx.filters.tag("lora")`` selects them.
LORA_TAG = "lora"

#: What PEFT's default ``kaiming_uniform_(a=sqrt(5))`` draws for ``A``: bounds
#: ``±1 / sqrt(fan_in)``, i.e. variance ``1 / (3 * fan_in)``.
_A_SCALE = 1.0 / 3.0

# ---------------------------------------------------------------------------------------------
# The math per layer type: the adapter's shapes and initializers, its computation, and the
# product that merging adds to the base weight. One instance per type, no state.


class _Rule:
    """How ``A`` and ``B`` adapt one kind of layer."""

    #: The base layer's variable that the adapter's product is added to.
    weight = "kernel"

    def max_rank(self, base: Any) -> int:
        """The largest rank that is still low rank: the rank of the weight seen as a matrix."""
        raise NotImplementedError

    def limit(self, base: Any) -> str:
        """Where :meth:`max_rank` comes from, for the error message."""
        raise NotImplementedError

    def variables(
        self, base: Any, rank: int
    ) -> tuple[tuple[int, ...], Initializer, tuple[int, ...], Initializer]:
        """The shape and initializer of ``A``, then of ``B``."""
        raise NotImplementedError

    def adapter(self, base: Any, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """``B(A(x))`` in the dtype of ``x``, ``a`` and ``b`` (all one dtype)."""
        raise NotImplementedError

    def delta(self, base: Any, a: jax.Array, b: jax.Array) -> jax.Array:
        """The weight-shaped product that ``B(A(x))`` equals the base computation with."""
        raise NotImplementedError


class _DenseRule(_Rule):
    """``A`` ``(in_size, rank)``, ``B`` ``(rank, out_size)``: ``x @ A @ B``."""

    def max_rank(self, base: Dense) -> int:
        return min(base.in_size, base.out_size)

    def limit(self, base: Dense) -> str:
        return f"min(in_size, out_size) = min({base.in_size}, {base.out_size})"

    def variables(self, base: Dense, rank: int) -> Any:
        a_init = initializers.variance_scaling(_A_SCALE, "fan_in", "uniform")
        return (base.in_size, rank), a_init, (rank, base.out_size), initializers.zeros

    def adapter(self, base: Dense, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return (x @ a) @ b

    def delta(self, base: Dense, a: jax.Array, b: jax.Array) -> jax.Array:
        return a @ b


class _ConvRule(_Rule):
    """``A`` a convolution ``in_size -> groups * rank`` with the base's window, strides,
    padding, dilation and groups, kernel ``(*kernel_size, in_size // groups, groups * rank)``;
    ``B`` a grouped 1x1 convolution ``groups * rank -> out_size``, stored as its kernel
    ``(rank, out_size)`` without the 1x1 axes. With ``groups=1`` this is PEFT's LoRA of a
    convolution; with more groups, each group gets its own rank-``rank`` adapter, so the
    product keeps the base kernel's grouped layout."""

    def max_rank(self, base: Conv) -> int:
        window = math.prod(base.kernel_size)
        return min(window * base.in_size // base.groups, base.out_size // base.groups)

    def limit(self, base: Conv) -> str:
        window, g = math.prod(base.kernel_size), base.groups
        return (
            f"min(prod(kernel_size) * in_size // groups, out_size // groups) = "
            f"min({window} * {base.in_size} // {g}, {base.out_size} // {g})"
        )

    def variables(self, base: Conv, rank: int) -> Any:
        a_shape = (*base.kernel_size, base.in_size // base.groups, base.groups * rank)
        a_init = initializers.variance_scaling(_A_SCALE, "fan_in", "uniform")
        return a_shape, a_init, (rank, base.out_size), initializers.zeros

    def adapter(self, base: Conv, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        ndim = len(base.kernel_size)
        z = one_batch_axis(
            lambda x: lax.conv_general_dilated(
                x,
                a,
                window_strides=base.strides,
                padding=base.padding,
                rhs_dilation=base.dilation,
                dimension_numbers=conv_dimension_numbers(ndim),
                feature_group_count=base.groups,
            ),
            x,
            ndim,
        )
        g, rank = base.groups, b.shape[0]
        grouped = z.reshape(*z.shape[:-1], g, rank)
        y = jnp.einsum("...gr,rgo->...go", grouped, b.reshape(rank, g, -1))
        return y.reshape(*z.shape[:-1], base.out_size)

    def delta(self, base: Conv, a: jax.Array, b: jax.Array) -> jax.Array:
        g, rank = base.groups, b.shape[0]
        split = a.reshape(*a.shape[:-1], g, rank)
        product = jnp.einsum("...igr,rgo->...igo", split, b.reshape(rank, g, -1))
        return product.reshape(*a.shape[:-1], base.out_size)


class _EinsumRule(_Rule):
    """The kernel's letters split four ways: input letters (in the input, not the output),
    output letters (in the output only), batch letters (in both: one independent kernel per
    value, e.g. per head) and window letters (in neither, summed over the kernel alone).
    ``A`` holds the kernel's input, batch and window letters and the rank, ``B`` the rank and
    the batch and output letters; ``x -> A -> B`` is two einsums, and ``A B`` summed over the
    rank is a kernel-shaped product: per batch value a matrix of rank ``rank``."""

    def letters(self, base: Einsum) -> dict[str, str]:
        """The subscripts of ``A``, ``B``, the intermediate ``z`` and the rank's letter."""
        x_subs, kernel_subs, out_subs = base.subscripts
        rank = next(c for c in string.ascii_letters if c not in base.spec)
        a = "".join(c for c in kernel_subs if c in x_subs or c not in out_subs)
        b = "".join(c for c in kernel_subs if c in out_subs)
        kept = [t for t in _tokens(x_subs) if t == "..." or t in out_subs]
        z = "".join(dict.fromkeys(kept))  # an input letter used twice (a diagonal) once
        return {"a": a + rank, "b": rank + b, "z": z + rank, "rank": rank}

    def sizes(self, base: Einsum, letters: str) -> int:
        size_of = dict(zip(base.subscripts[1], base.shape, strict=True))
        return math.prod(size_of[c] for c in letters)

    def max_rank(self, base: Einsum) -> int:
        x_subs, kernel_subs, out_subs = base.subscripts
        ins = [c for c in kernel_subs if c not in out_subs]
        outs = [c for c in kernel_subs if c in out_subs and c not in x_subs]
        return min(self.sizes(base, "".join(ins)), self.sizes(base, "".join(outs)))

    def limit(self, base: Einsum) -> str:
        return (
            f"the smaller of the products of the kernel's contracted axes and of its output "
            f"axes, in spec {base.spec!r} with kernel shape {base.shape}"
        )

    def variables(self, base: Einsum, rank: int) -> Any:
        x_subs, kernel_subs, out_subs = base.subscripts
        subs = self.letters(base)
        size_of = dict(zip(kernel_subs, base.shape, strict=True))
        a_letters, b_letters = subs["a"][:-1], subs["b"][1:]
        a_init = initializers.variance_scaling(
            _A_SCALE,
            "fan_in",
            "uniform",
            in_axis=tuple(i for i, c in enumerate(a_letters) if c in x_subs and c not in out_subs),
            out_axis=len(a_letters),
            batch_axis=tuple(i for i, c in enumerate(a_letters) if c in x_subs and c in out_subs),
        )
        a_shape = (*(size_of[c] for c in a_letters), rank)
        b_shape = (rank, *(size_of[c] for c in b_letters))
        return a_shape, a_init, b_shape, initializers.zeros

    def adapter(self, base: Einsum, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        x_subs, _, out_subs = base.subscripts
        subs = self.letters(base)
        z = jnp.einsum(f"{x_subs},{subs['a']}->{subs['z']}", x, a)
        return jnp.einsum(f"{subs['z']},{subs['b']}->{out_subs}", z, b)

    def delta(self, base: Einsum, a: jax.Array, b: jax.Array) -> jax.Array:
        subs = self.letters(base)
        return jnp.einsum(f"{subs['a']},{subs['b']}->{base.subscripts[1]}", a, b)


class _EmbedRule(_Rule):
    """``A`` ``(num_embeddings, rank)``, indexed by the ids, ``B`` ``(rank, features)``. As in
    PEFT (and loralib), ``A`` starts at zero and ``B`` from ``N(0, 1)``: the rows of ``A``
    that a batch looks up get a gradient at once, and the product is zero at the start."""

    weight = "embedding"

    def max_rank(self, base: Embed) -> int:
        return min(base.num_embeddings, base.features)

    def limit(self, base: Embed) -> str:
        return f"min(num_embeddings, features) = min({base.num_embeddings}, {base.features})"

    def variables(self, base: Embed, rank: int) -> Any:
        a_shape, b_shape = (base.num_embeddings, rank), (rank, base.features)
        return a_shape, initializers.zeros, b_shape, initializers.normal(1.0)

    def adapter(self, base: Embed, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.take(a, x, axis=0) @ b

    def delta(self, base: Embed, a: jax.Array, b: jax.Array) -> jax.Array:
        return a @ b


def _tokens(subs: str) -> list[str]:
    """Einsum subscripts as tokens: each letter, and ``"..."`` as one."""
    head, ellipsis, tail = subs.partition("...")
    return [*head, *([ellipsis] if ellipsis else []), *tail]


#: The layers LoRA adapts, with their rules; a subclass is adapted as its base class computes.
_RULES: dict[type[Module], _Rule] = {
    Dense: _DenseRule(),
    Einsum: _EinsumRule(),
    Conv: _ConvRule(),
    Embed: _EmbedRule(),
}
_SUPPORTED = tuple(_RULES)
_SUPPORTED_NAMES = "mx.Dense, mx.Einsum, mx.Conv and mx.Embed"


def _rule_of(layer: Any) -> _Rule | None:
    return next((rule for cls, rule in _RULES.items() if isinstance(layer, cls)), None)


# ---------------------------------------------------------------------------------------------
# The wrapper


class LoRA(Module):
    """A layer plus a trainable low-rank update: ``base(x) + (alpha / rank) * B(A(x))``.

    ``base`` is an :class:`~metoryx.Dense`, :class:`~metoryx.Einsum`, :class:`~metoryx.Conv` or
    :class:`~metoryx.Embed` (a subclass is adapted as that class computes). The wrapper adds
    no path part: ``base``'s variables keep their paths, so a checkpoint of the model without
    adapters loads into the adapted one, and the adapters ``lora_a`` and ``lora_b`` sit beside
    them, tagged ``"lora"``. Their product starts at exactly zero, so the adapted model starts
    computing exactly what the base did.

    Per layer (``r`` the rank; the product ``A B`` has the shape of the base weight):

    - ``Dense``: ``A`` ``(in_size, r)``, ``B`` ``(r, out_size)``; ``x @ A @ B``.
    - ``Conv``: ``A`` a convolution with the base's window, strides, padding, dilation and
      groups, kernel ``(*kernel_size, in_size // groups, groups * r)``; ``B`` a 1x1 convolution
      (grouped alike), stored as its ``(r, out_size)`` kernel. Each group has its own rank
      ``r`` update.
    - ``Einsum``: ``A`` holds the kernel's contracted and batch axes and ``r``, ``B`` ``r`` and
      the kernel's batch and output axes (``"btd,dhk->bthk"``: ``A`` ``(d, r)``, ``B``
      ``(r, h, k)``; per-head kernels ``"bthd,hdk->bthk"``: ``A`` ``(h, d, r)``, ``B``
      ``(r, h, k)``, one rank-``r`` update per head).
    - ``Embed``: ``A`` ``(num_embeddings, r)``, looked up by the ids, ``B`` ``(r, features)``.
      :meth:`attend` uses the adapted table too.

    ``A`` starts as PEFT's: uniform in ``±1 / sqrt(fan_in)`` (PyTorch's
    ``kaiming_uniform_(a=sqrt(5))``), and ``B`` at zero; for ``Embed``, as in PEFT, ``A``
    starts at zero and ``B`` from ``N(0, 1)``. The adapters are stored in the base weight's
    dtype (its ``param_dtype``) and computed in the base's computation dtype (its ``dtype``,
    or what it infers), so a bfloat16 layer gets bfloat16 adapters.

    **Dropout** (``dropout > 0``) drops the adapter's input in training, as PEFT's
    ``lora_dropout`` (``B(A(dropout(x)))``); ``Embed`` has no input to drop (the ids) and
    ignores it. Whether a call trains is the layer's ``training`` switch, since the model's
    code calls the layer as it called the base (``self.fc(x)``) and passes no flag: set it
    with :func:`~metoryx.set_training` (or ``layer.training = True`` on the ``LoRA`` layers,
    found with ``mx.modules(model, mx.LoRA)``) before ``mx.transform``; a call may pass
    ``is_training=`` itself where the switch is None. The dropout's keys come from the
    ``"dropout"`` stream.

    Args:
        base: the layer to adapt.
        rank: the rank ``r`` of the update, from 1 to the rank of the base weight seen as a
            matrix (``min(in_size, out_size)`` for a ``Dense``; for a ``Conv``
            ``min(prod(kernel_size) * in_size, out_size) // groups``).
        alpha: the update is scaled by ``alpha / rank``; None is ``rank`` (scale 1). A
            finite number > 0.
        dropout: the probability of dropping an element of the adapter's input in training,
            in ``[0, 1)``.

    Attributes:
        base: the adapted layer, whose variables keep their paths.
        lora_a: the parameter ``A`` (tag ``"lora"``).
        lora_b: the parameter ``B`` (tag ``"lora"``).
        training: the layer's own mode for its dropout: None (follow the call's
            ``is_training``), True or False.

    Raises:
        LayerConfigError: if ``base`` is not one of the four layers, or ``rank``, ``alpha``
            or ``dropout`` is out of range.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> layer = mx.LoRA(mx.Dense(8, 4), rank=2)
        >>> init_fn, apply_fn = mx.transform(layer)
        >>> variables = init_fn(jax.random.key(0))
        >>> {k: v.shape for k, v in variables["params"].items()}
        {'bias': (4,), 'kernel': (8, 4), 'lora_a': (8, 2), 'lora_b': (2, 4)}
        >>> x = jnp.ones((3, 8))
        >>> y, _ = apply_fn(variables, None, x)
        >>> params = variables["params"]  # B starts at zero: exactly the Dense
        >>> bool((y == x @ params["kernel"] + params["bias"][None]).all())
        True
    """

    # The base layer's variables sit at this module's own path.
    _transparent = "base"
    training: bool | None = None

    def __init__(
        self, base: Module, rank: int, alpha: float | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        name = f"LoRA({type(base).__name__})"
        rule = _rule_of(base)
        if rule is None:
            raise errors.LayerConfigError(
                f"LoRA: `base` must be one of {_SUPPORTED_NAMES}, got {_shown(base)}. Adapt "
                f"the layers inside it: mx.lora(model, rank, target=...) finds them."
            )
        self.base = base
        self.rank = _checked_rank(name, rank, base, rule)
        self.alpha = _checked_alpha(name, alpha, self.rank)
        self.dropout = _checked_dropout(name, dropout)
        a_shape, a_init, b_shape, b_init = rule.variables(base, self.rank)
        dtype = getattr(base, rule.weight).dtype
        self.lora_a = Parameter(a_init, a_shape, dtype, tags=LORA_TAG)
        self.lora_b = Parameter(b_init, b_shape, dtype, tags=LORA_TAG)

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of the update."""
        return self.alpha / self.rank

    def __getattr__(self, name: str) -> Any:
        # The base layer's configuration reads through the wrapper (``model.fc.in_size``), as
        # in PEFT; the wrapper's own attributes and the snapshot's variables come first.
        try:
            return super().__getattr__(name)
        except errors.ModuleAttributeError:
            base = self.__dict__.get("base")
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)

    def extra_repr(self) -> str:
        config = f"rank={self.rank}, alpha={self.alpha:g}"
        return mode_repr(self, config + (f", dropout={self.dropout:g}" if self.dropout else ""))

    def __call__(self, x: jax.Array, *, is_training: bool | None = None) -> jax.Array:
        """Applies the base layer and adds the scaled update.

        Args:
            x: the base layer's input (ids for an ``Embed``).
            is_training: whether the adapter's dropout drops, where the layer's ``training``
                switch is None; needed only with ``dropout > 0``.

        Returns:
            ``base(x) + (alpha / rank) * B(A(x))``, in the base's output dtype.

        Raises:
            LayerConfigError: with ``dropout > 0``, if neither the switch nor ``is_training``
                says whether the call trains.
            StaticArgumentError: if ``is_training`` is not a Python bool.
        """
        rule = _rule_of(self.base)
        assert rule is not None  # checked in __init__
        y = self.base(x)
        dtype = y.dtype
        if not isinstance(self.base, Embed):
            x = cast(jnp.asarray(x), dtype)
            if self.dropout and self._trains(is_training):
                x = apply_dropout(x, self.dropout, is_training=True)
        a, b = cast(self.lora_a, dtype), cast(self.lora_b, dtype)
        return y + rule.adapter(self.base, x, a, b) * jnp.asarray(self.scale, dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """For an ``Embed`` base: ``x @ (embedding + (alpha / rank) * A @ B).T``, the tied
        output projection with the adapted table (as merging gives it).

        Args:
            x: input of shape ``(*batch, features)``.

        Returns:
            The logits, of shape ``(*batch, num_embeddings)``.

        Raises:
            ModuleAttributeError: if the base is not an ``Embed``.
        """
        if not isinstance(self.base, Embed):
            raise errors.ModuleAttributeError(
                f"{module_label(self)}: attend is the tied output projection of an Embed, and "
                f"this LoRA adapts a {type(self.base).__name__}. Call the layer itself."
            )
        y = self.base.attend(x)
        dtype = y.dtype
        a, b = cast(self.lora_a, dtype), cast(self.lora_b, dtype)
        return y + ((cast(x, dtype) @ b.T) @ a.T) * jnp.asarray(self.scale, dtype)

    def _trains(self, is_training: Any) -> bool:
        switch = self.training
        if switch is True or switch is False:
            return switch
        if switch is not None:
            raise errors.LayerConfigError(
                f"{module_label(self)}: {bad_training_switch(switch)} Set it with "
                f"mx.set_training(layer, True), or assign True, False or None to `training`."
            )
        if is_training is None:
            raise errors.LayerConfigError(
                f"{module_label(self)}: dropout={self.dropout:g} needs to know whether this "
                f"call trains, and neither the layer's `training` switch nor an is_training "
                f"argument says so (the model calls the layer as it called the base). Before "
                f"mx.transform, set the switch of the adapters: `for _, layer in "
                f"mx.modules(model, mx.LoRA): layer.training = True` for the training "
                f"function (False for evaluation), or adapt with dropout=0."
            )
        return training_flag(is_training, lambda: module_label(self))


# ---------------------------------------------------------------------------------------------
# mx.lora and mx.merge_lora

#: What ``target`` accepts: layer classes, a module-path glob, or a predicate.
Target = type[Module] | tuple[type[Module], ...] | str | Callable[..., bool] | None


def lora(
    model: Module,
    rank: int,
    alpha: float | None = None,
    target: Target = None,
    dropout: float = 0.0,
) -> Module:
    """A copy of ``model`` whose chosen layers are wrapped in :class:`LoRA` adapters.

    Each chosen ``Dense``, ``Einsum``, ``Conv`` and ``Embed`` computes ``base(x) + (alpha /
    rank) * B(A(x))``; its own variables keep their paths and the adapters ``lora_a`` and
    ``lora_b`` (tag ``"lora"``) sit beside them. The adapted model computes exactly what
    ``model`` did until the adapters train. ``model`` itself is left as it was; fixed values
    (a pretrained model from ``mx.assign_variables``) are shared, not copied. Layers inside
    ``mx.Repeat`` (and the other lifted wrappers) get stacked adapters, one per copy.

    To fine-tune, train only the adapters::

        info = mx.variable_info(adapted)
        trainable, rest = mx.partition(variables, mx.filters.tag("lora"), info)
        grads = jax.grad(lambda t: loss(mx.combine(t, rest)))(trainable)

    **Defaults.** ``target=None`` adapts every supported layer: adapting all the linear
    layers is what matched full fine-tuning in the QLoRA study (Dettmers et al., 2023), where
    adapting only the attention's query and value (the LoRA paper's choice) fell short; narrow
    it with a glob or a predicate (e.g. to leave a new head out, or to train that head fully
    instead). ``alpha=None`` is ``alpha = rank``, so the update's scale is 1 whatever the
    rank and the learning rate is the one knob (PEFT's default ``lora_alpha=8`` with ``r=8``
    is the same scale).

    Args:
        model: the model to adapt (the definition world).
        rank: the rank of every update, an int from 1 to each chosen layer's limit (see
            :class:`LoRA`).
        alpha: the updates are scaled by ``alpha / rank``; None is ``rank``.
        target: which layers to adapt: None (every ``Dense``, ``Einsum``, ``Conv`` and
            ``Embed``); a layer class or a tuple of them (``mx.Dense``: its instances,
            subclasses included); a glob over module paths, as ``mx.replace`` takes it
            (``"blocks/*/attn/*"``, ``"encoder/**"``); or a predicate ``target(path, module)
            -> bool``. A glob or a predicate may also pick other modules (the blocks that
            hold the layers, norms): those are passed by.
        dropout: the adapters' input dropout in training, in ``[0, 1)`` (see :class:`LoRA`
            for how a call knows it trains).

    Returns:
        The adapted copy.

    Raises:
        LayerConfigError: for a bad ``rank``, ``alpha``, ``dropout`` or ``target``; a
            ``target`` class LoRA does not adapt; a ``rank`` above a chosen layer's limit
            (every such layer named); or a chosen layer that already has an adapter.
        NoMatchError: if ``target`` picks no layer LoRA adapts; the message lists near misses.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> model = mx.MLP(4, [16], 2)
        >>> adapted = mx.lora(model, rank=2, target="layers/0")
        >>> info = mx.variable_info(adapted)
        >>> sorted(info["params"]["layers"]["0"])
        ['bias', 'kernel', 'lora_a', 'lora_b']
        >>> info["params"]["layers"]["0"]["lora_a"].tags
        ('lora',)
        >>> variables = mx.init(adapted)(jax.random.key(0))
        >>> trainable, rest = mx.partition(variables, mx.filters.tag("lora"), info)
        >>> jax.tree.map(jnp.shape, trainable)
        {'params': {'layers': {'0': {'lora_a': (4, 2), 'lora_b': (2, 16)}}}}
    """
    rank = positive_int("mx.lora", "rank", rank)
    alpha = _checked_alpha("mx.lora", alpha, rank)
    dropout = _checked_dropout("mx.lora", dropout)
    matches = _target_matcher(target)
    found = list(modules(model))
    adapted = {id(m.base): p for p, m in found if isinstance(m, LoRA)}
    chosen = [(p, m) for p, m in found if isinstance(m, _SUPPORTED) and matches(p, m)]
    if not chosen:
        raise _nothing_chosen(target, found, matches)
    twice = [path_str(adapted[id(m)]) for _, m in chosen if id(m) in adapted]
    if twice:
        raise errors.LayerConfigError(
            f"mx.lora: the layers at {', '.join(map(repr, twice))} already have LoRA adapters. "
            f"Fold them in first (mx.merge_lora) or pick other layers with `target`."
        )
    too_small = [
        f"{type(m).__name__} at {path_str(p)!r} allows {rule.limit(m)} = {rule.max_rank(m)}"
        for p, m in chosen
        if (rule := _rule_of(m)) is not None and rule.max_rank(m) < rank
    ]
    if too_small:
        raise errors.LayerConfigError(
            f"mx.lora: rank={rank} is larger than these layers allow (a higher rank is no "
            f"longer a low-rank update): {'; '.join(too_small)}. Use a smaller rank, or leave "
            f"them out with `target` (a glob or a predicate such as `lambda path, m: "
            f"path[-1] != 'head'`)."
        )
    picked = {id(m) for _, m in chosen}
    return replace(
        model,
        lambda path, module: id(module) in picked,
        lambda path, module: LoRA(module, rank, alpha, dropout),
    )


def merge_lora(model: Module, variables: Mapping[str, Any]) -> tuple[Module, dict[str, Any]]:
    """Folds every adapter into its base weight: the plain model and its variables.

    For each :class:`LoRA` layer the base weight becomes ``weight + (alpha / rank) * A B``
    (the kernel-shaped product of :class:`LoRA`'s table; per copy for stacked adapters),
    computed in float32 or wider and stored in the weight's dtype. The model comes back
    without its ``LoRA`` wrappers and the variables without their ``lora_a``/``lora_b``
    entries, so they load into the original architecture (``mx.transform(original)``), and
    its outputs equal the adapted model's up to float rounding.

    Args:
        model: a model with ``LoRA`` layers (from :func:`lora`).
        variables: its variables, as its ``init_fn`` made them or training left them.

    Returns:
        ``(plain_model, plain_variables)``; ``model`` and ``variables`` are left as they were.

    Raises:
        LayerConfigError: if ``model`` has no ``LoRA`` layer, or two adapters share one
            base weight (tied layers adapted separately), which one weight cannot hold.
        VariablesStructureError: if ``variables`` misses paths of ``model`` or has others.
        VariableShapeError: if an array's shape does not fit its variable.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> adapted = mx.lora(mx.Dense(4, 3), rank=2)
        >>> variables = mx.init(adapted)(jax.random.key(0))
        >>> variables["params"]["lora_b"] = jnp.ones((2, 3))   # as if trained
        >>> plain, plain_variables = mx.merge_lora(adapted, variables)
        >>> type(plain).__name__, sorted(plain_variables["params"])
        ('Dense', ['bias', 'kernel'])
        >>> x = jnp.ones((5, 4))
        >>> y, _ = mx.apply(adapted)(variables, None, x)
        >>> y_plain, _ = mx.apply(plain)(plain_variables, None, x)
        >>> bool(jnp.allclose(y, y_plain, atol=1e-5))
        True
    """
    adapters = [(p, m) for p, m in modules(model, LoRA)]
    if not adapters:
        types = ", ".join(sorted({type(m).__name__ for _, m in modules(model)}))
        raise errors.LayerConfigError(
            f"mx.merge_lora: the {type(model).__name__} has no LoRA layer to fold (it holds "
            f"{types}). Pass the model that mx.lora returned, with its variables."
        )
    tree = walk(model)
    flat = _checked_variables(tree, variables)
    path_of = {id(v): p for p, v in tree.variables}
    merged_into: dict[Path, Path] = {}
    for module_path, layer in adapters:
        rule = _rule_of(layer.base)
        assert rule is not None  # checked when the layer was made
        weight = path_of[id(getattr(layer.base, rule.weight))]
        a, b = path_of[id(layer.lora_a)], path_of[id(layer.lora_b)]
        if weight in merged_into:
            raise errors.LayerConfigError(
                f"mx.merge_lora: the LoRA layers at {path_str(merged_into[weight])!r} and "
                f"{path_str(module_path)!r} adapt one shared weight, {path_str(weight)!r}, "
                f"with two updates, which one weight cannot hold. Adapt the shared layer "
                f"once (tie the layer, not just its weight) before training."
            )
        merged_into[weight] = module_path
        fold = _fold(rule, layer)
        for _ in tree.axes.get(a, ()):  # one vmap per stacked axis of the adapters
            fold = jax.vmap(fold)
        flat[weight] = fold(flat[weight], flat.pop(a), flat.pop(b))
    plain = replace(model, LoRA, lambda path, layer: layer.base)
    return plain, unflatten_variables(flat)


def _fold(rule: _Rule, layer: LoRA) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    def fold(weight: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        dtype = at_least_float32(weight.dtype)
        delta = rule.delta(layer.base, cast(a, dtype), cast(b, dtype))
        return (cast(weight, dtype) + delta * jnp.asarray(layer.scale, dtype)).astype(weight.dtype)

    return fold


def _checked_variables(tree: Any, variables: Any) -> dict[Path, Any]:
    """``variables`` flattened, checked to hold exactly the model's paths, in their shapes."""
    if not isinstance(variables, Mapping):
        raise errors.VariablesStructureError(
            f"mx.merge_lora: `variables` must be the nested dict the adapted model's init_fn "
            f"returns, {{'params': {{...}}}}; got {type(variables).__name__}."
        )
    flat = flatten_variables(variables)
    wanted = dict(tree.variables)
    missing = [path_str(p) for p in wanted if p not in flat]
    unexpected = [path_str(p) for p in flat if p not in wanted]
    if missing or unexpected:
        raise errors.VariablesStructureError(
            "mx.merge_lora: " + mismatch_report(missing, unexpected)
        )
    wrong = []
    for path, var in wanted.items():
        stacked = tuple(axis.size for axis in tree.axes.get(path, ()))
        shape = tuple(np.shape(flat[path]))
        if shape != (*stacked, *var.shape):
            wrong.append(f"{path_str(path)}: expected {(*stacked, *var.shape)}, got {shape}")
    if wrong:
        raise errors.VariableShapeError(
            "mx.merge_lora: these arrays do not fit the adapted model's variables:\n  "
            + "\n  ".join(wrong)
            + "\nPass the variables of this model (its init_fn's, or trained from them)."
        )
    return flat


# ---------------------------------------------------------------------------------------------
# Arguments and errors


def _checked_rank(where: str, rank: Any, base: Module, rule: _Rule) -> int:
    rank = positive_int(where, "rank", rank)
    if rank > rule.max_rank(base):
        raise errors.LayerConfigError(
            f"{where}: rank={rank} is larger than the layer allows, {rule.limit(base)} = "
            f"{rule.max_rank(base)}: a higher rank is no longer a low-rank update. Use a rank "
            f"of at most {rule.max_rank(base)}."
        )
    return rank


def _checked_alpha(where: str, alpha: Any, rank: int) -> float:
    if alpha is None:
        return float(rank)
    fix = (
        f"The update is scaled by alpha / rank; pass e.g. alpha={2 * rank} (or None: alpha = rank)."
    )
    return check_number(where, "alpha", alpha, 0.0, low_open=True, fix=fix)


def _checked_dropout(where: str, dropout: Any) -> float:
    fix = "It drops the adapters' input in training; pass e.g. 0.05, or 0 for none."
    return check_number(where, "dropout", dropout, 0.0, 1.0, high_open=True, fix=fix)


def _target_matcher(target: Any) -> Callable[[Path, Module], bool]:
    """``target`` of :func:`lora` as a predicate over the supported layers: None for all, else
    the forms of ``mx.replace``'s ``where``; classes LoRA cannot adapt are refused."""
    if target is None:
        return lambda path, module: True
    classes: Any = target if isinstance(target, tuple) else (target,)
    if all(isinstance(c, builtins.type) and issubclass(c, Module) for c in classes):
        unsupported = [c.__name__ for c in classes if not issubclass(c, _SUPPORTED)]
        if unsupported:
            raise errors.LayerConfigError(
                f"mx.lora: `target` names {', '.join(unsupported)}, which LoRA does not "
                f"adapt; it adapts {_SUPPORTED_NAMES} (and their subclasses). To adapt "
                f"the layers inside a block, pick them with a glob ('blocks/**') or a "
                f"predicate."
            )
    return where_matcher(target, "mx.lora", "target")


def _shown(value: Any) -> str:
    name = type(value).__name__
    return f"a {name} instance" if isinstance(value, Module) else f"{name} {value!r:.60}"


def _nothing_chosen(
    target: Any, found: list[tuple[Path, Module]], matches: Callable[[Path, Module], bool]
) -> errors.NoMatchError:
    layers = [(p, m) for p, m in found if isinstance(m, _SUPPORTED)]
    counts = Counter(type(m).__name__ for _, m in layers)
    held = ", ".join(f"{name} ({n})" for name, n in counts.items()) or "none"
    picks_any = isinstance(target, str) or (callable(target) and not isinstance(target, type))
    others = [
        (p, m) for p, m in found if picks_any and not isinstance(m, _SUPPORTED) and matches(p, m)
    ]
    if others:
        shown = ", ".join(f"{type(m).__name__} at {path_str(p)!r}" for p, m in others[:5])
        inside = next((path_str(p) for p, _ in others if p), "encoder")
        why = (
            f"it picks only modules LoRA does not adapt ({shown}); LoRA adapts "
            f"{_SUPPORTED_NAMES}. To adapt the layers inside a module, pick them too: "
            f"'{inside}/**' picks {inside!r} and everything below it"
        )
    elif isinstance(target, str):
        paths = [path_str(p) for p, _ in layers]
        close = difflib.get_close_matches(target, paths, n=5, cutoff=0.5)
        kind = "the closest layer paths" if close else "the layer paths begin"
        why = f"the glob {target!r} picks no layer; {kind}: {', '.join(close or paths[:8])}"
    elif target is None or isinstance(target, (tuple, type)):
        why = f"the model holds none of the layers it adapts; its adaptable layers: {held}"
    else:
        why = f"the predicate returned False for all {len(layers)} adaptable layers ({held})"
    return errors.NoMatchError(
        f"mx.lora: `target` chose no layer to adapt: {why}. mx.modules(model) lists every "
        f"module with its path."
    )
