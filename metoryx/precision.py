"""Mixed precision: a :class:`Policy` of three dtypes, set on a model in the definition world.

``mx.set_precision(model, policy, where)`` returns a copy of ``model`` whose picked layers store
their parameters in ``policy.param_dtype``, compute in ``policy.compute_dtype`` and hand their
outputs on in ``policy.output_dtype``. Everything happens before ``mx.transform``: the
snapshot, ``init_fn`` and ``apply_fn`` of the copy are those of a model built with those
dtypes, so a jitted step pays nothing for the policy. Normalization layers keep the dtypes
they were built with (float32 by default), and attention runs its softmax in float32, as in
Keras, Haiku and PyTorch AMP: their statistics and exponentials are what half precision gets
wrong.

Loss scaling for float16 is `jmp <https://github.com/google-deepmind/jmp>`_'s
``DynamicLossScale``, used as it is (see ``docs/precision.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Protocol, TypeGuard, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from metoryx import errors
from metoryx._core.module import Module, iter_children
from metoryx._core.paths import Path
from metoryx._core.tree import walk
from metoryx._core.variables import Parameter, Variable, numeric_dtype
from metoryx.nn.normalization import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from metoryx.surgery import Where, nothing_matched, where_matcher

M = TypeVar("M", bound=Module)

#: The layers :func:`set_precision` leaves in the dtypes they were built with unless told
#: otherwise: normalizations, whose statistics need float32.
NORMALIZATIONS: tuple[type[Module], ...] = (BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Three dtypes for mixed-precision training, as in jmp and Haiku.

    - ``param_dtype``: the **storage** dtype of the parameters (what ``init_fn`` makes, what
      the optimizer updates and checkpoints keep). float32 keeps small updates from rounding
      away.
    - ``compute_dtype``: the **computation** dtype: layers cast their inputs and parameters
      to it and compute in it (a layer's ``dtype`` argument).
    - ``output_dtype``: the dtype a picked module's output is cast to (None: the
      ``compute_dtype``). float32 at the model's output keeps the loss accurate.

    Args:
        param_dtype: a floating dtype, e.g. ``jnp.float32``.
        compute_dtype: a floating dtype, e.g. ``jnp.bfloat16`` or ``jnp.float16``.
        output_dtype: a floating dtype, or None for ``compute_dtype``.

    Raises:
        LayerConfigError: if a dtype is not a floating dtype.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> policy = mx.Policy(jnp.float32, jnp.bfloat16, jnp.float32)
        >>> policy
        Policy(param_dtype=float32, compute_dtype=bfloat16, output_dtype=float32)
        >>> mx.Policy(jnp.float32, jnp.float16).output_dtype
        dtype('float16')
    """

    param_dtype: np.dtype[Any]
    compute_dtype: np.dtype[Any]
    output_dtype: np.dtype[Any]

    def __init__(self, param_dtype: Any, compute_dtype: Any, output_dtype: Any = None):
        output = compute_dtype if output_dtype is None else output_dtype
        for name, value in [
            ("param_dtype", param_dtype),
            ("compute_dtype", compute_dtype),
            ("output_dtype", output),
        ]:
            object.__setattr__(self, name, _floating(name, value))

    def __repr__(self) -> str:
        fields = dataclasses.fields(self)
        dtypes = ", ".join(f"{f.name}={getattr(self, f.name).name}" for f in fields)
        return f"Policy({dtypes})"


class _DtypePolicy(Protocol):
    """What ``set_precision`` reads of a policy: also a ``jmp.Policy``."""

    @property
    def param_dtype(self) -> Any: ...
    @property
    def compute_dtype(self) -> Any: ...
    @property
    def output_dtype(self) -> Any: ...


