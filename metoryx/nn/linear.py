"""The linear family: Dense (fully connected), Einsum (a general contraction with a learned
kernel) and Embed (a lookup table, with ``attend`` for a tied output projection)."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from metoryx import errors, initializers
from metoryx._core.arguments import bool_argument
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Parameter
from metoryx.initializers import Initializer
from metoryx.layout import TorchConversion, same, transposed
from metoryx.nn._arguments import positive_int
from metoryx.nn._compute import (
    DEFAULT_KERNEL_INIT,
    add_bias,
    cast,
    compute_dtype,
    layer_dtype,
)

#: The default table initializer of Embed: ``N(0, 1)``, as ``torch.nn.Embedding``.
_DEFAULT_EMBEDDING_INIT = initializers.normal()


class Dense(Module):
    """A fully connected layer: ``y = x @ kernel + bias`` over the last axis of ``x``.

    Args:
        in_size: size of the last axis of the input.
        out_size: size of the last axis of the output.
        use_bias: whether to add a learned bias.
        kernel_init: initializer of the kernel, of shape ``(in_size, out_size)``.
        bias_init: initializer of the bias, of shape ``(out_size,)``.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if a size is not a positive int.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Dense(3, 4))
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["kernel"].shape, variables["params"]["bias"].shape
        ((3, 4), (4,))
        >>> y, _ = apply_fn(variables, None, jnp.ones((2, 5, 3)))
        >>> y.shape
        (2, 5, 4)
        >>> apply_fn(variables, None, jnp.ones((2, 5, 3)), heads=2)[0].shape  # 2 heads of 2
        (2, 5, 2, 2)
    """

    def __init__(
        self,
        in_size: int,
        out_size: int,
        use_bias: bool = True,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self.in_size = positive_int("Dense", "in_size", in_size)
        self.out_size = positive_int("Dense", "out_size", out_size)
        self.use_bias = bool_argument("Dense", "use_bias", use_bias)
        self.dtype = layer_dtype("Dense", dtype)
        self.kernel = Parameter(kernel_init, (self.in_size, self.out_size), param_dtype)
        self.bias = Parameter(bias_init, (self.out_size,), param_dtype) if use_bias else None

    def extra_repr(self) -> str:
        return f"in_size={self.in_size}, out_size={self.out_size}, use_bias={self.use_bias}"

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.Linear``: ``weight`` ``(out, in)`` is the kernel transposed."""
        return [transposed("weight", "kernel", (1, 0))]

    def __call__(self, x: jax.Array, *, heads: int | None = None) -> jax.Array:
        """Applies the layer.

        Args:
            x: input of shape ``(*batch, in_size)``, any number of leading batch axes.
            heads: None, or a number dividing ``out_size``: the output split into ``heads``
                equal groups of features, ``(*batch, heads, out_size // heads)``, as
                ``y.reshape(*batch, heads, -1)`` but computed as one contraction with the
                kernel viewed as ``(in_size, heads, out_size // heads)``. What follows (the
                attention of :class:`MultiHeadAttention`, which projects its heads this way)
                then gets its operands in the layout XLA picks for it, not one fixed by a
                reshape: a tenth faster on CPU.

        Returns:
            The output, of shape ``(*batch, out_size)`` (or ``(*batch, heads, out_size //
            heads)``) and the computation dtype.

        Raises:
            InputShapeError: if the last axis of ``x`` is not ``in_size`` long.
            LayerConfigError: if ``heads`` is not None or a positive int dividing
                ``out_size``.
        """
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.in_size:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected an input of shape (..., {self.in_size}) whose "
                f"last axis has in_size={self.in_size} features, got shape {x.shape}. "
                f"Reshape the input so its last axis holds the features, or build the layer "
                f"with in_size equal to the input's last axis."
            )
        kernel, bias = self.kernel, self.bias
        dtype = compute_dtype(self.dtype, x, kernel, bias)
        if heads is None:
            y = cast(x, dtype) @ cast(kernel, dtype)
            return y if bias is None else add_bias(y, cast(bias, dtype))
        if (
            isinstance(heads, bool)
            or not isinstance(heads, int)
            or heads < 1
            or self.out_size % heads
        ):
            raise errors.LayerConfigError(
                f"{module_label(self)}: `heads` must be None or a positive int dividing "
                f"out_size={self.out_size}, got {heads!r:.60}."
            )
        split = (heads, self.out_size // heads)
        y = jnp.einsum("...i,ihd->...hd", cast(x, dtype), cast(kernel, dtype).reshape(-1, *split))
        return y if bias is None else add_bias(y, cast(bias, dtype).reshape(split))


class Einsum(Module):
    """A contraction of the input with a learned kernel: ``y = jnp.einsum(spec, x, kernel)``.

    ``spec`` names the axes of the input, the kernel and the output, as ``"x,kernel->output"``
    with exactly two operands and an explicit output, e.g. ``"btd,dhk->bthk"`` projects
    ``(batch, time, d)`` to ``(batch, time, heads, k)`` with a kernel of shape
    ``(d, heads, k)``. ``"..."`` in the input and the output stands for any number of leading
    batch axes (``"...d,dhk->...hk"``); the kernel cannot have it.

    **Default initializer.** ``kernel_init=None`` is :func:`~metoryx.initializers.lecun_normal`
    (``N(0, 1 / fan_in)``, untruncated) with the fans read from ``spec``: a kernel axis whose
    letter is in the input but not in the output is an input axis (it is contracted with the
    input), one in the output but not in the input is an output axis, one in both is a batch
    axis (independent kernels, e.g. per head; it counts in no fan), and one in neither (summed
    over the kernel alone) multiplies both fans, like a convolution's window. So
    ``"btd,dhk->bthk"`` has ``fan_in = d`` and ``"bthk,hkd->btd"`` has ``fan_in = h * k``:
    both start like the equivalent :class:`Dense` layer.

    Args:
        spec: the einsum expression ``"input,kernel->output"``; letters ``a-z``, ``A-Z``,
            spaces ignored.
        shape: the kernel's shape, one size per kernel letter.
        bias_shape: the shape of a learned bias added to the **last** ``len(bias_shape)`` axes
            of the output (each size that axis's size or 1, to share a value along it), or
            None for no bias. E.g. ``(heads, k)`` for ``"btd,dhk->bthk"``.
        kernel_init: initializer of the kernel, of shape ``shape``; None for LeCun normal
            with the fans read from ``spec`` (see above).
        bias_init: initializer of the bias, of shape ``bias_shape``.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if ``spec`` is not ``"input,kernel->output"`` over letters, the
            kernel's letters do not match ``shape`` (one distinct letter per size), an output
            letter is in neither operand, or ``bias_shape`` does not fit the output's last
            axes.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> layer = mx.Einsum("btd,dhk->bthk", (64, 8, 16), bias_shape=(8, 16))
        >>> init_fn, apply_fn = mx.transform(layer)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["kernel"].shape, variables["params"]["bias"].shape
        ((64, 8, 16), (8, 16))
        >>> y, _ = apply_fn(variables, None, jnp.ones((2, 5, 64)))
        >>> y.shape
        (2, 5, 8, 16)
    """

    def __init__(
        self,
        spec: str,
        shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        kernel_init: Initializer | None = None,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self.shape = _sizes("shape", shape)
        self.spec, self.subscripts = _parse_einsum_spec(spec, self.shape)
        self.bias_shape = None if bias_shape is None else _sizes("bias_shape", bias_shape)
        if self.bias_shape is not None:
            _check_bias_shape(self.spec, self.subscripts, self.shape, self.bias_shape)
        self.dtype = layer_dtype("Einsum", dtype)
        if kernel_init is None:
            kernel_init = _einsum_lecun_normal(self.subscripts)
        self.kernel = Parameter(kernel_init, self.shape, param_dtype)
        self.bias = (
            None if self.bias_shape is None else Parameter(bias_init, self.bias_shape, param_dtype)
        )

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, shape={self.shape}, bias_shape={self.bias_shape}"

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the contraction.

        Args:
            x: input whose axes the spec's input subscripts name (any number of leading axes
                where they start with ``"..."``).

        Returns:
            ``jnp.einsum(spec, x, kernel)`` plus the bias, in the computation dtype.

        Raises:
            InputShapeError: if ``x`` has the wrong number of axes for the input subscripts,
                or an axis whose size disagrees with the kernel, with another input axis of
                the same letter, or with the bias.
        """
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        self._check_input(x.shape)
        kernel, bias = self.kernel, self.bias
        dtype = compute_dtype(self.dtype, x, kernel, bias)
        y = jnp.einsum(self.spec, cast(x, dtype), cast(kernel, dtype))
        return y if bias is None else add_bias(y, cast(bias, dtype))

    def _check_input(self, shape: tuple[int, ...]) -> None:
        x_subs, kernel_subs, out_subs = self.subscripts
        head, ellipsis, tail = x_subs.partition("...")
        named = len(head) + len(tail)
        if len(shape) < named or (not ellipsis and len(shape) != named):
            raise errors.InputShapeError(
                f"{module_label(self)}: spec {self.spec!r} names the input's axes {x_subs!r}, "
                f"so the input needs {'at least ' if ellipsis else ''}{named} axes, got shape "
                f"{shape}. Reshape the input, or build the layer with a spec that names its axes."
            )
        sizes = dict(zip(kernel_subs, self.shape, strict=True))
        named_sizes = (*shape[: len(head)], *shape[len(shape) - len(tail) :])
        for letter, size in zip(head + tail, named_sizes, strict=True):
            expected = sizes.setdefault(letter, size)
            if size != expected:
                source = (
                    f"the kernel of shape {self.shape}"
                    if letter in kernel_subs
                    else "its other axis in the input"
                )
                raise errors.InputShapeError(
                    f"{module_label(self)}: axis {letter!r} of spec {self.spec!r} has size "
                    f"{expected} in {source}, but size {size} in the input of shape {shape}. "
                    f"Give an input whose {letter!r} axis is {expected} long, or build the layer "
                    f"with sizes that match the input."
                )
        if self.bias_shape:
            trailing = out_subs[len(out_subs) - len(self.bias_shape) :]
            for letter, size in zip(trailing, self.bias_shape, strict=True):
                if size not in (1, sizes[letter]):
                    raise errors.InputShapeError(
                        f"{module_label(self)}: the bias of shape {self.bias_shape} gives output "
                        f"axis {letter!r} size {size}, but the input of shape {shape} gives it "
                        f"size {sizes[letter]}. Give an input whose {letter!r} axis is {size} "
                        f"long, or build the layer with bias size {sizes[letter]} or 1 for "
                        f"{letter!r}."
                    )


_EINSUM_EXAMPLE = "e.g. Einsum('btd,dhk->bthk', (64, 8, 16))"


def _sizes(name: str, value: Any) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints, else a LayerConfigError naming ``name``."""
    try:
        return tuple(positive_int("Einsum", name, size) for size in value)
    except (TypeError, errors.LayerConfigError):
        raise errors.LayerConfigError(
            f"Einsum: `{name}` must be a sequence of positive ints, one per axis, got "
            f"{value!r}; {_EINSUM_EXAMPLE}."
        ) from None


def _parse_einsum_spec(spec: Any, shape: tuple[int, ...]) -> tuple[str, tuple[str, str, str]]:
    """The spec without spaces, and its ``(input, kernel, output)`` subscripts."""
    compact = "".join(spec.split()) if isinstance(spec, str) else ""
    inputs, arrow, out_subs = compact.partition("->")
    operands = inputs.split(",")

    def fail(problem: str, fix: str) -> errors.LayerConfigError:
        return errors.LayerConfigError(f"Einsum: spec {spec!r} {problem}. {fix}")

    if not arrow or len(operands) != 2:
        raise fail(
            "is not of the form 'input,kernel->output'",
            f"Name the axes of exactly two operands and the output explicitly, {_EINSUM_EXAMPLE}.",
        )
    x_subs, kernel_subs = operands
    for subs in (x_subs, kernel_subs, out_subs):
        if not set(subs.replace("...", "", 1)) <= set(string.ascii_letters):
            raise fail(
                f"has subscripts {subs!r}",
                "Use the letters a-z and A-Z, and '...' at most once for leading batch axes.",
            )
    if "..." in kernel_subs:
        raise fail(
            "gives the kernel '...'",
            f"Name every kernel axis with a letter, one per size of shape={shape}.",
        )
    if ("..." in x_subs) != ("..." in out_subs):
        raise fail(
            "has '...' on one side only",
            "Write '...' in both the input and the output ('...d,dk->...k') or in neither.",
        )
    if len(set(kernel_subs)) != len(kernel_subs) or len(kernel_subs) != len(shape):
        raise fail(
            f"names the kernel's axes {kernel_subs!r}, but shape={shape} has {len(shape)} sizes",
            "Give the kernel one distinct letter per size of `shape`.",
        )
    letters = out_subs.replace("...", "")
    missing = sorted(set(letters) - set(x_subs) - set(kernel_subs))
    if missing or len(set(letters)) != len(letters):
        raise fail(
            f"has output {out_subs!r}",
            "Name each output axis once, with a letter of the input or the kernel.",
        )
    return compact, (x_subs, kernel_subs, out_subs)


def _check_bias_shape(
    spec: str, subscripts: tuple[str, str, str], shape: tuple[int, ...], bias_shape: tuple[int, ...]
) -> None:
    """Checks that the bias fits the output's last axes (those of the kernel's letters here;
    the input's are checked on call)."""
    _, kernel_subs, out_subs = subscripts
    named = out_subs.partition("...")[2] if "..." in out_subs else out_subs
    if len(bias_shape) > len(named):
        raise errors.LayerConfigError(
            f"Einsum: bias_shape={bias_shape} has {len(bias_shape)} axes, but spec {spec!r} names "
            f"only {len(named)} output {'axis' if len(named) == 1 else 'axes'} after any '...' "
            f"({named!r}), the last of which the bias is added to. Give at most one size per "
            f"named last output axis, e.g. bias_shape={shape[-1:]} for the last one."
        )
    sizes = dict(zip(kernel_subs, shape, strict=True))
    for letter, size in zip(named[len(named) - len(bias_shape) :], bias_shape, strict=True):
        if letter in sizes and size not in (1, sizes[letter]):
            raise errors.LayerConfigError(
                f"Einsum: bias_shape={bias_shape} gives output axis {letter!r} size {size}, but "
                f"the kernel (shape {shape}) gives it size {sizes[letter]}. Use "
                f"{sizes[letter]} (one bias per value) or 1 (one shared along {letter!r})."
            )


def _einsum_lecun_normal(subscripts: tuple[str, str, str]) -> Initializer:
    """LeCun normal with the kernel's input, output and batch axes read from the spec."""
    x_subs, kernel_subs, out_subs = subscripts

    def axes(in_x: bool, in_out: bool) -> tuple[int, ...]:
        return tuple(
            i
            for i, letter in enumerate(kernel_subs)
            if (letter in x_subs) == in_x and (letter in out_subs) == in_out
        )

    return initializers.lecun_normal(
        in_axis=axes(True, False), out_axis=axes(False, True), batch_axis=axes(True, True)
    )


class Embed(Module):
    """A lookup table: row ``i`` of ``embedding`` is the vector of integer id ``i``.

    As ``torch.nn.Embedding``, the table ``params["embedding"]`` has shape
    ``(num_embeddings, features)`` and starts from ``N(0, 1)``. :meth:`attend` multiplies by
    the transposed table, the output projection of a language model whose input and output
    embeddings are tied.

    **Ids out of range.** JAX cannot raise inside a compiled program, so the lookup follows
    ``jnp.take``: ids in ``[-num_embeddings, 0)`` count from the end (``-1`` is the last row,
    as in NumPy), and any other id outside ``[0, num_embeddings)`` gives a row of NaN (the
    minimum value for an integer ``param_dtype``), which makes the mistake visible in the
    loss; its gradient reaches no row of the table. (PyTorch raises an IndexError for all of
    them, negative ids included.)

    Args:
        num_embeddings: number of rows: the size of the vocabulary.
        features: size of each vector.
        embedding_init: initializer of the table, of shape ``(num_embeddings, features)``.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if a size is not a positive int.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Embed(1000, 16))
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["embedding"].shape
        (1000, 16)
        >>> vectors, _ = apply_fn(variables, None, jnp.array([[1, 2, 3], [4, 5, 6]]))
        >>> vectors.shape
        (2, 3, 16)
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        embedding_init: Initializer = _DEFAULT_EMBEDDING_INIT,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        self.num_embeddings = positive_int("Embed", "num_embeddings", num_embeddings)
        self.features = positive_int("Embed", "features", features)
        self.dtype = layer_dtype("Embed", dtype)
        self.embedding = Parameter(
            embedding_init, (self.num_embeddings, self.features), param_dtype
        )

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, features={self.features}"

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.Embedding``: ``weight`` is the table."""
        return [same("weight", "embedding")]

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks the ids up.

        Args:
            ids: integer ids of any shape (see the class docs for ids out of range).

        Returns:
            The vectors, of shape ``(*ids.shape, features)`` and the computation dtype.

        Raises:
            InputDtypeError: if ``ids`` are not integers.
        """
        if not isinstance(ids, jax.Array):
            ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise errors.InputDtypeError(
                f"{module_label(self)}: expected integer ids (each a row of the "
                f"{self.num_embeddings}-row table), got an array of dtype {ids.dtype} and shape "
                f"{ids.shape}. Pass token ids as integers (ids.astype(jnp.int32)); to project "
                f"continuous inputs use Dense, or attend for logits over the table."
            )
        embedding = self.embedding
        vectors = jnp.take(embedding, ids, axis=0)
        return cast(vectors, compute_dtype(self.dtype, embedding))

    def attend(self, x: jax.Array) -> jax.Array:
        """Scores ``x`` against every row of the table: ``x @ embedding.T``.

        The tied output projection of a language model: with the same ``Embed`` for the input
        and the output, the logits over the vocabulary reuse the input table.

        Args:
            x: input of shape ``(*batch, features)``.

        Returns:
            The logits, of shape ``(*batch, num_embeddings)`` and the computation dtype.

        Raises:
            InputShapeError: if the last axis of ``x`` is not ``features`` long.

        Example:
            >>> import jax, jax.numpy as jnp, metoryx as mx
            >>> init_fn, apply_fn = mx.transform(mx.Embed(1000, 16), method="attend")
            >>> logits, _ = apply_fn(init_fn(jax.random.key(0)), None, jnp.ones((2, 3, 16)))
            >>> logits.shape
            (2, 3, 1000)
        """
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.features:
            raise errors.InputShapeError(
                f"{module_label(self)}: attend expected an input of shape (..., "
                f"{self.features}) whose last axis has features={self.features} values, got "
                f"shape {x.shape}. Give vectors of the table's size, e.g. the output of a "
                f"layer with out_size={self.features}."
            )
        embedding = self.embedding
        dtype = compute_dtype(self.dtype, x, embedding)
        return cast(x, dtype) @ cast(embedding, dtype).T
