"""Weight reparametrization wrappers: WeightNorm and SpectralNorm run a layer, unchanged, on a
weight computed from its own.

The wrapped layer keeps its variables at their paths (``layer/kernel``, ``layer/bias``); the
wrapper adds its own (WeightNorm's ``scale``, SpectralNorm's power-iteration vectors) and, while
the layer runs, makes the layer's weight read the computed array (see
``metoryx/_core/override.py``).

**Which weight, which axis.** ``name=None`` picks the layer's ``kernel`` Parameter, else its
``embedding``. ``axis=None`` is the weight's output axis: the **last** axis of a kernel (ours
keep the output axis last: Dense ``(in, out)``, Conv and ConvTranspose
``(*kernel_size, in / groups, out)``; for an Einsum, its last kernel axis, an output axis in
the usual specs, else pass ``axis``) and axis ``0`` of an Embed table (one row per id, which
:meth:`~metoryx.Embed.attend` turns into one output each). This is PyTorch's default ``dim``
for ``Linear``, ``ConvNd`` and ``Embedding`` and its ``spectral_norm`` choice for
``ConvTransposeNd``, whose ``weight_norm`` instead defaults to the input axis (``dim=0``):
to load such a state_dict, build ours with ``axis=-2`` (with ``groups=1``), or the PyTorch side
with ``dim=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors, initializers
from metoryx._core.module import Module
from metoryx._core.override import overridden
from metoryx._core.variables import Parameter, State
from metoryx._docstrings import fill_docstring
from metoryx.initializers import Initializer
from metoryx.layout import TorchConversion, torch_conversions
from metoryx.nn._arguments import check_epsilon, positive_int
from metoryx.nn._compute import (
    TRAINING_DOC,
    at_least_float32,
    cast,
    compute_dtype,
    layer_training,
    mode_repr,
)

#: The weight a wrapper takes by default, in order of preference, with its output axis.
_OUTPUT_AXES = {"kernel": -1, "embedding": 0}


class WeightNorm(Module):
    """Weight normalization: the layer runs on ``scale * v / ||v||`` instead of its weight ``v``.

    The norm is taken, for each index along ``axis``, over all the other axes of the weight,
    so the effective weight has norm ``scale[i]`` along each slice ``i`` (Salimans & Kingma,
    2016; PyTorch's ``torch.nn.utils.parametrizations.weight_norm``). ``v`` is the wrapped
    layer's own weight variable, trained as before; ``scale`` is this wrapper's Parameter.

    **Start.** ``scale`` starts at ones (as in Flax; PyTorch starts it at ``||v||``, which an
    initializer cannot see), so the effective weight starts as ``v`` with each slice scaled to
    unit norm. With the default LeCun-normal kernel (variance ``1 / fan_in``) each output's
    slice already has norm close to 1, so a wrapped Dense or Conv starts close to the unwrapped
    one. To start exactly at ``v``, set ``variables["params"]["scale"]`` to the norms of the
    initial kernel after ``init_fn``.

    Variables: ``params/layer/...``, the wrapped layer's own (its weight is ``v``), and
    ``params/scale`` of shape ``tuple(weight.shape[a] for a in axis)``.

    Args:
        layer: the layer to wrap (Dense, Conv, ConvTranspose, Embed, Einsum, or any module
            holding its weight as a Parameter attribute).
        name: the attribute of ``layer`` holding the weight; None for ``kernel``, else
            ``embedding``.
        axis: the axis (or axes) of the weight that keep their own scale, the norm running
            over the others; None for the weight's output axis (see the module docs), ``()``
            for one scale for the whole weight (PyTorch's ``dim=None``).
        scale_init: initializer of ``scale``.
        param_dtype: the storage dtype of ``scale``; None for the weight's dtype. There is
            no computation dtype of its own: the norm is computed in at least float32, the
            effective weight is cast to the weight's storage dtype, and the wrapped layer
            computes in its own ``dtype``.

    Raises:
        LayerConfigError: if ``layer`` is not a module, has no such weight, or ``axis`` is not
            distinct axes of the weight.

    Attributes:
        layer: the wrapped layer, unchanged: its own variables (the weight ``v`` included)
            stay at ``layer/...``; read its configuration (``wrapper.layer.out_size``) or
            fix a starting weight (``wrapper.layer.kernel.value = w``) through it.
        scale: this wrapper's Parameter, one scale per slice along ``axis``.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.WeightNorm(mx.Dense(3, 4)))
        >>> variables = init_fn(jax.random.key(0))
        >>> jax.tree.map(jnp.shape, variables)
        {'params': {'layer': {'bias': (4,), 'kernel': (3, 4)}, 'scale': (4,)}}
        >>> y, _ = apply_fn(variables, None, jnp.ones((2, 3)))
        >>> y.shape
        (2, 4)
    """

    def __init__(
        self,
        layer: Module,
        name: str | None = None,
        axis: int | Sequence[int] | None = None,
        scale_init: Initializer = initializers.ones,
        param_dtype: Any = None,
    ):
        super().__init__()
        self.layer = layer
        self.name, weight = _weight("WeightNorm", layer, name)
        axes: tuple[int, ...]
        if not isinstance(axis, (list, tuple)):  # None, an int, or a mistake _axis names
            axes = (_axis("WeightNorm", self.name, weight, axis),)
        else:
            axes = tuple(sorted(_axis("WeightNorm", self.name, weight, a) for a in axis))
            if len(set(axes)) != len(axes):
                raise errors.LayerConfigError(
                    f"WeightNorm: `axis` must name distinct axes of {self.name!r} (shape "
                    f"{weight.shape}), got {axis!r}. Name each axis once."
                )
        self.axis = axes
        dtype = weight.dtype if param_dtype is None else param_dtype
        self.scale = Parameter(scale_init, tuple(weight.shape[a] for a in axes), dtype)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, axis={self.axis}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped layer on the normalized weight.

        Args:
            *args: the wrapped layer's arguments.
            **kwargs: the wrapped layer's keyword arguments.

        Returns:
            What the wrapped layer returns.
        """
        with self.reparametrized() as layer:
            return layer(*args, **kwargs)

    @contextlib.contextmanager
    def reparametrized(self) -> Iterator[Module]:
        """Inside the block, the wrapped layer computes with the normalized weight.

        For the layer's other methods, e.g. the tied output projection of an Embed. Use it in
        a method of the model that ``apply_fn`` runs.

        Yields:
            The wrapped layer.

        Example:
            >>> import jax, jax.numpy as jnp, metoryx as mx
            >>> class TiedLM(mx.Module):
            ...     def __init__(self):
            ...         self.embed = mx.WeightNorm(mx.Embed(100, 8))
            ...     def __call__(self, ids):
            ...         with self.embed.reparametrized() as embed:
            ...             return embed.attend(embed(ids))
            >>> init_fn, apply_fn = mx.transform(TiedLM())
            >>> logits, _ = apply_fn(init_fn(jax.random.key(0)), None, jnp.array([[1, 2]]))
            >>> logits.shape
            (1, 2, 100)
        """
        v = getattr(self.layer, self.name)
        g = self.scale
        dtype = at_least_float32(compute_dtype(None, v, g))
        v_wide = cast(v, dtype)
        others = tuple(a for a in range(v.ndim) if a not in self.axis)
        squares = jnp.sum(jnp.square(v_wide), axis=others, keepdims=True)
        scale = cast(g, dtype).reshape(_kept_shape(v.shape, self.axis))
        weight = cast(v_wide * (scale * lax.rsqrt(squares)), v.dtype)
        with overridden(self.layer, **{self.name: weight}):
            yield self.layer

    def torch_conversions(self) -> list[TorchConversion]:
        """A layer wrapped by ``torch.nn.utils.parametrizations.weight_norm``: the weight's
        entry ``w`` becomes ``parametrizations.w.original1`` (``v``) and ``scale`` is
        ``parametrizations.w.original0`` (``g``); the layer's other entries keep their
        names.

        Example:
            >>> import metoryx as mx
            >>> for c in mx.WeightNorm(mx.Dense(3, 4)).torch_conversions():
            ...     print(c.torch_keys, c.variables)
            ('parametrizations.weight.original0',) ('scale',)
            ('parametrizations.weight.original1',) ('layer/kernel',)
            ('bias',) ('layer/bias',)
        """
        weight, others = _split_conversions(self, "original1")
        key = weight.torch_keys[0].rsplit(".", 1)[0]  # parametrizations.<entry>
        g = _along_weight(self, weight, f"{key}.original0", "scale", self.axis, flat=False)
        return [g, weight, *others]


@fill_docstring(training_attribute=TRAINING_DOC)
class SpectralNorm(Module):
    """Spectral normalization: the layer runs on ``W / sigma(W)``, ``sigma`` the largest
    singular value of its weight ``W`` estimated by power iteration (Miyato et al., 2018;
    PyTorch's ``torch.nn.utils.parametrizations.spectral_norm``).

    The weight is seen as a matrix with one row per index along ``axis`` (the output axis by
    default) and the other axes, in their order, flattened into the columns. The wrapper keeps
    estimates of its first left and right singular vectors, ``u`` and ``v``, in the mutable
    ``"spectral_stats"`` collection. With ``is_training=True`` each call first runs
    ``n_power_iterations`` steps ``u = normalize(W v)``, ``v = normalize(W^T u)`` and stores
    the new vectors; with ``is_training=False`` the stored ones are used and nothing changes.
    Then ``sigma = u . (W v)``. As in PyTorch, no gradient flows through ``u`` and ``v``:
    the gradient of ``sigma`` reaches ``W`` only through ``W v``. The iteration runs in at
    least float32.

    **Start.** ``u`` and ``v`` start as random unit vectors, and the first call with
    ``is_training=True`` makes the first estimate (PyTorch runs 15 iterations when it wraps the
    layer; our initializers cannot see the weight). Before any training call ``sigma`` is
    meaningless: run a few training calls before evaluating a freshly initialized model. The
    estimate sharpens over calls as the weight changes slowly.

    Variables: ``params/layer/...``, the wrapped layer's own; ``spectral_stats/u`` of shape
    ``(rows,)`` and ``spectral_stats/v`` of shape ``(columns,)``, in at least float32.

    Args:
        layer: the layer to wrap (Dense, Conv, ConvTranspose, Embed, Einsum, or any module
            holding its weight, of at least 2 axes, as a Parameter attribute).
        name: the attribute of ``layer`` holding the weight; None for ``kernel``, else
            ``embedding``.
        axis: the axis of the weight that gives the matrix's rows; None for the weight's
            output axis (see the module docs).
        n_power_iterations: power-iteration steps per training call.
        epsilon: the smallest norm a vector is divided by when normalized, ``>= 0``.

    Raises:
        LayerConfigError: if ``layer`` is not a module, has no such weight, the weight has
            fewer than 2 axes, ``axis`` is not an axis of it, ``n_power_iterations`` is not a
            positive int, or ``epsilon`` is negative.

    Attributes:
        layer: the wrapped layer, unchanged: its own variables (the weight ``W`` included)
            stay at ``layer/...``; read its configuration (``wrapper.layer.out_size``) or
            fix a starting weight (``wrapper.layer.kernel.value = w``) through it.
        u: the State holding the left singular vector's estimate.
        v: the State holding the right singular vector's estimate.
        {training_attribute}

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.SpectralNorm(mx.Dense(3, 4)))
        >>> variables = init_fn(jax.random.key(0))
        >>> jax.tree.map(jnp.shape, variables["spectral_stats"])
        {'u': (4,), 'v': (3,)}
        >>> x = jnp.ones((2, 3))
        >>> for _ in range(20):
        ...     y, variables = apply_fn(variables, None, x, is_training=True)
        >>> kernel = variables["params"]["layer"]["kernel"]
        >>> y, _ = apply_fn(variables, None, x, is_training=False)
        >>> sigma = jnp.linalg.norm(kernel, ord=2)  # the exact largest singular value
        >>> bias = variables["params"]["layer"]["bias"]
        >>> bool(jnp.allclose(y, x @ (kernel / sigma) + bias.reshape(1, 4)))
        True
    """

    training: bool | None = None

    def __init__(
        self,
        layer: Module,
        name: str | None = None,
        axis: int | None = None,
        n_power_iterations: int = 1,
        epsilon: float = 1e-12,
    ):
        super().__init__()
        self.layer = layer
        self.name, weight = _weight("SpectralNorm", layer, name)
        if len(weight.shape) < 2:
            raise errors.LayerConfigError(
                f"SpectralNorm: the weight {self.name!r} of {type(layer).__name__} has shape "
                f"{weight.shape}; a spectral norm needs a matrix (at least 2 axes). Wrap a "
                f"layer whose weight has an input and an output axis, or pass name= for it."
            )
        self.axis = _axis("SpectralNorm", self.name, weight, axis)
        self.n_power_iterations = positive_int(
            "SpectralNorm", "n_power_iterations", n_power_iterations
        )
        self.epsilon = check_epsilon("SpectralNorm", epsilon)
        rows = weight.shape[self.axis]
        stats_dtype = at_least_float32(weight.dtype)
        self.u = State("spectral_stats", _random_unit_vector, (rows,), stats_dtype)
        self.v = State(
            "spectral_stats", _random_unit_vector, (math.prod(weight.shape) // rows,), stats_dtype
        )

    def extra_repr(self) -> str:
        return mode_repr(
            self,
            f"name={self.name!r}, axis={self.axis}, "
            f"n_power_iterations={self.n_power_iterations}, epsilon={self.epsilon}",
        )

    def __call__(self, *args: Any, is_training: bool, **kwargs: Any) -> Any:
        """Runs the wrapped layer on the spectrally normalized weight.

        Args:
            *args: the wrapped layer's arguments.
            is_training: True to run the power iteration and update ``u`` and ``v``, False
                to use the stored ones. Taken by the wrapper, not passed to the layer. A
                ``training`` switch that is set decides instead.
            **kwargs: the wrapped layer's keyword arguments.

        Returns:
            What the wrapped layer returns.
        """
        with self.reparametrized(is_training) as layer:
            return layer(*args, **kwargs)

    @contextlib.contextmanager
    def reparametrized(self, is_training: bool) -> Iterator[Module]:
        """Inside the block, the wrapped layer computes with the normalized weight.

        For the layer's other methods, e.g. the tied output projection of an Embed. Each
        entry with ``is_training=True`` runs the power iteration once more. Use it in a method
        of the model that ``apply_fn`` runs.

        Args:
            is_training: as in ``__call__``.

        Yields:
            The wrapped layer.

        Example:
            >>> import jax, jax.numpy as jnp, metoryx as mx
            >>> class TiedLM(mx.Module):
            ...     def __init__(self):
            ...         self.embed = mx.SpectralNorm(mx.Embed(100, 8))
            ...     def __call__(self, ids, is_training):
            ...         with self.embed.reparametrized(is_training) as embed:
            ...             return embed.attend(embed(ids))
            >>> init_fn, apply_fn = mx.transform(TiedLM())
            >>> variables = init_fn(jax.random.key(0))
            >>> logits, variables = apply_fn(variables, None, jnp.array([[1, 2]]), True)
            >>> logits.shape
            (1, 2, 100)
        """
        w = getattr(self.layer, self.name)
        dtype = at_least_float32(w.dtype)
        w_wide = cast(w, dtype)
        matrix = jnp.moveaxis(w_wide, self.axis, 0).reshape(w.shape[self.axis], -1)
        u, v = lax.stop_gradient(self.u), lax.stop_gradient(self.v)
        if layer_training(self, is_training):
            frozen = lax.stop_gradient(matrix)
            for _ in range(self.n_power_iterations):
                u = self._normalize(frozen @ v)
                v = self._normalize(frozen.T @ u)
            self.u, self.v = u, v
        sigma = u @ (matrix @ v)
        with overridden(self.layer, **{self.name: cast(w_wide / sigma, w.dtype)}):
            yield self.layer

    def _normalize(self, x: jax.Array) -> jax.Array:
        return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x))), self.epsilon)

    def torch_conversions(self) -> list[TorchConversion]:
        """A layer wrapped by ``torch.nn.utils.parametrizations.spectral_norm``: the weight's
        entry ``w`` becomes ``parametrizations.w.original``, and ``u``, ``v`` are
        ``parametrizations.w.0._u`` and ``._v``; the layer's other entries keep their
        names.

        Example:
            >>> import metoryx as mx
            >>> for c in mx.SpectralNorm(mx.Conv(3, 8, (3, 3))).torch_conversions():
            ...     print(c.torch_keys, c.variables)
            ('parametrizations.weight.original',) ('layer/kernel',)
            ('parametrizations.weight.0._u',) ('u',)
            ('parametrizations.weight.0._v',) ('v',)
            ('bias',) ('layer/bias',)
        """
        weight, others = _split_conversions(self, "original")
        key = weight.torch_keys[0].rsplit(".", 1)[0]  # parametrizations.<entry>
        columns = tuple(
            a for a in range(len(self.layer.__dict__[self.name].shape)) if a != self.axis
        )
        return [
            weight,
            _along_weight(self, weight, f"{key}.0._u", "u", (self.axis,), flat=True),
            _along_weight(self, weight, f"{key}.0._v", "v", columns, flat=True, one_axis=False),
            *others,
        ]