def set_precision(
    model: M,
    policy: Policy | _DtypePolicy,
    where: Where | None = None,
    *,
    keep: tuple[type[Module], ...] = NORMALIZATIONS,
) -> M:
    """A copy of ``model`` in which the layers ``where`` picks follow ``policy``.

    ``model`` is left as it was. In the copy, every layer inside a picked module (the module
    itself included), except the ``keep`` layers and what they hold:

    - stores its floating parameters in ``policy.param_dtype``: each is rebuilt with that
      dtype, its tags, axes and metadata kept, and a fixed value (pretrained weights) cast;
      tied parameters stay tied; integer parameters and States (running statistics, caches)
      keep their dtypes;
    - computes in ``policy.compute_dtype``: its ``dtype`` (the computation dtype, which layers
      cast inputs and parameters to) is set to it, and a ``param_dtype`` it keeps for later
      variables (``MultiHeadAttention.init_cache``, recurrent carries) to ``param_dtype``.

    Each picked module's output is cast to ``policy.output_dtype`` (its floating arrays;
    anything else passes), so ``Policy(jnp.float32, jnp.bfloat16, jnp.float32)`` on the whole
    model gives float32 logits for the loss. The ``keep`` layers (normalizations by default)
    keep the dtypes they were built with, float32 unless told otherwise: with ``dtype=None``
    they compute in the promotion of their input and float32 parameters, so their output is
    float32 and the next layer casts it to the compute dtype. Attention's softmax runs in
    float32 whatever the compute dtype (:func:`~metoryx.dot_product_attention`).

    A module of your own that holds parameters gets them in ``param_dtype``; it computes as
    its code says (cast to ``jnp.bfloat16`` there, or use metoryx layers inside it).

    Args:
        model: the root module.
        policy: the dtypes, an :class:`mx.Policy <metoryx.Policy>` (a ``jmp.Policy`` works
            too).
        where: which modules follow the policy, with what is inside them: None for the whole
            model, else a module class or a tuple of them, a path glob (``"encoder/**"``) or a
            predicate ``where(path, module) -> bool``, as in :func:`~metoryx.replace`.
        keep: the layer classes left in their own dtypes; ``()`` puts normalizations under
            the policy too.

    Returns:
        The copy; ``mx.transform`` it to train.

    Raises:
        LayerConfigError: if ``policy`` is not a policy, ``keep`` not a tuple of module
            classes, or ``where`` not one of the forms above.
        NoMatchError: if ``where`` picks no module; the message lists the near misses.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(3, 8), mx.LayerNorm(8), mx.relu, mx.Dense(8, 2))
        >>> half = mx.set_precision(model, mx.Policy(jnp.float32, jnp.bfloat16, jnp.float32))
        >>> half.layers[0].dtype, half.layers[1].dtype  # the LayerNorm keeps its own
        (dtype(bfloat16), None)
        >>> init_fn, apply_fn = mx.transform(half)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["layers"]["0"]["kernel"].dtype  # stored in float32
        dtype('float32')
        >>> apply_fn(variables, None, jnp.ones((4, 3)))[0].dtype  # float32 for the loss
        dtype('float32')
    """
    policy = _policy_argument(policy)
    kept = _keep_argument(keep)
    tree = walk(model)
    if where is None:
        picked: list[tuple[Path, Module]] = [((), model)]
    else:
        matches = where_matcher(where, "mx.set_precision")
        picked = [(p, m) for p, m in tree.modules if matches(p, m)]
        if not picked:
            raise nothing_matched(where, tree.modules, "mx.set_precision")
    layers: dict[int, Module] = {}  # the modules under the policy, by id
    for _, module in picked:
        layers.update((id(m), m) for m in _under_policy(module, kept))
    memo = tree.copy_memo()
    for module in layers.values():
        for _, child in iter_children(module):
            if _follows(child) and id(child) not in memo:  # a tied one: rebuilt once
                memo[id(child)] = _rebuilt(child, policy.param_dtype)
    result = copy.deepcopy(model, memo)
    for module in layers.values():
        new = memo[id(module)]
        if "dtype" in vars(new):
            new.dtype = policy.compute_dtype
        if "param_dtype" in vars(new):
            new.param_dtype = policy.param_dtype
    for _, module in picked:
        if callable(module):  # a container without __call__ has no output to cast
            _cast_output(memo[id(module)], policy.output_dtype)
    return result


