"""Variables: descriptions of the arrays a model will own, not the arrays themselves.

In the definition world a variable is an initializer, a shape, a dtype, a collection and free
metadata (tags, sharding axes); ``init_fn`` turns it into an array. Setting ``.value`` fixes
its starting value instead (a pretrained kernel, a zero start).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

import jax
import jax.numpy as jnp
import numpy as np

from metoryx import errors, initializers
from metoryx._core.paths import part_problem
from metoryx._core.typed import jnp_array, jnp_asarray, np_iscomplexobj, np_shape
from metoryx.initializers import Initializer


def _shape_str(shape: Sequence[int], dtype: Any) -> str:
    return f"{jnp.dtype(dtype).name}[{', '.join(map(str, shape))}]"


def numeric_dtype(dtype: Any) -> np.dtype[Any] | None:
    """``dtype`` as a NumPy dtype if it is one a JAX array can hold (bool, integer, floating,
    complex, including bfloat16 and the float8 types), else None (object, str, bytes,
    datetime, structured dtypes, NumPy's extended precision, and anything that is no dtype,
    arrays included)."""
    if isinstance(dtype, (np.ndarray, jax.Array)):  # NumPy would take an array's dtype
        return None
    try:
        found = jnp.dtype(dtype)
    except Exception:  # TypeError mostly; NumPy parses "a,b" strings, so SyntaxError too
        return None
    if found.kind in "fc" and found.itemsize > (8 if found.kind == "f" else 16):
        return None  # float128, complex256: JAX has no such arrays
    return found if found == np.bool_ or jnp.issubdtype(found, jnp.number) else None


def _dtype_kind(dtype: Any) -> str:
    if isinstance(dtype, (np.ndarray, jax.Array)):
        return "an array as its dtype"
    try:
        return f"{np.dtype(dtype).name} values"
    except Exception:
        return "values of an unknown type"


def _argument_label(kind: str, name: str, value: Any, fits: Callable[[str], bool]) -> str:
    """How an error names a bad argument of a variable: by the layer argument it came from.

    Layers pass their ``*_init`` and ``param_dtype`` arguments on to the variables they build,
    so the argument the user got wrong is one of a module ``__init__`` on the call stack whose
    value *is* the bad one (the outermost such, as the user wrote it). ``fits`` filters the
    argument names (``*_init``, ``*dtype*``) so that an int equal by identity to a size is not
    taken for it. Error path only: it walks the call stack. Every ``__init__`` but a variable's
    own counts: module.py builds on this file, so this one cannot import Module to ask for it.
    """
    found: list[str] = []
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        owner = frame.f_locals.get("self") if code.co_name == "__init__" else None
        if owner is not None and not isinstance(owner, Variable):
            arguments = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]
            for argument in arguments:
                if fits(argument) and frame.f_locals.get(argument) is value:
                    found.append(f"{type(owner).__name__}: `{argument}`")
                    break
        frame = frame.f_back
    if not found:
        return f"{kind}: `{name}`"
    inner = f" (passed on to {found[0]})" if len(found) > 1 else ""
    return f"{found[-1]}{inner}"


# What type checkers see: a variable *is* a jax.Array, because that is what module code reads
# (`x @ self.kernel` runs inside apply_fn, where the attribute holds an array). At run time a
# variable is a plain description; in the definition world its array operators raise an error
# that says to transform the model first (see `_definition_world_operator` below).
if TYPE_CHECKING:
    _ArrayInModuleCode = jax.Array
else:
    _ArrayInModuleCode = object


class Variable(_ArrayInModuleCode):
    """A named array of a module: an initializer, a shape, a dtype and a collection.

    Use the two kinds, :class:`Parameter` (trainable, collection ``"params"``) and
    :class:`State` (any other collection, e.g. running statistics). Inside ``apply_fn`` a
    variable attribute reads as a plain ``jax.Array``.

    For type checkers a variable is a ``jax.Array`` (a subclass of it, seen only by the
    checker), so module code such as ``x @ self.kernel`` type-checks with no annotation, and
    ``layer.kernel.value = ...`` in the definition world type-checks too. The price: a checker
    also accepts array arithmetic on a variable in the definition world, where it fails at run
    time with :class:`~metoryx.errors.ApplyContextError` (transform the model first).

    Args:
        collection: the top-level key of ``variables`` this variable lives under.
        init: an initializer ``init(key, shape, dtype) -> jax.Array``.
        shape: the array's shape.
        dtype: the storage dtype of the array.
        mutable: whether module code may assign a new value inside ``apply_fn``.
        tags: names that filters select by (``mx.filters.tag("backbone")``); a str or a
            sequence of str. Settable later: ``layer.kernel.tags = ("backbone",)``.
        axes: a logical axis name (str) or None per dimension of the array, e.g.
            ``("embed", "mlp")``: what sharding rules map to devices. Settable later.
        **metadata: free annotations kept on the description.

    Example:
        >>> import metoryx as mx
        >>> v = mx.Variable("params", mx.initializers.zeros, (2, 3), tags="backbone")
        >>> v
        Variable('params', float32[2, 3])
        >>> v.tags
        ('backbone',)
    """

    def __init__(
        self,
        collection: str,
        init: Initializer,
        shape: Sequence[int],
        dtype: Any = jnp.float32,
        mutable: bool = False,
        *,
        tags: str | Sequence[str] = (),
        axes: Sequence[str | None] | None = None,
        **metadata: Any,
    ):
        kind = type(self).__name__
        if not isinstance(collection, str) or part_problem(collection):
            raise errors.VariableDefinitionError(
                f"{kind}: the collection must be a non-empty string without '/' or '.' such "
                f"as 'batch_stats', got {collection!r}. Name it as a top-level key of "
                f"`variables`."
            )
        try:
            resolved = initializers.get(init)
        except errors.VariableDefinitionError as e:
            where = _argument_label(kind, "init", init, lambda name: name.endswith("init"))
            raise errors.VariableDefinitionError(f"{where}: {e}") from None
        try:
            shape = tuple(operator.index(d) for d in shape)
        except TypeError:
            raise errors.VariableDefinitionError(
                f"{kind}: `shape` must be a sequence of ints, got {shape!r}."
            ) from None
        if any(d < 0 for d in shape):
            raise errors.VariableDefinitionError(
                f"{kind}: `shape` must not contain negative sizes, got {shape}."
            )
        if any(d >= 2**63 for d in shape):
            raise errors.VariableDefinitionError(
                f"{kind}: `shape` has a size past 2**63 - 1, which no array can have, got "
                f"{shape}. Check the sizes the variable was built from."
            )
        if not isinstance(mutable, (bool, np.bool_)):
            raise errors.VariableDefinitionError(
                f"{kind}: `mutable` must be a bool (True: module code may assign it inside "
                f"apply_fn), got {type(mutable).__name__} {mutable!r:.40}."
            )
        numeric = numeric_dtype(dtype)
        if numeric is None:
            where = _argument_label(kind, "dtype", dtype, lambda name: "dtype" in name)
            raise errors.VariableDefinitionError(
                f"{where}: expected a numeric or bool dtype such as jnp.float32, jnp.bfloat16 "
                f"or jnp.int32, got {dtype!r}: a variable holds a JAX array, which cannot hold "
                f"{_dtype_kind(dtype)}. Pass one of those dtypes."
            )
        dtype = numeric
        self.collection = collection
        self.init = resolved
        self._shape: tuple[int, ...] = shape
        self._dtype: np.dtype[Any] = dtype
        self.mutable = bool(mutable)
        self.metadata = metadata
        self._value: jax.Array | None = None
        self._tags: tuple[str, ...] = ()
        self._axes: tuple[str | None, ...] | None = None
        self.tags = tags
        self.axes = axes

    @property
    def tags(self) -> tuple[str, ...]:
        """The variable's tags, sorted, each once: what ``mx.filters.tag`` selects.

        Set a str or a sequence of str (``()`` clears them); ``mx.tag(module, name)`` adds a
        tag to every variable of a module.
        """
        return self._tags

    @tags.setter
    def tags(self, tags: str | Sequence[str]) -> None:
        self._tags = tags_argument(f"{self!r}", tags)

    @property
    def axes(self) -> tuple[str | None, ...] | None:
        """A logical axis name or None per dimension, or None when not named.

        Sharding rules map these names to the device mesh. Set a sequence as long as the
        shape is (one copy's shape, for a variable inside ``mx.Repeat``), or None.
        """
        return self._axes

    @axes.setter
    def axes(self, axes: Sequence[str | None] | None) -> None:
        if axes is None:
            self._axes = None
            return
        given = tuple(axes) if isinstance(axes, (list, tuple)) else None
        if given is None or any(not (a is None or (isinstance(a, str) and a)) for a in given):
            raise errors.VariableDefinitionError(
                f"{self!r}: `axes` must be None or a tuple with a logical axis name (a "
                f"non-empty str) or None per dimension, such as ('embed', 'mlp'); got "
                f"{axes!r:.60}."
            )
        if len(given) != len(self.shape):
            raise errors.VariableDefinitionError(
                f"{self!r}: `axes` names {len(given)} dimensions, {given}, and the variable "
                f"has {len(self.shape)} (shape {self.shape}). Give one name (or None) per "
                f"dimension."
            )
        self._axes = given

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """The storage dtype of the array."""
        return self._dtype

    @property
    def value(self) -> jax.Array:
        """The fixed starting value; raises :class:`~metoryx.errors.UnsetValueError` if none.

        Setting it checks the shape and casts to the variable's dtype; ``None`` clears it.
        """
        if self._value is None:
            raise errors.UnsetValueError(
                f"{self!r} has no fixed value: `init_fn(key)` from mx.transform(model) creates "
                f"its array with the initializer. Set `.value = array` to fix a starting value, "
                f"or read the array from the `variables` dict that init_fn returns."
            )
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        if value is None:
            self._value = None
            return
        if not isinstance(value, jax.Array):
            value = self._as_numeric_array(value)
        elif jnp.iscomplexobj(value) and not jnp.issubdtype(self.dtype, jnp.complexfloating):
            raise self._complex_value_error(value.dtype)
        shape = tuple(np_shape(value))
        if shape != self.shape:
            raise errors.VariableShapeError(
                f"{self!r}: expected a value of shape {self.shape}, got shape {shape}. "
                f"Give an array of shape {self.shape}, or replace the layer with one of the "
                f"shape you need."
            )
        if isinstance(value, jax.Array):
            self._value = jnp_asarray(value, dtype=self.dtype)  # immutable: safe to share
        else:
            # A copy: on CPU jnp.asarray aliases a 64-byte aligned NumPy buffer, and a later
            # in-place edit of the caller's array must not change the fixed value.
            self._value = jnp_array(value, dtype=self.dtype)

    def _as_numeric_array(self, value: Any) -> np.ndarray:
        """``value`` as a NumPy array of numbers or bools, else a VariableDtypeError."""
        try:
            array = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as e:  # a ragged list, a non-array
            raise errors.VariableDtypeError(
                f"{self!r}: `.value` must be an array of shape {self.shape}, got "
                f"{type(value).__name__} {value!r:.60}, which does not make an array ({e}). "
                f"Give a jax.Array or NumPy array, or nested lists of equal lengths."
            ) from None
        if numeric_dtype(array.dtype) is None:
            raise errors.VariableDtypeError(
                f"{self!r}: `.value` must hold numbers, got {type(value).__name__} "
                f"{value!r:.60} (an array of {_dtype_kind(array.dtype)}). Give an array of "
                f"numbers of shape {self.shape}."
            )
        if np_iscomplexobj(array) and not jnp.issubdtype(self.dtype, jnp.complexfloating):
            raise self._complex_value_error(array.dtype)
        return array

    def _complex_value_error(self, dtype: Any) -> errors.VariableDtypeError:
        return errors.VariableDtypeError(
            f"{self!r}: `.value` is complex ({np.dtype(dtype).name}) and the variable is "
            f"{self.dtype.name}, so the cast would drop the imaginary part. Pass the real part "
            f"(jnp.real(value)), or declare the variable with a complex dtype."
        )

    @property
    def has_value(self) -> bool:
        """Whether a starting value is fixed (``.value`` can be read)."""
        return self._value is not None

    def _describe(self) -> str:
        return _shape_str(self.shape, self.dtype)

    def __repr__(self) -> str:
        extras = "" if self._value is None else ", value fixed"
        return f"{type(self).__name__}({self.collection!r}, {self._describe()}{extras})"


def tags_argument(where: str, tags: Any) -> tuple[str, ...]:
    """``tags`` (a str or a sequence of str) as a sorted tuple of unique tags, else an error
    naming ``where``."""
    found = (tags,) if isinstance(tags, str) else tags
    if not isinstance(found, (list, tuple, set, frozenset)) or any(
        not isinstance(t, str) or not t for t in cast("Sequence[Any]", found)
    ):
        raise errors.VariableDefinitionError(
            f"{where}: tags must be a non-empty str or a sequence of them, such as 'backbone' "
            f"or ('backbone', 'frozen'); got {tags!r:.60}."
        )
    return tuple(sorted(set(cast("Sequence[str]", found))))


def _definition_world_operator(name: str) -> Callable[..., NoReturn]:
    def operator(self: Variable, *args: Any) -> NoReturn:
        raise errors.ApplyContextError(
            f"{self!r} was used as an array ({name}) in the definition world, e.g. by calling "
            f"model(x) before mx.transform. Here a variable is a description, not an array; "
            f"transform the model and call it through apply_fn: `init_fn, apply_fn = "
            f"mx.transform(model)`, then `y, _ = apply_fn(init_fn(key), rngs, x)`."
        )

    operator.__name__ = name
    return operator


# Python's operators reach a variable's reflected methods (`x @ kernel` calls
# `kernel.__rmatmul__`), so these are where a definition-world call of a module lands.
for _name in (
    *(f"__{op}__" for op in ("neg", "pos", "abs", "invert", "getitem")),
    *(
        f"__{side}{op}__"
        for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow")
        for side in ("", "r")
    ),
):
    setattr(Variable, _name, _definition_world_operator(_name))


class Parameter(Variable):
    """A trainable array, stored under ``variables["params"]``.

    Inside ``apply_fn`` it reads as a plain ``jax.Array`` and is read-only; it changes only
    through the ``variables`` the caller passes in (e.g. after an optimizer step).

    Args:
        init: an initializer ``init(key, shape, dtype) -> jax.Array``.
        shape: the array's shape.
        dtype: the storage dtype (``param_dtype`` in layers); the computation dtype is the
            layer's business.
        tags: names that filters select by (a str or a sequence of str).
        axes: a logical axis name or None per dimension (what sharding rules map).
        **metadata: free annotations.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> w = mx.Parameter(mx.initializers.lecun_normal(), (3, 4))
        >>> w
        Parameter(float32[3, 4])
        >>> w.value = jnp.ones((3, 4))      # fix a starting value
        >>> w.value.dtype
        dtype('float32')
    """

    def __init__(
        self,
        init: Initializer,
        shape: Sequence[int],
        dtype: Any = jnp.float32,
        *,
        tags: str | Sequence[str] = (),
        axes: Sequence[str | None] | None = None,
        **metadata: Any,
    ):
        super().__init__(
            "params", init, shape, dtype, mutable=False, tags=tags, axes=axes, **metadata
        )

    def __repr__(self) -> str:
        extras = "" if self._value is None else ", value fixed"
        return f"Parameter({self._describe()}{extras})"


class State(Variable):
    """A non-trainable array in a named collection, e.g. BatchNorm's running statistics.

    Inside ``apply_fn`` it reads as a plain ``jax.Array``; if ``mutable``, module code updates
    it by assigning the attribute (``self.mean = new_mean``), and the new value appears in the
    ``new_variables`` that ``apply_fn`` returns.

    Args:
        collection: the top-level key of ``variables``, e.g. ``"batch_stats"``.
        init: an initializer ``init(key, shape, dtype) -> jax.Array``.
        shape: the array's shape.
        dtype: the storage dtype of the array.
        mutable: whether module code may assign it inside ``apply_fn``.
        tags: names that filters select by (a str or a sequence of str).
        axes: a logical axis name or None per dimension (what sharding rules map).
        **metadata: free annotations.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Counter(mx.Module):
        ...     def __init__(self):
        ...         self.count = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        ...     def __call__(self):
        ...         self.count = self.count + 1
        ...         return self.count
        >>> init_fn, apply_fn = mx.transform(Counter())
        >>> out, new_vars = apply_fn(init_fn(jax.random.key(0)), None)
        >>> int(new_vars["counters"]["count"])
        1
    """

    def __init__(
        self,
        collection: str,
        init: Initializer,
        shape: Sequence[int],
        dtype: Any = jnp.float32,
        mutable: bool = True,
        *,
        tags: str | Sequence[str] = (),
        axes: Sequence[str | None] | None = None,
        **metadata: Any,
    ):
        super().__init__(
            collection, init, shape, dtype, mutable=mutable, tags=tags, axes=axes, **metadata
        )

    def __repr__(self) -> str:
        extras = "" if self.mutable else ", read-only"
        extras += "" if self._value is None else ", value fixed"
        return f"State({self.collection!r}, {self._describe()}{extras})"


def fix_stacked_value(var: Variable, value: Any) -> None:
    """Fixes every copy of a stacked variable at once: ``value`` has the whole stack's shape
    (a lifted wrapper's copies first), which the ``.value`` setter, checking one copy's shape,
    refuses. Used by ``mx.assign_variables``."""
    var._value = jnp_array(value, dtype=var.dtype)
