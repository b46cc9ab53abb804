"""Intermediate values: ``mx.sow`` in module code, ``mx.capture`` around ``apply_fn``.

``mx.sow(name, value)`` marks a value inside a module's code; it costs nothing and records
nothing unless the caller asks. ``mx.capture(apply_fn, ...)`` returns a version of
``apply_fn`` that also returns the sown values it selects and, without any change to the
model's code, the outputs of the sub-modules it names by path (feature extraction for transfer
learning, activation statistics, attention maps).

What is recorded is returned, never stored in ``variables``: the captured function is as pure
as ``apply_fn`` and works under ``jax.jit``, ``grad`` (with ``has_aux``-style unpacking) and
``vmap``. Inside ``mx.Repeat``, ``mx.scan`` and ``mx.vmap`` one value per copy, step or
member is recorded, stacked on a leading axis.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from metoryx import errors
from metoryx._core.context import innermost_frame
from metoryx._core.module import Module, calling_module, module_label, running_frame
from metoryx._core.transform import Snapshot


class Capture(NamedTuple):
    """What a captured call records: sown keys matching ``sown``, outputs of ``outputs``.

    ``calls``, when given, sees every call of a hooked module instead (``mx.summary``): it is
    called as ``calls(module, method, args, kwargs)`` and must return ``method(module, *args,
    **kwargs)``.
    """

    sown: tuple[str, ...]
    outputs: frozenset[str]
    calls: Callable[[Module, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any] | None = (
        None
    )


def sow(name: str, value: Any) -> Any:
    """Mark ``value`` as an intermediate named ``name`` of the calling module; return it.

    Nothing is recorded (and nothing is computed) unless the model runs through a function
    made by :func:`capture` whose ``sown`` patterns select ``"<module path>/<name>"``. A module
    called several times records one value per call, in order.

    Args:
        name: the name, unique within the module.
        value: any array or PyTree of arrays.

    Returns:
        ``value`` itself, so that ``x = mx.sow("features", x)`` reads naturally.

    Raises:
        TransformBoundaryError: when recording inside a raw ``jax.vmap``/``lax.scan`` started
            in module code (use ``mx.vmap``/``mx.scan``, which carry sown values out).

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Net(mx.Module):
        ...     def __init__(self):
        ...         self.fc = mx.Dense(2, 2)
        ...     def __call__(self, x):
        ...         h = mx.sow("pre_activation", self.fc(x))
        ...         return mx.relu(h)
        >>> init_fn, apply_fn = mx.transform(Net())
        >>> variables = init_fn(jax.random.key(0))
        >>> y, _, found = mx.capture(apply_fn)(variables, None, jnp.ones((1, 2)))
        >>> sorted(found), found["pre_activation"][0].shape
        (['pre_activation'], (1, 2))
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise errors.LayerConfigError(
            f"mx.sow: `name` must be a non-empty str without '/' (it is joined to the module's "
            f"path with '/', so 'a/b' could name another module's value), got {name!r}. Pass "
            f"a plain name such as 'features'."
        )
    found = innermost_frame()
    if found is None or found[1].capture is None:
        return value
    frame = found[1]
    module = calling_module()
    path: tuple[str, ...] = ()
    running = None if module is None else running_frame(module)
    if running is not None:
        path, frame = running[0].path, running[1]
    key = "/".join((*path, name))
    if key in frame.capture.outputs:
        raise errors.LayerConfigError(
            f"mx.sow({name!r}) in {'the model' if module is None else module_label(module)} "
            f"gives the key {key!r}, which is also the path of a sub-module whose output "
            f"mx.capture records. Rename the sown value."
        )
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in frame.capture.sown):
        frame.check_trace(
            f"mx.sow({name!r}) is called by {module_label(module) if module else 'code'}"
        )
        frame.captured.setdefault(key, []).append(value)
    return value