def _weight(wrapper: str, layer: Any, name: str | None) -> tuple[str, Parameter]:
    """The name and the Parameter of the weight of ``layer`` that ``wrapper`` reparametrizes."""
    if not isinstance(layer, Module):
        raise errors.LayerConfigError(
            f"{wrapper}: `layer` must be a module holding a weight, e.g. "
            f"{wrapper}(mx.Dense(3, 4)), got {type(layer).__name__} {layer!r:.60}."
        )
    attributes = vars(layer)
    parameters = [n for n, v in attributes.items() if isinstance(v, Parameter)]
    if name is None:
        name = next((n for n in _OUTPUT_AXES if n in parameters), None)
        if name is None:
            raise errors.LayerConfigError(
                f"{wrapper}: {type(layer).__name__} has no `kernel` or `embedding` Parameter, "
                f"the weights taken by default; its Parameters are {parameters or 'none'}. "
                f"Pass name= the attribute that holds the weight, and axis= its output axis."
            )
    elif not isinstance(name, str) or name not in parameters:
        raise errors.LayerConfigError(
            f"{wrapper}: name={name!r} is not a Parameter of {type(layer).__name__} (its "
            f"Parameters are {parameters or 'none'}). Pass the attribute that holds the "
            f"weight, e.g. name={(parameters or ['kernel'])[0]!r}."
        )
    return name, attributes[name]


