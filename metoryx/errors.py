"""Every exception and warning metoryx raises.

Each class subclasses :class:`MetoryxError` and the builtin that matches the mistake, so both
``except mx.errors.MetoryxError`` and ``except ValueError`` catch it. Messages say four things:
where (the module or variable path), what was expected, what was given, and what to do.

Example:
    >>> import jax.numpy as jnp, metoryx as mx
    >>> p = mx.Parameter(mx.initializers.zeros, (2, 3))
    >>> try:
    ...     p.value = jnp.ones(2)
    ... except mx.errors.VariableShapeError as e:
    ...     print(type(e).__mro__[2].__name__)
    ValueError
"""

from __future__ import annotations

__all__ = [
    "ApplyContextError",
    "CheckpointError",
    "FilterError",
    "ImmutableModuleError",
    "InputDtypeError",
    "InputShapeError",
    "LayerConfigError",
    "MethodError",
    "MetoryxError",
    "MissingRngError",
    "ModuleAttributeError",
    "ModuleStructureError",
    "NoMatchError",
    "PartialAssignmentWarning",
    "ReplacementError",
    "RngsTypeError",
    "StaticArgumentError",
    "TransformBoundaryError",
    "UnsetValueError",
    "VariableDefinitionError",
    "VariableDtypeError",
    "VariableShapeError",
    "VariablesStructureError",
]


class MetoryxError(Exception):
    """Base class of every error metoryx raises on purpose.

    Example:
        >>> import metoryx as mx
        >>> issubclass(mx.errors.VariableShapeError, mx.errors.MetoryxError)
        True
    """


class ModuleStructureError(MetoryxError, TypeError):
    """The model's attribute tree cannot be turned into variable paths.

    Raised by :func:`metoryx.transform` for a cycle of modules, two container keys that give the
    same path (``{1: a, "1": b}``), a path part that is empty or holds a separator (``"/"``, or
    ``"."`` which joins PyTorch names: ``{"a/b": x}`` beside ``{"a": {"b": y}}`` would name two
    variables alike), or a variable or module hidden where metoryx does not look (a set, or an
    object that is not a :class:`metoryx.Module`).

    Example:
        >>> import metoryx as mx
        >>> class M(mx.Module):
        ...     def __init__(self):
        ...         self.layers = {mx.Dense(2, 2)}
        >>> try:
        ...     mx.transform(M())
        ... except mx.errors.ModuleStructureError as e:
        ...     print("set" in str(e))
        True
    """


class VariableDefinitionError(MetoryxError, TypeError):
    """A :class:`metoryx.Parameter` or :class:`metoryx.State` was described with bad arguments.

    Example:
        >>> import metoryx as mx
        >>> try:
        ...     mx.Parameter("zeroes", (2,))
        ... except mx.errors.VariableDefinitionError as e:
        ...     print("Did you mean 'zeros'?" in str(e))
        True
    """


class VariableShapeError(MetoryxError, ValueError):
    """An array has a different shape from the variable it is meant for.

    Example:
        >>> import metoryx as mx, jax.numpy as jnp
        >>> p = mx.Parameter(mx.initializers.zeros, (2, 3))
        >>> try:
        ...     p.value = jnp.zeros((3, 2))
        ... except mx.errors.VariableShapeError as e:
        ...     print("(2, 3)" in str(e) and "(3, 2)" in str(e))
        True
    """


class VariableDtypeError(MetoryxError, TypeError):
    """An array has a dtype its variable cannot take.

    Raised by ``apply_fn`` for an array whose dtype differs from its variable's, and by
    ``Variable.value = ...`` for a value that is not numeric (a string, an object array, a
    ragged list) or would lose its imaginary part.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Dense(2, 2))
        >>> v = init_fn(jax.random.key(0))
        >>> v["params"]["kernel"] = v["params"]["kernel"].astype(jnp.int32)
        >>> try:
        ...     apply_fn(v, None, jnp.ones((1, 2)))
        ... except mx.errors.VariableDtypeError as e:
        ...     print("params/kernel" in str(e))
        True
    """


class UnsetValueError(MetoryxError, ValueError):
    """``Variable.value`` was read, but no starting value was fixed: ``init_fn`` makes it.

    Example:
        >>> import metoryx as mx
        >>> try:
        ...     mx.Parameter(mx.initializers.zeros, (2,)).value
        ... except mx.errors.UnsetValueError as e:
        ...     print("init_fn" in str(e))
        True
    """