def capture(
    apply_fn: Callable[..., Any],
    sown: str | Sequence[str] | None = "*",
    outputs: str | Sequence[str] = (),
) -> Callable[..., tuple[Any, Any, dict[str, tuple[Any, ...]]]]:
    """``apply_fn`` that also returns intermediate values: sown ones and sub-module outputs.

    The returned function takes the arguments of ``apply_fn`` and returns ``(output,
    new_variables, captured)``. ``captured`` maps each key to a tuple of its values, one per
    call, in call order:

    - ``"<module path>/<name>"`` for a value sown with :func:`sow` whose key matches one of
      the ``sown`` patterns (``fnmatch`` globs: ``"*"`` all, ``"encoder/*/attention"``);
    - ``"<module path>"`` for the output of each sub-module whose path matches one of the
      ``outputs`` patterns (``"backbone/layer3"``, ``"blocks/*"``), recorded without any change
      to the model's code. The layer inside ``mx.Repeat``/``mx.vmap`` shares the wrapper's
      path; its output is the wrapper's (name its sub-modules for per-copy outputs).

    Args:
        apply_fn: the ``apply`` of ``mx.transform(model)`` (not yet jitted: jit the result).
        sown: glob patterns of the sown keys to record; ``None`` records none.
        outputs: glob patterns of the module paths whose outputs to record.

    Returns:
        The capturing function.

    Raises:
        LayerConfigError: when ``apply_fn`` is not a transformed model's, or an ``outputs``
            pattern matches no module (a typo would otherwise capture nothing).

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(3, 8), mx.relu, mx.Dense(8, 2))
        >>> init_fn, apply_fn = mx.transform(model)
        >>> features = jax.jit(mx.capture(apply_fn, sown=None, outputs="layers/0"))
        >>> y, _, found = features(init_fn(jax.random.key(0)), None, jnp.ones((4, 3)))
        >>> found["layers/0"][0].shape
        (4, 8)
    """
    snapshot = getattr(apply_fn, "__self__", None)
    if not isinstance(snapshot, Snapshot) or apply_fn.__name__ != "apply":
        raise errors.LayerConfigError(
            f"mx.capture expects the apply_fn of mx.transform(model), got {apply_fn!r}. Capture "
            f"first, then jit: jax.jit(mx.capture(apply_fn, ...))."
        )
    sown_patterns = () if sown is None else _patterns("sown", sown)
    output_patterns = _patterns("outputs", outputs)
    selected: dict[str, Module] = {}
    for path, module in snapshot.modules:
        key = "/".join(path)
        if not key:  # the root: its output is apply_fn's own
            continue
        if key not in selected and any(fnmatch.fnmatchcase(key, p) for p in output_patterns):
            selected[key] = module  # the first module at a path: a wrapper, not its layer
    unmatched = [p for p in output_patterns if not any(fnmatch.fnmatchcase(k, p) for k in selected)]
    if unmatched:
        paths = sorted({"/".join(p) for p, _ in snapshot.modules} - {""})
        raise errors.LayerConfigError(
            f"mx.capture: no module has a path matching {unmatched}. The model's module paths "
            f"are {paths[:40]}{' ...' if len(paths) > 40 else ''} (the model's own output is "
            f"what apply_fn returns)."
        )
    for module in selected.values():
        hook_calls(module)
    request = Capture(sown_patterns, frozenset(selected))

    def captured(variables: Any, rngs: Any, /, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        out, new_variables, found = snapshot.run(variables, rngs, args, kwargs, request)
        return out, new_variables, {k: tuple(v) for k, v in found.items()}

    return captured


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    """A pattern or a sequence of them as a tuple of ``fnmatch`` patterns."""
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise errors.LayerConfigError(
            f"mx.capture: `{name}` must be a pattern such as 'encoder/*' or a list of them, "
            f"got {value!r:.60}. Patterns match '<module path>/<name>' keys (fnmatch)."
        )
    return tuple(patterns)


def hook_calls(module: Module) -> None:
    """Make a snapshot module's calls visible to a :class:`Capture` (its outputs, its calls).

    The module's class becomes a subclass whose ``__call__`` looks the running frame's capture
    up; calls of the same snapshot outside a capture only pay that lookup, at trace time.
    """
    cls = type(module)
    if getattr(cls, "_mx_records_outputs", False):
        return
    object.__setattr__(module, "__class__", _recording_class(cls))  # a bound view refuses setattr


@functools.cache
def _recording_class(cls: type) -> type:
    original = cls.__call__

    def __call__(self: Module, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        found = running_frame(self)
        request = None if found is None else found[1].capture
        if request is not None and request.calls is not None:
            return request.calls(self, original, args, kwargs)
        out = original(self, *args, **kwargs)
        if found is not None and request is not None:
            binding, frame = found
            key = "/".join(binding.path)
            if key in frame.capture.outputs:
                frame.check_trace(f"mx.capture records the output of {key!r}")
                frame.captured.setdefault(key, []).append(out)
        return out

    namespace = {
        "__call__": __call__,
        "_mx_records_outputs": True,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), namespace)