def _axis(wrapper: str, name: str, weight: Parameter, axis: Any) -> int:
    """``axis`` of ``weight`` as a non-negative int; None is the weight's output axis."""
    ndim = len(weight.shape)
    if axis is None:
        if name not in _OUTPUT_AXES:
            raise errors.LayerConfigError(
                f"{wrapper}: the output axis of the weight {name!r} (shape {weight.shape}) is "
                f"known only for `kernel` (last) and `embedding` (0). Pass axis= the axis that "
                f"indexes the outputs, e.g. axis=0 for a PyTorch-style (out, in) weight."
            )
        axis = _OUTPUT_AXES[name]
    try:
        index = operator.index(axis)
    except TypeError:
        index = ndim  # out of range: reported below
    if isinstance(axis, bool) or not -ndim <= index < ndim:
        raise errors.LayerConfigError(
            f"{wrapper}: axis={axis!r} is not an axis of the weight {name!r} of shape "
            f"{weight.shape}. Pass an int in [{-ndim}, {ndim - 1}]."
        )
    return index % ndim


def _kept_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with every axis but ``axes`` of size 1."""
    return tuple(size if a in axes else 1 for a, size in enumerate(shape))


def _random_unit_vector(
    key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32
) -> jax.Array:
    """A random direction: a standard normal draw divided by its norm."""
    x = initializers.normal()(key, shape, at_least_float32(dtype))
    return cast(x / jnp.sqrt(jnp.sum(jnp.square(x))), jnp.dtype(dtype))


def _split_conversions(
    wrapper: WeightNorm | SpectralNorm, suffix: str
) -> tuple[TorchConversion, list[TorchConversion]]:
    """The wrapped layer's conversions as the wrapper's: its weight's entry ``w`` renamed
    ``parametrizations.w.<suffix>`` (PyTorch's name for the stored weight), the others under
    ``layer/`` with their entry names unchanged (PyTorch keeps them on the wrapped module)."""
    target = wrapper.name
    weight: TorchConversion | None = None
    others: list[TorchConversion] = []
    for conversion in torch_conversions(wrapper.layer):
        if target not in conversion.variables:
            others.append(conversion.renamed("", "layer/"))
        elif conversion.variables == (target,) and len(conversion.torch_keys) == 1:
            weight = conversion
        else:
            raise errors.LayerConfigError(
                f"{type(wrapper).__name__}: {type(wrapper.layer).__name__} converts its weight "
                f"{target!r} to PyTorch together with {list(conversion.variables)} as "
                f"{list(conversion.torch_keys)}, so it has no single PyTorch weight to "
                f"reparametrize. Load the PyTorch weights of the unwrapped layer instead."
            )
    assert weight is not None  # every variable of the layer has a conversion
    key = weight.torch_keys[0]
    renamed = dataclasses.replace(
        weight, torch_keys=(f"parametrizations.{key}.{suffix}",), variables=(f"layer/{target}",)
    )
    return renamed, others


def _along_weight(
    wrapper: WeightNorm | SpectralNorm,
    weight: TorchConversion,
    torch_key: str,
    variable: str,
    axes: tuple[int, ...],
    *,
    flat: bool,
    one_axis: bool = True,
) -> TorchConversion:
    """The conversion of a wrapper variable laid out along ``axes`` of the weight.

    Each element of the weight is labeled with the index of its entry in the variable, and the
    labels are converted as the weight is: PyTorch's array holds the entries along the axes
    where the labels vary, in their order; with ``one_axis`` (PyTorch's ``dim``) there may be
    only one such axis. It is stored ``flat`` for spectral norm's ``u`` and ``v``, and else
    with the weight's other axes of size 1 for weight norm's ``g`` (0-d for its ``dim=None``).
    """
    weight_shape = wrapper.layer.__dict__[wrapper.name].shape
    kept = _kept_shape(weight_shape, axes)
    size = math.prod(kept)
    labels = np.broadcast_to(np.arange(size).reshape(kept), weight_shape)
    torch_labels = np.asarray(weight.to_torch(np.array(labels))[0])
    varying = tuple(
        bool((torch_labels != np.take(torch_labels, [0], axis=a)).any())
        for a in range(torch_labels.ndim)
    )
    first = torch_labels[tuple(slice(None) if v else slice(0, 1) for v in varying)]
    order = first.reshape(-1)
    spread = one_axis and sum(varying) > 1
    if spread or order.size != size or not np.array_equal(np.sort(order), np.arange(size)):
        raise errors.LayerConfigError(
            f"{type(wrapper).__name__}: in PyTorch's layout of the weight {wrapper.name!r} of "
            f"{type(wrapper.layer).__name__}, the entries of {variable!r} do not lie along "
            f"{'one axis' if one_axis else 'axes'} of their own (a grouped ConvTranspose "
            f"folds its groups into PyTorch's input axis), so {variable!r} has no PyTorch "
            f"counterpart. Load the PyTorch weights of the unwrapped layer, or use groups=1."
        )
    torch_shape = (size,) if flat else first.shape if axes else ()
    shape = wrapper.__dict__[variable].shape

    def to_metoryx(a: np.ndarray) -> tuple[np.ndarray]:
        if np.shape(a) != torch_shape:  # a same-sized array in another layout must not pass
            raise ValueError(f"{torch_key}: expected shape {torch_shape}, got {np.shape(a)}")
        entries = np.empty(size, np.asarray(a).dtype)
        entries[order] = np.reshape(a, -1)
        return (entries.reshape(shape),)

    def to_torch(a: np.ndarray) -> tuple[np.ndarray]:
        return (np.reshape(np.reshape(a, -1)[order], torch_shape),)

    return TorchConversion((torch_key,), (variable,), to_metoryx, to_torch)
