"""Recurrent layers: the cells SimpleRNNCell, LSTMCell and GRUCell (one time step), RNN (a cell
scanned over time with ``jax.lax.scan``), Bidirectional (two RNNs, one running backwards) and
StackedRNN (layers of them, as PyTorch's ``num_layers``).

The cells use PyTorch's parameterization, so they compute the same numbers as
``torch.nn.RNNCell``/``LSTMCell``/``GRUCell`` and a PyTorch checkpoint loads with transposes
only. Each cell has an input projection and a recurrent projection, each with its own bias,
and the gates side by side along the last axis in PyTorch's order:

==============  =====  ==========================================================
cell            gates  step (``xp = x @ input_kernel + input_bias``,
                       ``hp = h @ recurrent_kernel + recurrent_bias``, split by gate)
==============  =====  ==========================================================
SimpleRNNCell   1      ``h' = activation(xp + hp)``
LSTMCell        4      i, f, g, o: ``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(c')``
GRUCell         3      r, z, n: ``n = tanh(xp_n + σ(r) hp_n)``, ``h' = (1 - σ(z)) n + σ(z) h``
==============  =====  ==========================================================

(In the LSTM and GRU rows, each gate's ``xp + hp`` is written by its name alone; the GRU's
candidate ``n`` multiplies the reset gate with ``hp_n``, its recurrent bias included.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metoryx import errors, initializers
from metoryx._core.arguments import bool_argument
from metoryx._core.module import Module, module_label
from metoryx._core.variables import Parameter
from metoryx._docstrings import fill_docstring
from metoryx.initializers import Initializer
from metoryx.layout import TorchConversion, same, torch_conversions, transposed
from metoryx.nn._arguments import check_function, check_rate, positive_int
from metoryx.nn._compute import (
    DEFAULT_KERNEL_INIT,
    TRAINING_DOC,
    add_bias,
    cast,
    compute_dtype,
    differentiated_as,
    is_symbolic_zero,
    layer_dtype,
    layer_training,
    mode_repr,
)
from metoryx.nn.dropout import dropout

#: The default initializer of the recurrent kernels: orthogonal rows over all gates at once.
_DEFAULT_RECURRENT_INIT = initializers.orthogonal()

# The constructor arguments the three cells share (see fill_docstring).
_CELL_ARGS_DOC = """
in_size: size of the last axis of the input.
hidden_size: size of the hidden state (and of the output).
use_bias: whether to add the two learned biases (PyTorch's ``bias``).
input_kernel_init: initializer of ``input_kernel``, of shape ``(in_size, gates * hidden_size)``.
recurrent_kernel_init: initializer of ``recurrent_kernel``, of shape
    ``(hidden_size, gates * hidden_size)``.
bias_init: initializer of ``input_bias`` and ``recurrent_bias``, each of shape
    ``(gates * hidden_size,)``.
dtype: the computation dtype (None: inferred from inputs and parameters).
param_dtype: the storage dtype of the parameters.
"""


class _Weights(NamedTuple):
    """A cell's kernels and biases (the biases None without ``use_bias``)."""

    input_kernel: jax.Array
    input_bias: jax.Array | None
    recurrent_kernel: jax.Array
    recurrent_bias: jax.Array | None


class _Part(NamedTuple):
    """A kernel and its bias (or None), whole or one gate's slice, in the computation dtype."""

    kernel: jax.Array
    bias: jax.Array | None

    def project(self, a: jax.Array) -> jax.Array:
        """``a @ kernel + bias``."""
        product = a @ self.kernel
        return product if self.bias is None else add_bias(product, self.bias)


class _Parts(NamedTuple):
    """The two projections of a cell as a step multiplies them: one part each (one product of
    all gates), or one part per gate, multiplied apart or, ``joined``, joined again inside the
    step into one product (whose gradient then builds up per gate: see :func:`_scan_cell`)."""

    input: tuple[_Part, ...]
    recurrent: tuple[_Part, ...]
    joined: bool = False


class _Cell(Module):
    """What the three cells share: the two projections, the carry checks, the torch layout.

    A subclass sets ``_gates`` and ``_carry_doc`` and defines ``_recur(carry, xp, hp,
    dtype)``: one step from the two projections of the step's input and hidden state
    (``xp = x @ input_kernel + input_bias``, ``hp = h @ recurrent_kernel + recurrent_bias``),
    each given as a list of its gates. The constructor is the cells' public one (LSTMCell and
    GRUCell inherit it as it is). :meth:`_step` makes the projections from :class:`_Parts`,
    cast once before :class:`RNN`'s loop; :func:`_scan_cell_jvp` calls :meth:`_linearized`
    on projections made apart.
    """

    _gates: int
    _carry_doc: str  # how the carry is described in messages, e.g. "(h, c)"
    _recur: Callable[..., tuple[Any, jax.Array]]  # (carry, xp, hp, dtype)
    # Whether the derivative past HOISTED_MAX_ROWS joins the gates' kernel slices again in
    # each step from JOINED_MIN_SIZE on (one product of each kernel): see _scan_cell.
    _joins_gates = False

    def __init__(
        self,
        in_size: int,
        hidden_size: int,
        use_bias: bool = True,
        input_kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        recurrent_kernel_init: Initializer = _DEFAULT_RECURRENT_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        name = type(self).__name__
        self.in_size = positive_int(name, "in_size", in_size)
        self.hidden_size = positive_int(name, "hidden_size", hidden_size)
        self.use_bias = bool_argument(name, "use_bias", use_bias)
        self.dtype = layer_dtype(type(self).__name__, dtype)
        self.param_dtype = param_dtype
        width = self._gates * self.hidden_size
        self.input_kernel = Parameter(input_kernel_init, (self.in_size, width), param_dtype)
        self.recurrent_kernel = Parameter(
            recurrent_kernel_init, (self.hidden_size, width), param_dtype
        )
        self.input_bias = Parameter(bias_init, (width,), param_dtype) if use_bias else None
        self.recurrent_bias = Parameter(bias_init, (width,), param_dtype) if use_bias else None

    def extra_repr(self) -> str:
        return f"in_size={self.in_size}, hidden_size={self.hidden_size}, use_bias={self.use_bias}"

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.RNNCell``/``LSTMCell``/``GRUCell``: ``weight_ih`` ``(gates * hidden,
        in)`` and ``weight_hh`` ``(gates * hidden, hidden)`` are the kernels transposed,
        ``bias_ih`` and ``bias_hh`` the biases."""
        conversions = [
            transposed("weight_ih", "input_kernel", (1, 0)),
            transposed("weight_hh", "recurrent_kernel", (1, 0)),
        ]
        if self.use_bias:
            conversions += [same("bias_ih", "input_bias"), same("bias_hh", "recurrent_bias")]
        return conversions

    def __call__(self, carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        """Runs one time step.

        Args:
            carry: the state before the step (see the class docs), each array of shape
                ``(*batch, hidden_size)``; :meth:`initial_carry` gives the first.
            x: the input of the step, of shape ``(*batch, in_size)``, any number of leading
                batch axes.

        Returns:
            ``(new_carry, y)``: the state after the step, each array in the dtype of the
            carry given (so scanning the cell never changes the carry's type), and the
            output ``y`` (the new hidden state), of shape ``(*batch, hidden_size)`` and the
            computation dtype.

        Raises:
            InputShapeError: if the last axis of ``x`` is not ``in_size`` long, or the carry
                is not of the cell's structure and shape ``(*batch, hidden_size)``.
        """
        x = jnp.asarray(x)
        self._check_input(x, "x", "(..., in_size)")
        self._check_carry(carry, x.shape[:-1])
        dtype = self._compute_dtype(x, carry)
        return self._step(carry, x, dtype, self._parts(self._weights(), dtype, by_gate=False))

    def initial_carry(self, batch_shape: Sequence[int] = (), dtype: Any = None) -> Any:
        """The zero state: ``h`` of shape ``(*batch_shape, hidden_size)``.

        Args:
            batch_shape: the input's batch axes (``x.shape[:-1]`` for a step).
            dtype: the carry's dtype; None: ``dtype`` if the cell has one, else
                ``param_dtype``.

        Example:
            >>> import metoryx as mx
            >>> mx.GRUCell(3, 4).initial_carry((2,)).shape
            (2, 4)
        """
        if dtype is None:
            dtype = self.dtype if self.dtype is not None else self.param_dtype
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def _check_input(self, x: jax.Array, what: str, layout: str) -> None:
        if x.ndim == 0 or x.shape[-1] != self.in_size:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected {what} of shape {layout} whose last axis has "
                f"in_size={self.in_size} features, got shape {x.shape}. Reshape the input so "
                f"its last axis holds the features, or build the cell with in_size equal to "
                f"the input's last axis."
            )

    def _carry_arrays(self, carry: Any) -> tuple[Any, ...] | None:
        """The carry's arrays in order, or None if it is not of the cell's structure."""
        return (carry,) if isinstance(carry, (jax.Array, np.ndarray)) else None

    def _check_carry(self, carry: Any, batch_shape: tuple[int, ...]) -> None:
        expected = (*batch_shape, self.hidden_size)
        arrays = self._carry_arrays(carry)
        if arrays is None or any(np.shape(a) != expected for a in arrays):
            raise errors.InputShapeError(
                f"{module_label(self)}: expected a carry {self._carry_doc} of arrays of shape "
                f"{expected} (the input's batch axes {batch_shape}, then hidden_size="
                f"{self.hidden_size}), got {jax.tree.map(np.shape, carry)!r}. Start from "
                f"cell.initial_carry({batch_shape}) and pass on the carry each step returns."
            )

    def _compute_dtype(self, x: jax.Array, carry: Any) -> Any:
        return compute_dtype(
            self.dtype,
            x,
            *(self._carry_arrays(carry) or ()),
            self.input_kernel,
            self.recurrent_kernel,
            self.input_bias,
            self.recurrent_bias,
        )

    def _weights(self) -> _Weights:
        return _Weights(
            self.input_kernel, self.input_bias, self.recurrent_kernel, self.recurrent_bias
        )

    @classmethod
    def _parts(cls, weights: _Weights, dtype: Any, by_gate: bool, joined: bool = False) -> _Parts:
        """The kernels and biases cast to ``dtype``, whole or split by gate (and ``joined`` in
        each step): made once, before a loop (a slice inside XLA:CPU's loop is taken again at
        every step)."""
        pieces = cls._gates if by_gate else 1

        def split(kernel: jax.Array, bias: jax.Array | None) -> tuple[_Part, ...]:
            kernel, bias = cast(kernel, dtype), None if bias is None else cast(bias, dtype)
            if pieces == 1:
                return (_Part(kernel, bias),)
            kernels = jnp.split(kernel, pieces, axis=-1)
            biases = [None] * pieces if bias is None else jnp.split(bias, pieces)
            return tuple(_Part(k, b) for k, b in zip(kernels, biases, strict=True))

        return _Parts(
            split(weights.input_kernel, weights.input_bias),
            split(weights.recurrent_kernel, weights.recurrent_bias),
            joined,
        )

    @staticmethod
    def _hidden(carry: Any) -> jax.Array:
        """The hidden state ``h`` of a carry (an LSTM's is ``(h, c)``)."""
        return carry[0] if isinstance(carry, tuple) else carry

    def _step(self, carry: Any, x: jax.Array, dtype: Any, parts: _Parts) -> tuple[Any, Any]:
        """One step: the projections of the hidden state and of ``x``, then ``_recur``.

        The recurrent product comes first: XLA:CPU runs the loop's operations in this order,
        and the derivative's loop (past :data:`HOISTED_MAX_ROWS` rows) is faster so. See
        :func:`_scan_cell` for the numbers; the results are the same, bit for bit."""
        hp = self._by_gate(cast(self._hidden(carry), dtype), parts.recurrent, parts.joined)
        xp = self._by_gate(cast(x, dtype), parts.input, parts.joined)
        return self._recur(carry, xp, hp, dtype)

    def _by_gate(self, a: jax.Array, parts: tuple[_Part, ...], joined: bool) -> list[jax.Array]:
        """``a @ kernel + bias`` of each part (``joined``: of the parts joined into one), as a
        list of the gates."""
        if joined:
            biases = [part.bias for part in parts if part.bias is not None]
            parts = (
                _Part(
                    jnp.concatenate([part.kernel for part in parts], axis=-1),
                    jnp.concatenate(biases, axis=-1) if biases else None,
                ),
            )
        products = [part.project(a) for part in parts]
        return self._split(products[0]) if len(parts) == 1 else products

    def _gated(self, carry: Any, xp: jax.Array, hp: jax.Array, dtype: Any) -> tuple[Any, Any]:
        """One step from the two projections, each with all gates side by side."""
        return self._recur(carry, self._split(xp), self._split(hp), dtype)

    def _linearized(
        self, carry: Any, xp: jax.Array, hp: jax.Array, dtype: Any
    ) -> tuple[tuple[Any, Any], Callable[..., Any]]:
        """:meth:`_gated` and its linear map ``(d_xp, d_hp, d_carry) -> (d_new_carry, d_y)``, a
        PyTree of the residuals (a scan stacks them): ``jax.linearize``'s, or a cell's own
        with fewer residuals."""
        return jax.linearize(lambda xp, hp, carry: self._gated(carry, xp, hp, dtype), xp, hp, carry)

    def _split(self, a: jax.Array) -> list[jax.Array]:
        return jnp.split(a, self._gates, axis=-1)


@fill_docstring(cell_args=_CELL_ARGS_DOC)
class SimpleRNNCell(_Cell):
    """The Elman recurrent cell: ``h' = activation(x @ input_kernel + input_bias + h @
    recurrent_kernel + recurrent_bias)``, as ``torch.nn.RNNCell``.

    The carry is the hidden state ``h``, an array of shape ``(*batch, hidden_size)``; the
    output of a step is the new ``h``.

    Variables (``params``): ``input_kernel`` ``(in_size, hidden_size)``, ``recurrent_kernel``
    ``(hidden_size, hidden_size)``, and with ``use_bias`` ``input_bias`` and
    ``recurrent_bias`` ``(hidden_size,)``. PyTorch's ``weight_ih``/``weight_hh`` are the
    kernels transposed; ``bias_ih``/``bias_hh`` the biases.

    **Default initializers** (the same for all three cells): ``input_kernel`` LeCun normal
    (as :class:`~metoryx.Dense`), ``recurrent_kernel`` orthogonal (its rows orthonormal over
    all gates together), biases zero. PyTorch draws every parameter from
    ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``; to start as PyTorch does, pass
    ``mx.initializers.uniform(-b, b)`` with ``b = hidden_size ** -0.5`` as all three
    initializers.

    Args:
        {cell_args}
        activation: the nonlinearity, a function of one array: ``mx.tanh`` (PyTorch's
            ``nonlinearity="tanh"``) or ``mx.relu`` (``"relu"``), or any other.

    Raises:
        LayerConfigError: if a size is not a positive int or ``activation`` is not callable.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> cell = mx.SimpleRNNCell(3, 4)
        >>> class Step(mx.Module):
        ...     def __init__(self):
        ...         self.cell = cell
        ...     def __call__(self, x):
        ...         return self.cell(self.cell.initial_carry(x.shape[:-1]), x)
        >>> init_fn, apply_fn = mx.transform(Step())
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["cell"]["recurrent_kernel"].shape
        (4, 4)
        >>> (h, y), _ = apply_fn(variables, None, jnp.ones((2, 3)))
        >>> h.shape, bool((h == y).all())
        ((2, 4), True)
    """

    _gates = 1
    _carry_doc = "h"

    def __init__(
        self,
        in_size: int,
        hidden_size: int,
        activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
        use_bias: bool = True,
        input_kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        recurrent_kernel_init: Initializer = _DEFAULT_RECURRENT_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(
            in_size,
            hidden_size,
            use_bias,
            input_kernel_init,
            recurrent_kernel_init,
            bias_init,
            dtype,
            param_dtype,
        )
        self.activation = check_function("SimpleRNNCell", "activation", activation, "mx.tanh")

    def extra_repr(self) -> str:
        name = getattr(self.activation, "__name__", type(self.activation).__name__)
        return f"{super().extra_repr()}, activation={name}"

    def _recur(
        self, h: jax.Array, xp: list[jax.Array], hp: list[jax.Array], dtype: Any
    ) -> tuple[Any, jax.Array]:
        y = self.activation(xp[0] + hp[0])
        return cast(y, h.dtype), y


@fill_docstring(cell_args=_CELL_ARGS_DOC)
class LSTMCell(_Cell):
    """The long short-term memory cell, as ``torch.nn.LSTMCell``.

    The carry is the tuple ``(h, c)`` (a plain tuple, in PyTorch's order) of the hidden and
    the cell state, each of shape ``(*batch, hidden_size)``; the output of a step is the new
    ``h``. The gates are, along the last axis of the kernels, PyTorch's ``i, f, g, o`` (input,
    forget, candidate, output): ``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(c')``.

    Variables (``params``): ``input_kernel`` ``(in_size, 4 * hidden_size)``,
    ``recurrent_kernel`` ``(hidden_size, 4 * hidden_size)``, and with ``use_bias``
    ``input_bias`` and ``recurrent_bias`` ``(4 * hidden_size,)``. PyTorch's
    ``weight_ih``/``weight_hh`` are the kernels transposed; ``bias_ih``/``bias_hh`` the
    biases. The default initializers are those of :class:`SimpleRNNCell`.

    Args:
        {cell_args}

    Raises:
        LayerConfigError: if a size is not a positive int.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> cell = mx.LSTMCell(3, 4)
        >>> h, c = cell.initial_carry((2,))
        >>> _, apply_fn = mx.transform(cell)
        >>> variables = mx.init(cell)(jax.random.key(0))
        >>> variables["params"]["input_kernel"].shape
        (3, 16)
        >>> ((h, c), y), _ = apply_fn(variables, None, (h, c), jnp.ones((2, 3)))
        >>> h.shape, c.shape, y.shape
        ((2, 4), (2, 4), (2, 4))
    """

    _gates = 4
    _carry_doc = "(h, c)"
    _joins_gates = True

    def initial_carry(
        self, batch_shape: Sequence[int] = (), dtype: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        """The zero state: ``(h, c)``, each of shape ``(*batch_shape, hidden_size)``.

        Args:
            batch_shape: the input's batch axes (``x.shape[:-1]`` for a step).
            dtype: the carry's dtype; None: ``dtype`` if the cell has one, else
                ``param_dtype``.

        Example:
            >>> import metoryx as mx
            >>> [a.shape for a in mx.LSTMCell(3, 4).initial_carry((2,))]
            [(2, 4), (2, 4)]
        """
        zeros = super().initial_carry(batch_shape, dtype)
        return zeros, zeros

    def _carry_arrays(self, carry: Any) -> tuple[Any, ...] | None:
        if type(carry) is tuple and len(carry) == 2:
            return carry
        return None

    def _recur(
        self,
        carry: tuple[jax.Array, jax.Array],
        xp: list[jax.Array],
        hp: list[jax.Array],
        dtype: Any,
    ) -> tuple[Any, jax.Array]:
        h, c = carry
        *_, o, new_c, tanh_c = _lstm_gates(xp, hp, cast(c, dtype))
        new_h = o * tanh_c
        return (cast(new_h, h.dtype), cast(new_c, c.dtype)), new_h

    def _linearized(
        self, carry: tuple[jax.Array, jax.Array], xp: jax.Array, hp: jax.Array, dtype: Any
    ) -> tuple[tuple[Any, Any], Callable[..., Any]]:
        c = cast(carry[1], dtype)
        i, f, g, o, new_c, tanh_c = _lstm_gates(self._split(xp), self._split(hp), c)
        new_h = o * tanh_c
        # d c' = σ'(f) c d f + σ(f) d c + σ'(i) g d i + σ(i) (1 - g²) d g, d h' = σ'(o) tanh(c')
        # d o + σ(o) (1 - tanh²(c')) d c', with σ' = σ (1 - σ) written from the gate's value.
        linear = jax.tree_util.Partial(
            _lstm_linear,
            f * (1 - f) * c,
            f,
            i * (1 - i) * g,
            i * (1 - g * g),
            o * (1 - o) * tanh_c,
            o * (1 - tanh_c * tanh_c),
        )
        return ((new_h, new_c), new_h), linear


@fill_docstring(cell_args=_CELL_ARGS_DOC)
class GRUCell(_Cell):
    """The gated recurrent unit, as ``torch.nn.GRUCell``.

    The carry is the hidden state ``h``, an array of shape ``(*batch, hidden_size)``; the
    output of a step is the new ``h``. The gates are, along the last axis of the kernels,
    PyTorch's ``r, z, n`` (reset, update, candidate). As in PyTorch, the reset gate multiplies
    the candidate's recurrent projection *with* its bias:
    ``n = tanh(xp_n + σ(r) (h @ W_hn + b_hn))``, ``h' = (1 - σ(z)) n + σ(z) h``.

    Variables (``params``): ``input_kernel`` ``(in_size, 3 * hidden_size)``,
    ``recurrent_kernel`` ``(hidden_size, 3 * hidden_size)``, and with ``use_bias``
    ``input_bias`` and ``recurrent_bias`` ``(3 * hidden_size,)``. PyTorch's
    ``weight_ih``/``weight_hh`` are the kernels transposed; ``bias_ih``/``bias_hh`` the
    biases. The default initializers are those of :class:`SimpleRNNCell`.

    Args:
        {cell_args}

    Raises:
        LayerConfigError: if a size is not a positive int.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> cell = mx.GRUCell(3, 4)
        >>> init_fn, apply_fn = mx.transform(cell)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["recurrent_bias"].shape
        (12,)
        >>> (h, y), _ = apply_fn(variables, None, cell.initial_carry((5, 2)), jnp.ones((5, 2, 3)))
        >>> h.shape
        (5, 2, 4)
    """

    _gates = 3
    _carry_doc = "h"

    def _recur(
        self, h: jax.Array, xp: list[jax.Array], hp: list[jax.Array], dtype: Any
    ) -> tuple[Any, jax.Array]:
        *_, new_h = _gru_gates(xp, hp, cast(h, dtype))
        return cast(new_h, h.dtype), new_h

    def _linearized(
        self, carry: jax.Array, xp: jax.Array, hp: jax.Array, dtype: Any
    ) -> tuple[tuple[Any, Any], Callable[..., Any]]:
        h = cast(carry, dtype)
        r, z, n, hn, new_h = _gru_gates(self._split(xp), self._split(hp), h)
        # d n = (1 - n²) (d xn + σ'(r) hn d(xr + hr) + σ(r) d hn), d h' = (1 - z) d n + (h - n)
        # σ'(z) d(xz + hz) + z d h, with σ' = σ (1 - σ) written from the gate's value.
        coefficients = (r, z, 1 - n * n, r * (1 - r) * hn, (h - n) * z * (1 - z))
        reset, update, candidate, through_reset, through_update = coefficients
        linear = jax.tree_util.Partial(
            _gru_linear, reset, update, candidate, through_reset, through_update
        )
        return (new_h, new_h), linear


def _lstm_gates(xp: list[jax.Array], hp: list[jax.Array], c: jax.Array) -> tuple:
    """An LSTM step from the gates' projections: the gates ``i, f, g, o`` after their
    nonlinearities, the new cell state and its tanh."""
    i, f, g, o = (x + r for x, r in zip(xp, hp, strict=True))
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    new_c = f * c + i * g
    return i, f, g, o, new_c, jnp.tanh(new_c)


def _gru_gates(xp: list[jax.Array], hp: list[jax.Array], h: jax.Array) -> tuple:
    """A GRU step from the gates' projections: ``r, z, n`` after their nonlinearities, the
    candidate's recurrent projection ``hn`` and the new state."""
    (xr, xz, xn), (hr, hz, hn) = xp, hp
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return r, z, n, hn, (1 - z) * n + z * h


def _gru_linear(
    reset: jax.Array,
    update: jax.Array,
    candidate: jax.Array,
    through_reset: jax.Array,
    through_update: jax.Array,
    d_xp: jax.Array,
    d_hp: jax.Array,
    d_h: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The GRU step's linear map, from its coefficients at the step (see
    :meth:`GRUCell._linearized`); every operation multiplies a tangent, so that a scan of it
    is all tangent work (JAX would move an operation of the coefficients alone into a loop
    of its own, stacking its results)."""
    (dxr, dxz, dxn), (dhr, dhz, dhn) = jnp.split(d_xp, 3, -1), jnp.split(d_hp, 3, -1)
    dn = candidate * (dxn + through_reset * (dxr + dhr) + reset * dhn)
    d_new = dn - update * dn + through_update * (dxz + dhz) + update * cast(d_h, dn.dtype)
    return d_new, d_new


def _lstm_linear(
    forget_c: jax.Array,
    forget: jax.Array,
    input_g: jax.Array,
    input_dg: jax.Array,
    output_tanh: jax.Array,
    output_dtanh: jax.Array,
    d_xp: jax.Array,
    d_hp: jax.Array,
    d_carry: tuple[jax.Array, jax.Array],
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """The LSTM step's linear map, from its coefficients at the step (see
    :meth:`LSTMCell._linearized` and :func:`_gru_linear`)."""
    di, df, dg, do = jnp.split(d_xp + d_hp, 4, -1)
    d_c = forget_c * df + forget * cast(d_carry[1], df.dtype) + input_g * di + input_dg * dg
    d_h = output_tanh * do + output_dtanh * d_c
    return (d_h, d_c), d_h


def _suffixed(conversions: list[TorchConversion], suffix: str, prefix: str) -> list:
    """The conversions with ``suffix`` after each torch key and ``prefix`` before each
    variable: how PyTorch's ``nn.LSTM`` names its cell's entries (``weight_ih_l0``)."""
    return [
        dataclasses.replace(
            c,
            torch_keys=tuple(k + suffix for k in c.torch_keys),
            variables=tuple(prefix + v for v in c.variables),
        )
        for c in conversions
    ]


class RNN(Module):
    """A recurrent cell scanned over the time axis with one ``jax.lax.scan``.

    The input is batch-first, ``(*batch, time, features)`` (PyTorch's ``batch_first=True``),
    or time-major, ``(time, *batch, features)``, with ``time_major=True``. The compiled
    program holds one ``scan`` whatever the length of the sequence. For the cells of this
    module, each step projects its input inside the loop (the quickest forward pass). The
    derivative is the quickest measured for the step's rows (the product of the batch axes,
    as the layer sees them: under ``jax.vmap``, one example's): with up to 8, the kernels'
    gradients are each one matrix product over all steps after the backward loop, as cuDNN
    computes them; with more, the kernels' gradients build up per gate in the loop, as in
    Flax's cells (each gate multiplied apart; with JAX 0.10, the LSTM's four gates joined in
    one product from ``rows * hidden_size`` of 4,096). All forms agree within float32 rounding.
    (So a batch is best given to the layer whole: a ``jax.vmap`` of one sequence over 32
    sequences of 128 steps trains 1.4x slower on CPU than the same batch given whole.)

    ``reverse=True`` runs from the last step to the first and returns the outputs in the
    original order, as the backward direction of a bidirectional PyTorch RNN.

    **Padded batches.** With ``seq_lengths`` (one length per sequence), the steps at and after
    a sequence's length are padding: the carry stops changing after the sequence's last step
    and the outputs there are zeros; in reverse, each sequence starts at its own last step.
    Each sequence thus gets exactly what running it alone, unpadded, gives (as PyTorch's
    packed sequences). A length of 0 gives the initial carry and zero outputs; lengths above
    ``time`` count as ``time``.

    The cell is any module with ``initial_carry(batch_shape)`` and ``__call__(carry, x) ->
    (new_carry, y)`` whose new carry has the carry's structure, shapes and dtypes.

    Variables: the cell's, under ``cell/`` (``cell/input_kernel``, ...). For PyTorch, the
    entries of ``torch.nn.RNN``/``LSTM``/``GRU(batch_first=True)`` with one layer:
    ``weight_ih_l0`` is ``cell/input_kernel`` transposed, and so on. See :class:`StackedRNN`
    for ``num_layers > 1``.

    Args:
        cell: the cell run at each time step, e.g. ``LSTMCell(in_size, hidden_size)``.
        return_sequences: whether the output is every step's output ``(*batch, time, hidden)``
            or only the last one ``(*batch, hidden)``: the output of the last step processed,
            which is step ``length - 1`` forward and step 0 in reverse.
        reverse: whether to run from the last time step to the first.
        time_major: whether the input is ``(time, *batch, features)`` (and the sequence
            output ``(time, *batch, hidden)``).
        unroll: how many steps each iteration of the compiled loop runs (``lax.scan``'s
            ``unroll``): more is faster for small cells and compiles longer.

    Raises:
        LayerConfigError: if ``cell`` is not a cell module or ``unroll`` is not a positive int.

    Attributes:
        cell: the cell, at the path ``cell``; e.g. ``rnn.cell.hidden_size``.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> rnn = mx.RNN(mx.LSTMCell(3, 4))
        >>> init_fn, apply_fn = mx.transform(rnn)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["cell"]["input_kernel"].shape
        (3, 16)
        >>> x = jnp.ones((2, 5, 3))                       # (batch, time, features)
        >>> y, _ = apply_fn(variables, None, x)
        >>> y.shape
        (2, 5, 4)
        >>> ((h, c), y), _ = apply_fn(variables, None, x, seq_lengths=jnp.array([5, 2]),
        ...                           return_carry=True)
        >>> h.shape, bool((y[1, 2:] == 0).all())
        ((2, 4), True)
    """

    def __init__(
        self,
        cell: Module,
        return_sequences: bool = True,
        reverse: bool = False,
        time_major: bool = False,
        unroll: int = 1,
    ):
        super().__init__()
        if not (isinstance(cell, Module) and callable(getattr(cell, "initial_carry", None))):
            raise errors.LayerConfigError(
                f"RNN: `cell` must be a cell module, such as LSTMCell(in_size, hidden_size), "
                f"with initial_carry(batch_shape) and __call__(carry, x); got "
                f"{type(cell).__name__}. A custom cell subclasses mx.Module and defines both."
            )
        self.cell = cell
        self.return_sequences = bool_argument("RNN", "return_sequences", return_sequences)
        self.reverse = bool_argument("RNN", "reverse", reverse)
        self.time_major = bool_argument("RNN", "time_major", time_major)
        self.unroll = positive_int("RNN", "unroll", unroll)

    def extra_repr(self) -> str:
        return (
            f"return_sequences={self.return_sequences}, reverse={self.reverse}, "
            f"time_major={self.time_major}, unroll={self.unroll}"
        )

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.RNN``/``LSTM``/``GRU`` with one layer: the cell's entries with the suffix
        ``_l0`` (``weight_ih_l0``, ``bias_hh_l0``, ...)."""
        return _suffixed(torch_conversions(self.cell), "_l0", "cell/")

    def __call__(
        self,
        x: jax.Array,
        initial_carry: Any = None,
        seq_lengths: jax.Array | None = None,
        return_carry: bool = False,
    ) -> Any:
        """Runs the cell over the sequence.

        Args:
            x: the input, ``(*batch, time, features)`` (``(time, *batch, features)`` with
                ``time_major``), any number of batch axes, at least one time step.
            initial_carry: the carry before the first step processed, e.g. from
                ``cell.initial_carry(batch_shape)``; None for zeros.
            seq_lengths: integer lengths of shape ``batch`` for padded batches (see the class
                docs), or None when every sequence fills the time axis.
            return_carry: whether to return the final carry too.

        Returns:
            The outputs (see ``return_sequences``), in the cell's computation dtype; with
            ``return_carry``, ``(final_carry, outputs)``, the final carry being the carry after
            the last step processed (after step ``length - 1`` forward, step 0 in reverse).

        Raises:
            InputShapeError: if ``x`` has no time axis or no time step, its features do not
                fit the cell, the carry does not fit the batch, or ``seq_lengths`` is not of
                the batch's shape.
            InputDtypeError: if ``seq_lengths`` is not integer.
        """
        x = jnp.asarray(x)
        layout = "(time, *batch, features)" if self.time_major else "(*batch, time, features)"
        if x.ndim < 2 or x.shape[0 if self.time_major else -2] == 0:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected an input of shape {layout} with at least one "
                f"time step, got shape {x.shape}. Add the time axis (x[..., None, :] for a "
                f"single step), or call the cell itself on one step."
            )
        xs = x if self.time_major else jnp.moveaxis(x, -2, 0)  # time first, for lax.scan
        batch_shape = xs.shape[1:-1]
        cell: Any = self.cell
        carry = cell.initial_carry(batch_shape) if initial_carry is None else initial_carry
        mask = None if seq_lengths is None else self._mask(seq_lengths, batch_shape, len(xs))
        if isinstance(cell, _Cell):
            cell._check_input(xs, "an input", layout)
            cell._check_carry(carry, batch_shape)
            dtype = cell._compute_dtype(xs, carry)
            scan = functools.partial(_scan_cell, cell, dtype, self.reverse, self.unroll)
            carry, ys = scan(cell._weights(), carry, xs, mask)
        else:
            carry, ys = _scan(cell, mask, self.reverse, self.unroll, carry, xs)
        if not self.return_sequences:
            outputs = self._last(ys, seq_lengths)
        else:
            time_axis = 0 if self.time_major else len(batch_shape)
            outputs = jax.tree.map(lambda y: jnp.moveaxis(y, 0, time_axis), ys)
        return (carry, outputs) if return_carry else outputs

    def _mask(self, seq_lengths: Any, batch_shape: tuple[int, ...], steps: int) -> jax.Array:
        """``valid[t, *batch]``: whether step ``t`` is within the sequence's length."""
        lengths = jnp.asarray(seq_lengths)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise errors.InputDtypeError(
                f"{module_label(self)}: expected integer seq_lengths, got dtype "
                f"{lengths.dtype}. Pass the number of valid steps of each sequence, e.g. "
                f"seq_lengths.astype(jnp.int32)."
            )
        if lengths.shape != batch_shape:
            raise errors.InputShapeError(
                f"{module_label(self)}: expected seq_lengths of shape {batch_shape} (one length "
                f"per sequence: the input's batch axes), got shape {lengths.shape}."
            )
        steps_index = lax.broadcasted_iota(lengths.dtype, (steps, *batch_shape), 0)
        return steps_index < lengths.reshape(1, *batch_shape)

    def _last(self, ys: Any, seq_lengths: Any) -> Any:
        """The output of the last step processed, from the time-first outputs."""
        if self.reverse:
            return jax.tree.map(lambda y: y[0], ys)
        if seq_lengths is None:
            return jax.tree.map(lambda y: y[-1], ys)
        lengths = jnp.asarray(seq_lengths)
        steps = jax.tree.leaves(ys)[0].shape[0]
        last = jnp.clip(lengths - 1, 0, steps - 1).reshape(1, *lengths.shape)
        return jax.tree.map(lambda y: jnp.take_along_axis(y, _expand(last, y), axis=0)[0], ys)


_MERGES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: (a + b) / 2,
}


def _scan(
    step: Callable[[Any, Any], tuple[Any, Any]],
    mask: jax.Array | None,
    reverse: bool,
    unroll: int,
    carry: Any,
    inputs: Any,
) -> tuple[Any, Any]:
    """``lax.scan`` of ``step`` over ``inputs`` (time first); with a ``mask`` (time first),
    the carry is kept and the output zero at the steps it marks as padding."""

    def masked_step(carry: Any, scanned: tuple[Any, jax.Array]) -> tuple[Any, Any]:
        inputs, valid = scanned
        return _padded(valid, carry, *step(carry, inputs))

    if mask is None:
        return lax.scan(step, carry, inputs, reverse=reverse, unroll=unroll)
    return lax.scan(masked_step, carry, (inputs, mask), reverse=reverse, unroll=unroll)


def _padded(valid: jax.Array | None, carry: Any, new_carry: Any, y: Any) -> tuple[Any, Any]:
    """A step's ``(new_carry, y)``, with the old carry kept and the output zero where
    ``valid`` (a step's slice of the mask) marks padding; as they are without a mask."""
    if valid is None:
        return new_carry, y
    kept = jax.tree.map(lambda n, o: jnp.where(_expand(valid, n), n, o), new_carry, carry)
    return kept, jax.tree.map(lambda y: jnp.where(_expand(valid, y), y, 0), y)


#: The most rows (the product of the batch axes) a step of :class:`RNN` may have for the
#: kernels' gradients to be taken out of the loop (:func:`_scan_cell_jvp`). Measured on a
#: 2-core x86 CPU, gradient of the weights and the input against the per-gate derivative:
#: 0.41 to 0.92x the time at 1 to 8 rows (GRU and LSTM, hidden 128 and 256, 64 to 512 steps),
#: 0.85 to 1.12x at 16, 1.05 to 1.6x at 32 and 64, where the stacked per-step gradients cost
#: more memory traffic than the deep products save.
HOISTED_MAX_ROWS = 8

#: The fewest ``rows * hidden_size`` of a step, past :data:`HOISTED_MAX_ROWS` rows, at which
#: the LSTM's derivative joins its gates' kernel slices again in each step: one product of each
#: kernel per step instead of one per gate. Measured on a 2-core x86 CPU, gradient of the
#: weights and the input against a product per gate, with JAX 0.10.2: 0.90 to 0.98x the time
#: from 4,096 (16 to 128 rows, hidden 64 to 512), 1.06 to 1.14x below (12 to 32 rows, hidden
#: 64 and 128). With JAX 0.12.1 (a newer XLA) the joined products lost where batches are most
#: common, 1.07 to 1.10x at 32 rows of hidden 128, and were level elsewhere (0.94 to 1.06x):
#: from JAX 0.11 on, the LSTM keeps a product per gate (no size joins).
JOINED_MIN_SIZE = 4096 if jax.__version_info__ < (0, 11) else math.inf


def _scan_cell(
    cell: _Cell,
    dtype: Any,
    reverse: bool,
    unroll: int,
    weights: _Weights,
    carry: Any,
    xs: jax.Array,
    mask: jax.Array | None,
) -> tuple[Any, Any]:
    """One of our cells scanned over ``xs`` (time first).

    Forward, each step projects its own input inside the loop, next to the recurrent product:
    the fastest forward pass on XLA:CPU (LSTM and GRU in 0.45 to 0.6x the time of projecting
    every step's input before the loop; level with Flax). The derivative (a custom JVP)
    depends on the rows of a step:

    - up to :data:`HOISTED_MAX_ROWS`, :func:`_scan_cell_jvp`, which takes the products with
      the kernels' tangents out of the loop;
    - more, the derivative of the same loop with each kernel split by gate before the loop,
      so that its gradient builds up per gate in the backward loop (XLA:CPU adds a whole
      kernel's gradient slowly, split over its threads). Each gate is multiplied apart, and
      the backward steps then need no concatenation of the gates' gradients (against every
      step's input projected before the loop: 0.83 to 0.85x the time for the LSTM, 0.95 to
      0.99x for the GRU). From :data:`JOINED_MIN_SIZE` on (with JAX 0.10), the LSTM joins its
      gates' slices again in the step, as Flax's ``OptimizedLSTMCell`` computes: one product
      of each kernel per step, its gradient still built up per gate.

    In both loops each step multiplies the hidden state before the input (:meth:`_Cell._step`):
    the GRU's derivative then takes 0.87 to 1.0x the time (1.03x at hidden 256), and the
    joined LSTM's 0.86x, against the input first.

    The arrays are explicit arguments (the mask too), since a custom derivative cannot close
    over traced values."""

    def loop(by_gate: bool, joined: bool = False) -> Callable[..., Any]:
        def scan(weights: _Weights, carry: Any, xs: jax.Array, mask: Any) -> Any:
            parts = cell._parts(weights, dtype, by_gate, joined)
            step = functools.partial(cell._step, dtype=dtype, parts=parts)
            return _scan(step, mask, reverse, unroll, carry, xs)

        return scan

    rows = math.prod(xs.shape[1:-1])
    if rows > HOISTED_MAX_ROWS:
        joined = cell._joins_gates and rows * cell.hidden_size >= JOINED_MIN_SIZE
        scan = differentiated_as(loop(by_gate=False), loop(by_gate=True, joined=joined))
    else:
        scan = jax.custom_jvp(loop(by_gate=False))
        rule = functools.partial(_scan_cell_jvp, cell, dtype, reverse, unroll)
        scan.defjvp(rule, symbolic_zeros=True)
    return scan(weights, carry, xs, mask)


def _scan_cell_jvp(
    cell: _Cell,
    dtype: Any,
    reverse: bool,
    unroll: int,
    primals: tuple[_Weights, Any, jax.Array, Any],
    tangents: tuple[Any, Any, Any, Any],
) -> tuple[Any, Any]:
    """The JVP of :func:`_scan_cell`, written so that its transpose (the backward pass) has
    every product with a kernel's gradient outside the loop, as cuDNN's RNNs do.

    The primal loop projects all steps' inputs in one product before it, and keeps at each
    step its hidden state and the step's linear map given both projections
    (:meth:`_Cell._linearized`: elementwise work, its coefficients stacked by the scan). The
    kernels' tangents then meet all steps at once: ``xs @ dW_input`` and ``hs @
    dW_recurrent`` are one product each, before the tangent loop, whose steps hold a single
    product (the state's tangent through the recurrent kernel). Transposed, the backward
    loop carries the state's gradient with that one product per step, and each kernel's
    gradient is one product over all steps after it: ``(time * batch)`` deep instead of
    ``batch`` deep at every step. An argument whose tangent is a symbolic zero (data, frozen
    weights, the default carry) adds no product.
    """
    weights, carry, xs, mask = primals
    d_weights, d_carry, d_xs, _ = tangents
    parts = cell._parts(weights, dtype, by_gate=False)
    (input,), (recurrent,) = parts.input, parts.recurrent
    xs = cast(xs, dtype)

    def step(carry: Any, scanned: tuple[jax.Array, Any]) -> tuple[Any, Any]:
        xp, valid = scanned
        hidden = cast(cell._hidden(carry), dtype)
        hp = recurrent.project(hidden)
        (new_carry, y), linear = cell._linearized(carry, xp, hp, dtype)
        new_carry = jax.tree.map(lambda n, o: cast(n, o.dtype), new_carry, carry)
        new_carry, y = _padded(valid, carry, new_carry, y)
        return new_carry, (y, hidden, linear)

    scanned = (input.project(xs), mask)
    carry_out, (ys, hiddens, linears) = lax.scan(
        step, carry, scanned, reverse=reverse, unroll=unroll
    )

    d_input_kernel, d_input_bias, d_recurrent_kernel, d_recurrent_bias = _cast_tangents(
        d_weights, dtype
    )
    d_xp = _sum_of(
        [
            None if _is_zero(d_xs) else cast(d_xs, dtype) @ input.kernel,
            None if d_input_kernel is None else xs @ d_input_kernel,
        ],
        d_input_bias,
        like=scanned[0],
    )
    d_hp = _sum_of(
        [None if d_recurrent_kernel is None else hiddens @ d_recurrent_kernel],
        d_recurrent_bias,
        like=scanned[0],
    )

    def tangent_step(d_carry: Any, scanned: tuple[Any, ...]) -> tuple[Any, Any]:
        linear, valid, d_xp, d_hp = scanned
        d_hidden = cast(cell._hidden(d_carry), dtype)
        d_new, d_y = linear(d_xp, d_hp + d_hidden @ recurrent.kernel, d_carry)
        d_new = jax.tree.map(lambda n, o: cast(n, o.dtype), d_new, d_carry)
        return _padded(valid, d_carry, d_new, d_y)

    d_carry = jax.tree.map(
        lambda t, p: jnp.zeros_like(p) if _is_zero(t) else t, d_carry, carry, is_leaf=_is_zero
    )
    d_carry_out, d_ys = lax.scan(
        tangent_step, d_carry, (linears, mask, d_xp, d_hp), reverse=reverse, unroll=unroll
    )
    return (carry_out, ys), (d_carry_out, d_ys)


def _is_zero(tangent: Any) -> bool:
    """Whether ``tangent`` is a symbolic zero (an argument not differentiated) or None (the
    tangent of an absent bias)."""
    return tangent is None or is_symbolic_zero(tangent)


def _cast_tangents(d_weights: Any, dtype: Any) -> list[jax.Array | None]:
    """The weights' tangents in :class:`_Weights`' order, cast as the weights are; None where
    a tangent is a symbolic zero (or the weight absent)."""
    return [None if _is_zero(t) else cast(t, dtype) for t in d_weights]


def _sum_of(products: list[jax.Array | None], bias: jax.Array | None, like: jax.Array) -> jax.Array:
    """A projection's tangent, of ``like``'s shape and dtype: the sum of the products that
    are not None, plus the bias's tangent if it is not None; zeros if all are None."""
    present = [p for p in products if p is not None]
    if not present:
        return jnp.zeros_like(like) if bias is None else jnp.broadcast_to(bias, like.shape)
    total = functools.reduce(jnp.add, present)
    return total if bias is None else add_bias(total, bias)


class Bidirectional(Module):
    """Two RNNs over the same sequence, one forward and one backward, outputs merged.

    As a bidirectional PyTorch RNN with ``merge="concat"``: the output's features are the
    forward RNN's, then the backward one's. The backward RNN is built with ``reverse=True``,
    so its output at step ``t`` is aligned with the input at step ``t``. With
    ``return_sequences=False`` the merged outputs are the forward RNN's last step and the
    backward RNN's first (the last each processed, as PyTorch's ``h_n``).

    Variables: the forward RNN's under ``forward/`` and the backward one's under
    ``backward/`` (``forward/cell/input_kernel``, ...). For PyTorch, a
    ``torch.nn.LSTM(..., bidirectional=True, batch_first=True)`` (or RNN, GRU) with one layer:
    the forward RNN's entries (``weight_ih_l0``, ...) and the backward RNN's with the suffix
    ``_reverse`` (``weight_ih_l0_reverse``, ...). So a model attribute
    ``self.lstm = Bidirectional(RNN(LSTMCell(i, h)), RNN(LSTMCell(i, h), reverse=True))``
    loads the entries of a PyTorch attribute ``self.lstm = nn.LSTM(i, h, bidirectional=True,
    batch_first=True)``.

    Args:
        forward: the RNN run forward (``reverse=False``).
        backward: the RNN run backward (``reverse=True``), of the same ``return_sequences``
            and ``time_major`` as ``forward``.
        merge: how the two outputs are combined: ``"concat"`` along the features (the output
            has both RNNs' features), ``"sum"`` or ``"mean"`` (both must have the same size).

    Raises:
        LayerConfigError: if ``forward`` or ``backward`` is not an RNN of the direction above,
            they differ in ``return_sequences`` or ``time_major``, or ``merge`` is unknown.

    Attributes:
        forward: the forward :class:`RNN`, at the path ``forward``.
        backward: the backward :class:`RNN`, at the path ``backward``.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> layer = mx.Bidirectional(
        ...     mx.RNN(mx.GRUCell(3, 4)), mx.RNN(mx.GRUCell(3, 4), reverse=True)
        ... )
        >>> init_fn, apply_fn = mx.transform(layer)
        >>> variables = init_fn(jax.random.key(0))
        >>> sorted(variables["params"])
        ['backward', 'forward']
        >>> y, _ = apply_fn(variables, None, jnp.ones((2, 5, 3)))
        >>> y.shape
        (2, 5, 8)
    """

    def __init__(self, forward: RNN, backward: RNN, merge: str = "concat"):
        super().__init__()
        for name, rnn, reverse in (("forward", forward, False), ("backward", backward, True)):
            if not isinstance(rnn, RNN) or rnn.reverse != reverse:
                raise errors.LayerConfigError(
                    f"Bidirectional: `{name}` must be an RNN with reverse={reverse}, got "
                    f"{_describe_rnn(rnn)}. Build it as RNN(cell, reverse={reverse}), e.g. "
                    f"Bidirectional(RNN(LSTMCell(i, h)), RNN(LSTMCell(i, h), reverse=True))."
                )
        for option in ("return_sequences", "time_major"):
            if getattr(forward, option) != getattr(backward, option):
                raise errors.LayerConfigError(
                    f"Bidirectional: `forward` has {option}={getattr(forward, option)} but "
                    f"`backward` has {option}={getattr(backward, option)}. Build both with "
                    f"the same {option}."
                )
        if not isinstance(merge, str) or merge not in _MERGES:
            raise errors.LayerConfigError(
                f"Bidirectional: `merge` must be one of {sorted(_MERGES)}, got {merge!r}. "
                f'Use merge="concat" for the layout of a bidirectional PyTorch RNN.'
            )
        self.forward = forward
        self.backward = backward
        self.merge = merge

    def extra_repr(self) -> str:
        return f"merge={self.merge!r}"

    def torch_conversions(self) -> list[TorchConversion]:
        """A bidirectional ``torch.nn.RNN``/``LSTM``/``GRU`` layer: the forward RNN's entries
        as they are, the backward RNN's with the suffix ``_reverse``."""
        return [
            *_suffixed(torch_conversions(self.forward), "", "forward/"),
            *_suffixed(torch_conversions(self.backward), "_reverse", "backward/"),
        ]

    def __call__(
        self,
        x: jax.Array,
        initial_carry: tuple[Any, Any] | None = None,
        seq_lengths: jax.Array | None = None,
        return_carry: bool = False,
    ) -> Any:
        """Runs both RNNs over the sequence and merges their outputs.

        Args:
            x: the input, as for :class:`RNN`.
            initial_carry: ``(forward_carry, backward_carry)``, or None for zeros.
            seq_lengths: integer lengths of shape ``batch`` for padded batches, or None.
            return_carry: whether to return the final carries too.

        Returns:
            The merged outputs; with ``return_carry``, ``((forward_carry, backward_carry),
            outputs)``.

        Raises:
            InputShapeError: if ``initial_carry`` is not a pair, and as :class:`RNN`.
        """
        if initial_carry is None:
            initial_carry = (None, None)
        elif not (isinstance(initial_carry, (tuple, list)) and len(initial_carry) == 2):
            raise errors.InputShapeError(
                f"{module_label(self)}: expected initial_carry as a pair (forward_carry, "
                f"backward_carry), got {jax.tree.map(np.shape, initial_carry)!r}. Pass one "
                f"carry per direction, e.g. (cell.initial_carry(batch), "
                f"cell.initial_carry(batch))."
            )
        forward_carry, forward_out = self.forward(x, initial_carry[0], seq_lengths, True)
        backward_carry, backward_out = self.backward(x, initial_carry[1], seq_lengths, True)
        outputs = _MERGES[self.merge](forward_out, backward_out)
        return ((forward_carry, backward_carry), outputs) if return_carry else outputs


def _describe_rnn(layer: Any) -> str:
    if isinstance(layer, RNN):
        return f"an RNN with reverse={layer.reverse}"
    return f"a {type(layer).__name__}"


@fill_docstring(training_attribute=TRAINING_DOC)
class StackedRNN(Module):
    """Recurrent layers applied one after the other, as PyTorch's ``num_layers``.

    Each layer (an :class:`RNN` or a :class:`Bidirectional`) reads the output sequence of the
    one before; in training, ``dropout_rate`` drops elements of each layer's output except the
    last's, as PyTorch's ``dropout`` argument does. The layers are kept in the list attribute
    ``layers``, so their variables live under ``layers/<index>/`` (``layers/1/cell/...``,
    ``layers/1/forward/cell/...``).

    For PyTorch, ``torch.nn.RNN``/``LSTM``/``GRU(num_layers=n, batch_first=True)``: layer
    ``k``'s entries are named with ``_l{k}`` (``weight_ih_l1``, ``weight_ih_l1_reverse``).
    E.g. ``nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)`` is
    ``StackedRNN(Bidirectional(RNN(LSTMCell(8, 16)), RNN(LSTMCell(8, 16), reverse=True)),
    Bidirectional(RNN(LSTMCell(32, 16)), RNN(LSTMCell(32, 16), reverse=True)))``: the second
    layer reads both directions' 16 features.

    Args:
        *layers: the layers, first to last; every layer but the last returns sequences.
        dropout_rate: the probability of dropping an element of a layer's output before the
            next layer, in training.

    Raises:
        LayerConfigError: if there is no layer, a layer is not an RNN or a Bidirectional, a
            layer but the last has ``return_sequences=False``, or ``dropout_rate`` is not in
            ``[0, 1]``.

    Attributes:
        layers: the list of recurrent layers, first to last.
        {training_attribute}

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> stack = mx.StackedRNN(
        ...     mx.RNN(mx.LSTMCell(3, 4)), mx.RNN(mx.LSTMCell(4, 4)), dropout_rate=0.1
        ... )
        >>> init_fn, apply_fn = mx.transform(stack)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["layers"]["1"]["cell"]["input_kernel"].shape
        (4, 16)
        >>> (carries, y), _ = apply_fn(variables, jax.random.key(1), jnp.ones((2, 5, 3)),
        ...                            return_carry=True, is_training=True)
        >>> len(carries), y.shape
        (2, (2, 5, 4))
    """

    training: bool | None = None

    def __init__(self, *layers: RNN | Bidirectional, dropout_rate: float = 0.0):
        super().__init__()
        if not layers:
            raise errors.LayerConfigError(
                "StackedRNN: expected at least one layer, got none. Pass the layers as "
                "separate arguments: StackedRNN(RNN(...), RNN(...))."
            )
        for i, layer in enumerate(layers):
            if not isinstance(layer, (RNN, Bidirectional)):
                raise errors.LayerConfigError(
                    f"StackedRNN: layer {i} is a {type(layer).__name__}; each layer must be an "
                    f"RNN or a Bidirectional. Pass the layers as separate arguments."
                )
            sequences = layer.forward if isinstance(layer, Bidirectional) else layer
            if i < len(layers) - 1 and not sequences.return_sequences:
                raise errors.LayerConfigError(
                    f"StackedRNN: layer {i} has return_sequences=False, so the next layer "
                    f"would get no sequence. Only the last layer may return its last step."
                )
        self.layers = list(layers)
        self.dropout_rate = check_rate("StackedRNN", "dropout_rate", dropout_rate)

    def extra_repr(self) -> str:
        return mode_repr(self, f"dropout_rate={self.dropout_rate}")

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.RNN``/``LSTM``/``GRU`` with ``num_layers``: layer ``k``'s entries with
        ``_l0`` renamed ``_l{k}``."""
        return [
            dataclasses.replace(
                c,
                torch_keys=tuple(_layer_key(k, i) for k in c.torch_keys),
                variables=tuple(f"layers/{i}/{v}" for v in c.variables),
            )
            for i, layer in enumerate(self.layers)
            for c in torch_conversions(layer)
        ]

    def __call__(
        self,
        x: jax.Array,
        initial_carry: Sequence[Any] | None = None,
        seq_lengths: jax.Array | None = None,
        return_carry: bool = False,
        is_training: bool = False,
    ) -> Any:
        """Runs the layers in order.

        Args:
            x: the input, as for :class:`RNN`.
            initial_carry: one initial carry per layer (each None for zeros), or None.
            seq_lengths: integer lengths of shape ``batch`` for padded batches, or None.
            return_carry: whether to return the final carries too.
            is_training: whether to apply dropout between layers (it draws from the
                ``"dropout"`` stream when ``dropout_rate > 0``). A ``training`` switch that
                is set decides instead.

        Returns:
            The last layer's outputs; with ``return_carry``, ``(carries, outputs)``, a tuple
            of each layer's final carry.

        Raises:
            InputShapeError: if ``initial_carry`` does not have one entry per layer, and as
                :class:`RNN`.
        """
        if initial_carry is None:
            initial_carry = (None,) * len(self.layers)
        elif not (
            isinstance(initial_carry, (tuple, list)) and len(initial_carry) == len(self.layers)
        ):
            raise errors.InputShapeError(
                f"{module_label(self)}: expected initial_carry as a sequence of "
                f"{len(self.layers)} carries (one per layer, None for zeros), got "
                f"{jax.tree.map(np.shape, initial_carry)!r}."
            )
        training = layer_training(self, is_training)
        carries = []
        for i, (layer, carry) in enumerate(zip(self.layers, initial_carry, strict=True)):
            if i:
                x = dropout(x, self.dropout_rate, is_training=training)
            carry, x = layer(x, carry, seq_lengths, return_carry=True)
            carries.append(carry)
        return (tuple(carries), x) if return_carry else x


def _layer_key(key: str, layer: int) -> str:
    """``weight_ih_l0_reverse`` -> ``weight_ih_l{layer}_reverse``: the last ``_l0``."""
    head, found, tail = key.rpartition("_l0")
    return f"{head}_l{layer}{tail}" if found else key


def _expand(a: jax.Array, like: jax.Array) -> jax.Array:
    """``a`` with trailing axes of size 1 up to the rank of ``like``, to broadcast over it."""
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))
