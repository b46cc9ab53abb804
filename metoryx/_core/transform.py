"""The bridge: ``transform`` snapshots a model into a pure ``init_fn`` and ``apply_fn``.

All analysis happens once, here: the deep copy, the unique variables with their paths, the
expected PyTree structure of ``variables`` and the order in which its leaves map to variables.
A call then does a structure comparison, a shape/dtype loop over the leaves (at trace time only,
under ``jax.jit``) and the model's own code.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from metoryx import errors
from metoryx._core.context import FRAMES, BoundVariable, Frame, Slot
from metoryx._core.init import InitPlan
from metoryx._core.module import BINDING, Binding, Module
from metoryx._core.paths import flatten_variables, path_str, unflatten_variables
from metoryx._core.rng import as_root_key, parse_rngs
from metoryx._core.tree import walk
from metoryx._core.typed import config_read, jnp_asarray, tree_flatten, tree_unflatten
from metoryx._core.variables import Variable

Method = str | Callable[..., Any] | None


class Transformed(NamedTuple):
    """The pure functions of a model: ``init(key) -> variables`` and
    ``apply(variables, rngs, *args, **kwargs) -> (output, new_variables)``.

    A NamedTuple: unpack it (``init_fn, apply_fn = mx.transform(model)``) or read its fields.

    Attributes:
        init: ``init(key) -> variables``, the nested dict ``{collection: {path...: array}}``;
            ``key`` is a ``jax.random.key``, a legacy ``PRNGKey`` or an int seed.
        apply: ``apply(variables, rngs, *args, **kwargs) -> (output, new_variables)``; runs
            the model's method (``__call__`` unless ``mx.transform`` named another).

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> model = mx.transform(mx.Dense(2, 3))
        >>> isinstance(model, mx.Transformed)
        True
        >>> variables = model.init(jax.random.key(0))
        >>> y, _ = model.apply(variables, None, jnp.ones((1, 2)))
        >>> y.shape
        (1, 3)
    """

    init: Callable[[Any], dict[str, Any]]
    apply: Callable[..., tuple[Any, dict[str, Any]]]


def transform(model: Module, method: Method = None) -> Transformed:
    """Snapshot ``model`` into a pure ``init_fn`` and ``apply_fn``.

    The model is deep-copied once, now: editing ``model`` afterwards does not change the
    functions. ``init_fn(key)`` builds ``variables``, a nested dict ``{collection: {path...:
    array}}``, without running the model; each variable's key is derived from ``key`` and a
    stable hash of its path. ``apply_fn(variables, rngs, *args, **kwargs)`` runs the method and
    returns ``(output, new_variables)``, where ``new_variables`` has the structure of
    ``variables`` with mutable State updated. Both are pure: use them under ``jax.jit``,
    ``grad``, ``vmap``, ``lax.scan`` and ``jax.checkpoint``.

    Args:
        model: the root module.
        method: what ``apply_fn`` runs: ``None`` for ``model.__call__``, the name of another
            method, a bound method of a module in the model, or a function
            ``fn(module, *args, **kwargs)`` that receives the snapshot of ``model``.

    Returns:
        ``Transformed(init, apply)``, a NamedTuple that unpacks into the two functions.

    Raises:
        ModuleStructureError: when the model's attributes cannot be turned into paths.
        MethodError: when ``method`` names a method the model does not have.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> model = mx.Dense(3, 2)
        >>> init_fn, apply_fn = mx.transform(model)
        >>> variables = init_fn(jax.random.key(0))
        >>> jax.tree.map(jnp.shape, variables)
        {'params': {'bias': (2,), 'kernel': (3, 2)}}
        >>> y, new_variables = jax.jit(apply_fn)(variables, None, jnp.ones((4, 3)))
        >>> y.shape
        (4, 2)
    """
    snapshot = Snapshot(model, method)
    return Transformed(snapshot.init, snapshot.apply)


def init(model: Module) -> Callable[[Any], dict[str, Any]]:
    """``transform(model).init``: the pure function ``init_fn(key) -> variables``.

    Example:
        >>> import jax, metoryx as mx
        >>> variables = mx.init(mx.Dense(3, 2))(jax.random.key(0))
        >>> sorted(variables["params"])
        ['bias', 'kernel']
    """
    return transform(model).init


def apply(model: Module, method: Method = None) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """``transform(model, method).apply``: ``apply_fn(variables, rngs, *args, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> model = mx.Dense(3, 2)
        >>> variables = mx.init(model)(jax.random.key(0))
        >>> y, _ = mx.apply(model)(variables, None, jnp.ones((1, 3)))
        >>> y.shape
        (1, 2)
    """
    return transform(model, method).apply


class Snapshot:
    """A frozen copy of a model and everything a call needs, computed once."""

    def __init__(self, model: Module, method: Method):
        tree = walk(model)
        memo = tree.copy_memo()
        try:
            root = copy.deepcopy(model, memo)
        except Exception as e:
            raise errors.ModuleStructureError(
                f"mx.transform deep-copies the model so that later edits cannot leak into the "
                f"snapshot, and copying {type(model).__name__} failed: {e!r}. Keep objects "
                f"that cannot be copied (locks, open files, live connections) out of modules, "
                f"or give their class a __deepcopy__."
            ) from e
        self.root = root
        self.owners = tree.owners
        self.info: dict[str, Any] | None = None  # info.variable_info's cache
        self.variables = [
            BoundVariable(path, memo[id(v)], tree.axes.get(path, ())) for path, v in tree.variables
        ]
        slot_of = {id(b.variable): Slot(i) for i, b in enumerate(self.variables)}
        self.modules = [(path, memo[id(module)]) for path, module in tree.modules]
        for path, module in self.modules:
            _bind(module, Binding(self, path, {}), slot_of)

        nested = unflatten_variables({b.path: i for i, b in enumerate(self.variables)})
        self.leaf_slots: list[int]
        self.leaf_slots, self.treedef = tree_flatten(nested)
        self.slot_shapes = [b.shape for b in self.variables]
        self.shapes = [self.slot_shapes[i] for i in self.leaf_slots]
        self.lift_plans: dict[Any, Any] = {}  # lifting.plan_of's cache, by wrapper path
        self.mutable = any(b.variable.mutable for b in self.variables)
        self.dtypes: dict[bool, list[Any]] = {}
        self.init_plans: dict[bool, InitPlan] = {}
        self.fn = _resolve_method(model, root, method, memo)

    # -- init ------------------------------------------------------------------------------

    def init(self, key: Any) -> dict[str, Any]:
        """Create ``variables`` from ``key``: fixed values as set, the rest from initializers."""
        key = as_root_key(key)
        x64 = config_read("jax_enable_x64")
        plan = self.init_plans.get(x64)
        if plan is None:
            plan = self.init_plans[x64] = InitPlan(self.variables)
        arrays = plan.draw(key)
        return tree_unflatten(self.treedef, [arrays[i] for i in self.leaf_slots])

    # -- apply -----------------------------------------------------------------------------

    def apply(self, variables: Any, rngs: Any, /, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Run the model's method on ``variables``; return ``(output, new_variables)``."""
        out, new_variables, _ = self.run(variables, rngs, args, kwargs)
        return out, new_variables

    def run(
        self,
        variables: Any,
        rngs: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        capture: Any = None,
    ) -> tuple[Any, Any, dict[str, list[Any]]]:
        """``apply`` that also returns what ``capture`` (see ``metoryx.intermediates``) recorded."""
        leaves, treedef = tree_flatten(variables)
        foreign = treedef != self.treedef  # e.g. an OrderedDict, or paths that differ
        if foreign:
            leaves = self._leaves_from_other_structure(variables)
        dtypes = self.dtypes.get(config_read("jax_enable_x64")) or self._dtypes()
        values: list[Any] = [None] * len(leaves)
        for i, (leaf, shape, dtype) in enumerate(zip(leaves, self.shapes, dtypes, strict=True)):
            if not isinstance(leaf, jax.Array):
                leaf = self._as_array(self.leaf_slots[i], leaf, dtype)
            if leaf.shape != shape or leaf.dtype != dtype:
                raise self._leaf_error(self.leaf_slots[i], leaf, dtype)
            values[self.leaf_slots[i]] = leaf
        if self.fn is None:
            raise errors.MethodError(
                f"{type(self.root).__name__} defines no __call__, so apply_fn has nothing to "
                f"run. Pass the method to run: mx.transform(model, method='encode') or "
                f"method=lambda m, x: m.encode(x)."
            )
        frame = Frame(self.variables, values, self.slot_shapes, parse_rngs(rngs), capture)
        frames = dict(FRAMES.get())
        frames.pop(self, None)
        frames[self] = frame
        token = FRAMES.set(frames)
        try:
            out = self.fn(*args, **kwargs)
        finally:
            FRAMES.reset(token)
        if not self.mutable:
            return out, variables, frame.captured
        if foreign:  # another mapping type: answer in the caller's structure
            flat = {b.path: frame.values[i] for i, b in enumerate(self.variables)}
            return out, _restructure(variables, flat, ()), frame.captured
        updated = [frame.values[i] for i in self.leaf_slots]
        return out, tree_unflatten(self.treedef, updated), frame.captured

    def _dtypes(self) -> list[Any]:
        dtypes = [
            jax.dtypes.canonicalize_dtype(self.variables[i].variable.dtype) for i in self.leaf_slots
        ]
        self.dtypes[config_read("jax_enable_x64")] = dtypes
        return dtypes

    def _leaves_from_other_structure(self, variables: Any) -> list[Any]:
        """Leaves in our order from any mapping with exactly our paths; else a full report."""
        if not isinstance(variables, Mapping):
            raise errors.VariablesStructureError(
                f"apply_fn expects `variables` as the nested dict init_fn returns, e.g. "
                f"{{'params': {{...}}}}; got {type(variables).__name__}."
            )
        flat = flatten_variables(cast("Mapping[Any, Any]", variables))  # isinstance: Unknown
        given = {p: v for p, v in flat.items() if v is not None}
        expected = {b.path: b for b in self.variables}
        missing = [path_str(p) for p in expected if p not in given]
        unexpected = [path_str(p) for p in given if p not in expected]
        if missing or unexpected:
            raise errors.VariablesStructureError(mismatch_report(missing, unexpected))
        return [given[self.variables[i].path] for i in self.leaf_slots]

    def _as_array(self, slot: int, leaf: Any, dtype: Any) -> jax.Array:
        try:
            return jnp_asarray(leaf)
        except (TypeError, ValueError):
            bound = self.variables[slot]
            raise errors.VariableDtypeError(
                f"{path_str(bound.path)} ({type(bound.variable).__name__}): expected an array "
                f"of dtype {jnp.dtype(dtype).name} and shape {bound.shape}, got "
                f"{type(leaf).__name__} {leaf!r:.60}. Pass the arrays init_fn returns (or a "
                f"checkpoint with the same paths)."
            ) from None

    def _leaf_error(self, slot: int, leaf: Any, dtype: Any) -> Exception:
        bound = self.variables[slot]
        var = bound.variable
        what = f"{path_str(bound.path)} ({type(var).__name__})"
        if leaf.shape != bound.shape:
            hint = (
                " It is stacked, one copy per layer or member: convert an unrolled checkpoint "
                "with mx.stack(model, variables)."
                if bound.axes
                else ""
            )
            return errors.VariableShapeError(
                f"{what}: expected shape {bound.shape}, got {leaf.shape}. The variables do not "
                f"match this model; re-create them with init_fn, or convert the checkpoint."
                f"{hint}"
            )
        return errors.VariableDtypeError(
            f"{what}: expected dtype {jnp.dtype(dtype).name}, got {leaf.dtype.name}. Cast "
            f"it (jax.tree.map(lambda a: a.astype(...), variables)) or declare the variable "
            f"with the dtype you store (param_dtype=... on the layer)."
        )


def _bind(module: Module, binding: Binding, slot_of: dict[int, Slot]) -> None:
    """Turn a deep-copied module into a snapshot view: variable attributes become templates."""
    attrs = module.__dict__
    for name, value in list(attrs.items()):
        template = _template(value, slot_of)
        if template is not value:
            binding.templates[name] = template
            del attrs[name]
    attrs[BINDING] = binding


def _template(value: Any, slot_of: dict[int, Slot]) -> Any:
    """``value`` with each Variable replaced by its Slot; ``value`` itself if it holds none."""
    if isinstance(value, Variable):
        return slot_of[id(value)]
    # isinstance narrows an Any to a container of Unknown items: the casts say Any.
    if isinstance(value, (list, tuple)):
        container = cast("list[Any] | tuple[Any, ...]", value)
        items = [_template(v, slot_of) for v in container]
        if all(a is b for a, b in zip(items, container, strict=True)):
            return container
        if isinstance(container, list):
            return items
        return type(container)(*items) if hasattr(container, "_fields") else type(container)(items)
    if isinstance(value, dict):
        mapping = cast("dict[Any, Any]", value)
        entries = {k: _template(v, slot_of) for k, v in mapping.items()}
        if all(entries[k] is v for k, v in mapping.items()):
            return mapping
        return entries
    return value


def _resolve_method(
    model: Module, root: Module, method: Method, memo: dict[int, Any]
) -> Callable[..., Any] | None:
    """The callable that apply_fn runs, bound to the snapshot."""
    if method is None or (isinstance(method, str) and method == "__call__"):
        return root.__call__ if callable(root) else None
    if isinstance(method, str):
        if not hasattr(type(root), method):
            public = sorted(
                n
                for n, _ in inspect.getmembers(type(root), callable)
                if not n.startswith("_") and n != "extra_repr"
            )
            raise errors.MethodError(
                f"{type(model).__name__} has no method {method!r}; its methods are "
                f"{public or 'none besides __call__'}. Pass one of them, or a function "
                f"fn(module, *args, **kwargs)."
            )
        return getattr(root, method)
    if inspect.ismethod(method) and isinstance(method.__self__, Module):
        # A bound method of the definition-world model (or a sub-module): rebind it to the copy.
        target = memo.get(id(method.__self__))
        if target is None:
            raise errors.MethodError(
                f"method={method.__qualname__} is bound to a module that is not part of "
                f"{type(model).__name__}. Pass a method of the model or one of its sub-modules."
            )
        return getattr(target, method.__name__)
    if callable(method):
        return partial(method, root)
    raise errors.MethodError(
        f"`method` must be None, a method name, or a function fn(module, *args, **kwargs); got "
        f"{type(method).__name__}."
    )


def _restructure(like: Mapping[Any, Any], flat: dict[Any, Any], prefix: tuple[str, ...]) -> Any:
    """The arrays of ``flat`` (keyed by path) arranged as the mapping ``like``."""
    items: list[tuple[Any, Any]] = []
    for key, value in like.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            items.append((key, _restructure(cast("Mapping[Any, Any]", value), flat, path)))
        else:
            items.append((key, flat.get(path, value)))
    factory: Any = type(like)
    try:
        return factory(items)
    except TypeError:
        return dict(items)


def mismatch_report(missing: list[str], unexpected: list[str]) -> str:
    """The text of a missing/unexpected-paths error, shared with assign_variables."""
    lines = ["The variables do not match the model."]
    if missing:
        lines.append(f"Missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"Unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    lines.append(
        "Create them with this model's init_fn, or load a checkpoint saved from the same "
        "architecture; for a partial match use mx.assign_variables(model, variables, "
        "strict=False) and transform again."
    )
    return "\n".join(lines)