class VariablesStructureError(MetoryxError, KeyError):
    """A ``variables`` dict has missing or unexpected paths; the message lists all of them.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Dense(2, 2))
        >>> v = init_fn(jax.random.key(0))
        >>> del v["params"]["bias"]
        >>> try:
        ...     apply_fn(v, None, jnp.ones((1, 2)))
        ... except mx.errors.VariablesStructureError as e:
        ...     print("params/bias" in str(e))
        True
    """

    def __str__(self) -> str:  # KeyError would quote the whole message.
        return str(self.args[0]) if self.args else ""


class ImmutableModuleError(MetoryxError, AttributeError):
    """An attribute other than a mutable :class:`metoryx.State` was assigned inside apply.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Counter(mx.Module):
        ...     def __call__(self, x):
        ...         self.calls = 1
        ...         return x
        >>> _, apply_fn = mx.transform(Counter())
        >>> try:
        ...     apply_fn({}, None, jnp.ones(2))
        ... except mx.errors.ImmutableModuleError as e:
        ...     print("mx.State" in str(e))
        True
    """


class ModuleAttributeError(MetoryxError, AttributeError):
    """A module's attribute was read, but the module has none by that name.

    Inside ``apply_fn`` the message names the module's path, so a variable deleted from a
    layer in the definition world (``del model.fc.bias``) is named where it is missed. It is an
    ``AttributeError``: ``hasattr`` and ``getattr(module, name, default)`` work as usual.

    Example:
        >>> import metoryx as mx
        >>> layer = mx.Dense(2, 2)
        >>> del layer.bias
        >>> try:
        ...     layer.bias
        ... except mx.errors.ModuleAttributeError as e:
        ...     print("deleted" in str(e))
        True
    """


class StaticArgumentError(MetoryxError, TypeError):
    """A flag that picks a layer's code path (``is_training``) is not a Python bool.

    Usually a traced value: ``jax.jit(apply_fn)`` traces every argument, so a layer cannot
    branch on ``is_training`` unless it is static: ``jax.jit(apply_fn,
    static_argnames="is_training")``.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> _, apply_fn = mx.transform(mx.Dropout(0.5))
        >>> try:
        ...     jax.jit(apply_fn)({}, jax.random.key(0), jnp.ones(4), is_training=True)
        ... except mx.errors.StaticArgumentError as e:
        ...     print("static_argnames" in str(e))
        True
    """


class MissingRngError(MetoryxError, ValueError):
    """A layer asked for a random key, but ``apply_fn`` was given none for that stream.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> class Noisy(mx.Module):
        ...     def __call__(self, x):
        ...         return mx.dropout(x, 0.5, is_training=True)
        >>> _, apply_fn = mx.transform(Noisy())
        >>> try:
        ...     apply_fn({}, None, jnp.ones(4))
        ... except mx.errors.MissingRngError as e:
        ...     print("dropout" in str(e))
        True
    """


class RngsTypeError(MetoryxError, TypeError):
    """``rngs`` was not ``None``, a key, or a dict of named keys; or the ``rng`` argument of a
    function such as :func:`metoryx.dropout` was not one key.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Dense(2, 2))
        >>> try:
        ...     apply_fn(init_fn(0), 0, jnp.ones((1, 2)))
        ... except mx.errors.RngsTypeError as e:
        ...     print("jax.random.key" in str(e))
        True
    """


class ApplyContextError(MetoryxError, RuntimeError):
    """Something that only works inside ``apply_fn`` was used outside it.

    Example:
        >>> import metoryx as mx
        >>> try:
        ...     mx.next_rng_key()
        ... except mx.errors.ApplyContextError as e:
        ...     print("apply_fn" in str(e))
        True
    """


class TransformBoundaryError(MetoryxError, RuntimeError):
    """A State, a random key or a sown value crossed the boundary of a JAX transformation.

    Raised when module code assigns a State, draws a key or sows a value inside a raw
    ``jax.vmap``, ``jax.lax.scan``, ``jax.lax.cond`` or ``jax.checkpoint`` that it started
    itself (the value would leak out as a tracer), and when the body of a lifted transformation
    (``mx.scan``, ``mx.vmap``, ...) assigns a State that lies outside the module it lifts.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Noisy(mx.Module):
        ...     def __call__(self, xs):
        ...         return jax.vmap(lambda x: x + jax.random.normal(mx.next_rng_key()))(xs)
        >>> _, apply_fn = mx.transform(Noisy())
        >>> try:
        ...     apply_fn({}, jax.random.key(0), jnp.zeros(3))
        ... except mx.errors.TransformBoundaryError as e:
        ...     print("mx.vmap" in str(e))
        True
    """


class MethodError(MetoryxError, AttributeError):
    """The method to run in ``apply_fn`` does not exist on the model.

    Example:
        >>> import metoryx as mx
        >>> try:
        ...     mx.transform(mx.Dense(2, 2), method="encode")
        ... except mx.errors.MethodError as e:
        ...     print("encode" in str(e))
        True
    """