def _cast_output(module: Module, dtype: np.dtype[Any]) -> None:
    module.output_dtype = dtype
    if not getattr(type(module), "_mx_casts_output", False):
        object.__setattr__(module, "__class__", _casting_class(type(module)))


def _under_policy(module: Module, kept: tuple[type[Module], ...]) -> list[Module]:
    """``module`` and the modules inside it, but none of the ``kept`` ones or their insides."""
    inside_kept: set[int] = set()
    found: list[Module] = []
    for _, inner in walk(module).modules:
        if id(inner) in inside_kept:
            continue
        if isinstance(inner, kept):
            inside_kept.update(id(m) for _, m in walk(inner).modules)
            continue
        found.append(inner)
    return found


def _follows(child: Any) -> TypeGuard[Parameter]:
    """Whether a module's child is a parameter the policy's ``param_dtype`` applies to."""
    return isinstance(child, Parameter) and jnp.issubdtype(child.dtype, jnp.floating)


def _rebuilt(variable: Variable, dtype: np.dtype[Any]) -> Parameter:
    """``variable`` described anew with ``dtype``; its fixed value, if any, cast to it."""
    new = Parameter(
        variable.init,
        variable.shape,
        dtype,
        tags=variable.tags,
        axes=variable.axes,
        **variable.metadata,
    )
    if variable.has_value:
        new.value = variable.value
    return new


@functools.cache
def _casting_class(cls: type[Module]) -> type[Module]:
    """``cls`` whose calls cast their floating outputs to the instance's ``output_dtype``.

    One subclass per class, made once: the instance's class changes, its name, docs and
    ``isinstance`` checks stay. The cast runs at trace time as one ``convert_element_type``
    per output array (none where the dtype is already right)."""
    original = cls.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        out = original(self, *args, **kwargs)
        dtype = self.output_dtype
        return jax.tree.map(lambda x: _cast_floating(x, dtype), out)

    namespace = {
        "__call__": __call__,
        "_mx_casts_output": True,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), namespace)


def _cast_floating(x: Any, dtype: np.dtype[Any]) -> Any:
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
        return x.astype(dtype)
    return x


# ---------------------------------------------------------------------------------------------
# Arguments


def _floating(name: str, value: Any) -> np.dtype[Any]:
    dtype = numeric_dtype(value)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise errors.LayerConfigError(
            f"mx.Policy: `{name}` must be a floating dtype such as jnp.float32, jnp.bfloat16 or "
            f"jnp.float16, got {value!r:.60}. Pass one of those."
        )
    return dtype


def _policy_argument(policy: Any) -> Policy:
    if isinstance(policy, Policy):
        return policy
    fields = ("param_dtype", "compute_dtype", "output_dtype")
    if all(hasattr(policy, f) for f in fields) and not isinstance(policy, Module):
        return Policy(*(getattr(policy, f) for f in fields))  # a jmp.Policy
    raise errors.LayerConfigError(
        f"mx.set_precision: `policy` must be an mx.Policy (or a jmp.Policy), got "
        f"{type(policy).__name__} {policy!r:.60}. Pass e.g. mx.Policy(jnp.float32, "
        f"jnp.bfloat16, jnp.float32): float32 storage, bfloat16 computation, float32 output."
    )


def _keep_argument(keep: Any) -> tuple[type[Module], ...]:
    if isinstance(keep, tuple) and all(isinstance(c, type) and issubclass(c, Module) for c in keep):
        return keep
    raise errors.LayerConfigError(
        f"mx.set_precision: `keep` must be a tuple of module classes, the layers left in "
        f"their own dtypes, got {keep!r:.60}. Pass e.g. keep=(mx.BatchNorm,), or keep=() to "
        f"put every layer under the policy."
    )