class LayerConfigError(MetoryxError, ValueError):
    """A layer was built, or a function called, with configuration arguments that cannot work:
    of the wrong type (``use_bias="no"``, ``strict=None``), out of range (a dropout rate of 2,
    a negative window size) or not fitting together (``groups`` that do not divide the sizes).

    Raised by layer constructors, by the functions that take configuration
    (:func:`metoryx.max_pool`, :func:`metoryx.dropout`, :func:`metoryx.softmax`'s ``axis``,
    ...) and by :func:`metoryx.switch`, :func:`metoryx.capture`,
    :func:`metoryx.assign_variables` and the other functions of the model for theirs.

    Example:
        >>> import metoryx as mx
        >>> try:
        ...     mx.Conv(3, 8, kernel_size=(3, 3), groups=2)
        ... except mx.errors.LayerConfigError as e:
        ...     print("groups" in str(e))
        True
    """


class InputShapeError(MetoryxError, ValueError):
    """A layer was called on an input whose shape it cannot take.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Dense(3, 2))
        >>> try:
        ...     apply_fn(init_fn(jax.random.key(0)), None, jnp.ones((1, 4)))
        ... except mx.errors.InputShapeError as e:
        ...     print("in_size=3" in str(e))
        True
    """


class InputDtypeError(MetoryxError, TypeError):
    """A layer was called on an input whose dtype it cannot take (e.g. float ids for an Embed).

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.Embed(10, 4))
        >>> try:
        ...     apply_fn(init_fn(jax.random.key(0)), None, jnp.ones(3))
        ... except mx.errors.InputDtypeError as e:
        ...     print("integer" in str(e))
        True
    """


class CheckpointError(MetoryxError, ValueError):
    """A checkpoint file cannot be read: missing, truncated, corrupted, or of another format;
    or a sharded checkpoint's index does not fit its shards. The message names the file.

    Example:
        >>> import metoryx as mx
        >>> from metoryx.interop.safetensors_files import read_state_dict
        >>> try:
        ...     with read_state_dict("no/such/model.safetensors"):
        ...         pass
        ... except mx.errors.CheckpointError as e:
        ...     print("no such file" in str(e))
        True
    """


class FilterError(MetoryxError, ValueError):
    """A filter spec is malformed (a bad glob, an unknown kind of spec), or needs the variable
    info it was not given; or labels for optax overlap or leave variables out.

    Example:
        >>> import jax, metoryx as mx
        >>> variables = mx.init(mx.Dense(2, 3))(jax.random.key(0))
        >>> try:
        ...     mx.filter(variables, "params//kernel")
        ... except mx.errors.FilterError as e:
        ...     print("empty part" in str(e))
        True
    """


class NoMatchError(MetoryxError, ValueError):
    """A selection matched nothing: a filter spec (:func:`metoryx.filter`,
    :func:`metoryx.partition`, :func:`metoryx.optax_labels`), the ``where`` of
    :func:`metoryx.replace`, the ``target`` of :func:`metoryx.lora`.

    A typo must never silently do nothing (freeze nothing, replace nothing), so a selection
    that picks nothing is an error, and the message lists the near misses: the module types
    the model holds, the tags present, or the paths closest to the glob that was given.

    Example:
        >>> import metoryx as mx
        >>> try:
        ...     mx.replace(mx.MLP(2, [4], 1), mx.BatchNorm, lambda path, m: m)
        ... except mx.errors.NoMatchError as e:
        ...     print("Dense" in str(e))
        True
    """


class ReplacementError(MetoryxError, TypeError):
    """The ``fn`` of :func:`metoryx.replace` returned something that is not a module.

    Example:
        >>> import metoryx as mx
        >>> try:
        ...     mx.replace(mx.MLP(2, [4], 1), mx.Dense, lambda path, m: None)
        ... except mx.errors.ReplacementError as e:
        ...     print("mx.Identity()" in str(e))
        True
    """


class PartialAssignmentWarning(UserWarning):
    """``assign_variables(..., strict=False)`` left variables unset or arrays unused.

    The lists are on the warning: ``.missing`` (model paths that got no array) and ``.unused``
    (given paths the model does not have), each a tuple of ``"collection/a/b"`` strings.

    Example:
        >>> import warnings, jax, metoryx as mx
        >>> model = mx.Dense(2, 2)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = mx.assign_variables(model, {"params": {}}, strict=False)
        >>> caught[0].message.missing
        ('params/kernel', 'params/bias')
    """

    def __init__(self, message: str, missing: tuple[str, ...], unused: tuple[str, ...]):
        super().__init__(message)
        self.missing = missing
        self.unused = unused
