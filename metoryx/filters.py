"""Filters: choosing variables by path, collection, tag or module type.

Example:
    >>> import jax, metoryx as mx
    >>> model = mx.Sequential(mx.Dense(2, 3), mx.LayerNorm(3))
    >>> _ = mx.freeze(model.layers[0])
    >>> variables = mx.init(model)(jax.random.key(0))
    >>> trainable, frozen = mx.partition(variables, mx.filters.trainable, mx.variable_info(model))
    >>> sorted(trainable["params"]["layers"]), sorted(frozen["params"]["layers"])
    (['1'], ['0'])

Everything a user does with a subset of the variables (train it, freeze it, give it its own
optimizer, save it, shard it) starts by naming the subset. A *filter spec* names it:

- a **str** is a glob over paths, matched against each path and its prefixes, so a collection
  name (``"params"``) or a module's path (``"params/encoder"``) selects everything under it;
  ``*`` matches within one level, ``**`` any number of levels (``"params/**/kernel"``);
- a **Module class** (``mx.LayerNorm``) selects the variables held inside such modules, at any
  depth (so a block class selects its whole block);
- :func:`tag` selects by tag, :func:`collection` by collection, :func:`path` by glob;
- a **predicate** ``fn(path, info) -> bool`` (``path`` a tuple of str, ``info`` the variable's
  :class:`~metoryx.VariableInfo`, or None when no info was passed);
- a **tuple or list** of specs selects what any of them selects; :func:`any_of`,
  :func:`all_of` and :func:`not_` (or the operators ``|``, ``&`` and ``~`` on a filter)
  combine them.

Strings are globs only, never tags: a tag and a path of the same name would otherwise be
ambiguous, and a filter must never guess. A spec that selects nothing is an error listing near
misses, so that a typo never silently freezes nothing.

The selected part of ``variables`` is a nested dict of just the selected arrays (no
placeholders), so JAX and optax see only them: ``jax.grad`` of the trainable part computes no
gradient for the rest, and an optimizer over it allocates no state for the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from metoryx import errors
from metoryx._core.info import VariableInfo
from metoryx._core.module import Module
from metoryx._core.paths import Path, flatten_variables, glob_matcher, glob_problem, path_str

__all__ = [
    "Filter",
    "all_of",
    "any_of",
    "collection",
    "frozen",
    "not_",
    "path",
    "tag",
    "trainable",
]

#: The tag ``mx.freeze`` gives: what :data:`frozen` selects and :data:`trainable` leaves out.
FROZEN = "frozen"

Spec = Any  # str | type[Module] | Filter | Callable[[Path, VariableInfo | None], bool] | tuple


class Filter:
    """A compiled filter spec: ``f(path, info) -> bool`` for one variable.

    Made by :func:`as_filter` from any spec, and by :func:`tag`, :func:`collection`,
    :func:`path`, :func:`any_of`, :func:`all_of` and :func:`not_`. Filters combine with
    ``|`` (any), ``&`` (all) and ``~`` (not), also with a plain spec on one side
    (``"params/head" | mx.filters.tag("lora")``).

    Example:
        >>> import metoryx as mx
        >>> spec = mx.filters.tag("lora") | "params/head"
        >>> spec
        any_of(tag('lora'), path('params/head'))
        >>> spec(("params", "head", "kernel"), None)
        True
    """

    #: Whether matching reads the variable's info (tags, module types).
    needs_info: bool = False

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        raise NotImplementedError

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        """Why nothing matched, from what is there: near misses for the error message."""
        return ""

    def __or__(self, other: Spec) -> Filter:
        return any_of(self, other)

    def __ror__(self, other: Spec) -> Filter:
        return any_of(other, self)

    def __and__(self, other: Spec) -> Filter:
        return all_of(self, other)

    def __rand__(self, other: Spec) -> Filter:
        return all_of(other, self)

    def __invert__(self) -> Filter:
        return not_(self)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _Glob(Filter):
    pattern: str
    match: Callable[[Path], bool]

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        return self.match(path)

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        # Every path and every prefix of one (the module paths) is a candidate.
        names = sorted({path_str(p[:k]) for p, _ in infos for k in range(1, len(p) + 1)})
        close = difflib.get_close_matches(self.pattern, names, n=5, cutoff=0.6)
        found = f"The closest paths are {', '.join(map(repr, close))}. " if close else ""
        return (
            f"{found}The collections are {_listing(p[0] for p, _ in infos)}. A glob matches "
            f"whole levels: '*' within one, '**' across several ('params/**/kernel')."
        )

    def __repr__(self) -> str:
        return f"path({self.pattern!r})"


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _Collection(Filter):
    names: tuple[str, ...]

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        return path[0] in self.names

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        return f"The collections present are {_listing(p[0] for p, _ in infos)}."

    def __repr__(self) -> str:
        return f"collection({', '.join(map(repr, self.names))})"


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _Tag(Filter):
    names: tuple[str, ...]
    needs_info = True

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        return info is not None and any(t in self.names for t in info.tags)

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        tags = Counter(t for _, i in infos if i is not None for t in i.tags)
        if not tags:
            return (
                "No variable has a tag. Tag them in the definition world before mx.transform: "
                "mx.tag(model.encoder, 'backbone'), or `layer.kernel.tags = ('backbone',)`."
            )
        present = ", ".join(f"{t!r} ({n})" for t, n in sorted(tags.items()))
        return f"The tags present are {present} (with their variable counts)."

    def __repr__(self) -> str:
        return f"tag({', '.join(map(repr, self.names))})"


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _ModuleType(Filter):
    types: tuple[type[Module], ...]
    needs_info = True

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        return info is not None and any(issubclass(t, self.types) for t in info.module_types)

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        names = {t.__name__ for _, i in infos if i is not None for t in i.module_types}
        return f"The module types holding variables are {_listing(names)}."

    def __repr__(self) -> str:
        return " | ".join(t.__name__ for t in self.types)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _Predicate(Filter):
    fn: Callable[[Path, VariableInfo | None], Any]

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        return bool(self.fn(path, info))

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        return f"The predicate returned a false value for all {len(infos)} variables."

    def __repr__(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _AnyOf(Filter):
    members: tuple[Filter, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_info", any(m.needs_info for m in self.members))

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        return any(m(path, info) for m in self.members)

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        return " ".join(f"{m!r}: {m.hint(infos)}" for m in self.members)

    def __repr__(self) -> str:
        return f"any_of({', '.join(map(repr, self.members))})"


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _AllOf(Filter):
    members: tuple[Filter, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_info", any(m.needs_info for m in self.members))

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        return all(m(path, info) for m in self.members)

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        alone = [f"{m!r} selects {sum(m(p, i) for p, i in infos)}" for m in self.members]
        return f"Alone, {'; '.join(alone)}, and no variable is selected by all of them."

    def __repr__(self) -> str:
        return f"all_of({', '.join(map(repr, self.members))})"


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _Not(Filter):
    member: Filter

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_info", self.member.needs_info)

    def __call__(self, path: Path, info: VariableInfo | None) -> bool:
        return not self.member(path, info)

    def hint(self, infos: list[tuple[Path, VariableInfo | None]]) -> str:
        return f"{self.member!r} selects every one of the {len(infos)} variables."

    def __repr__(self) -> str:
        return f"not_({self.member!r})"


def _listing(names: Iterable[str]) -> str:
    found = sorted(set(names))
    return ", ".join(map(repr, found)) if found else "none"


def as_filter(spec: Spec) -> Filter:
    """The :class:`Filter` of any spec (see the module docs); a FilterError for anything else.

    Example:
        >>> import metoryx as mx
        >>> from metoryx.filters import as_filter
        >>> as_filter(("params/**/kernel", mx.LayerNorm))
        any_of(path('params/**/kernel'), LayerNorm)
    """
    if isinstance(spec, Filter):
        return spec
    if isinstance(spec, str):
        return path(spec)
    if isinstance(spec, type):
        if issubclass(spec, Module):
            return _ModuleType((spec,))
        raise errors.FilterError(
            f"A class in a filter spec must be an mx.Module subclass (it selects the variables "
            f"inside such modules), got {spec.__name__}. Pass a layer class such as "
            f"mx.LayerNorm, or a predicate fn(path, info) -> bool."
        )
    if isinstance(spec, (tuple, list)):
        return any_of(*cast("Iterable[Spec]", spec))
    if callable(spec):
        return _Predicate(spec)
    raise errors.FilterError(
        f"A filter spec is a path glob (str), a module class, mx.filters.tag(...), a predicate "
        f"fn(path, info) -> bool, or a tuple/list of those; got {type(spec).__name__} "
        f"{spec!r:.60}."
    )


def path(pattern: str) -> Filter:
    """Select the variables whose path, or a prefix of it, matches the glob ``pattern``.

    A plain string spec means the same. Parts are joined by ``/``; ``*``, ``?`` and ``[...]``
    match within one level, and a part ``**`` matches any number of levels (none included).

    Example:
        >>> import metoryx as mx
        >>> f = mx.filters.path("params/**/kernel")
        >>> f(("params", "encoder", "fc", "kernel"), None), f(("params", "fc", "bias"), None)
        (True, False)
    """
    problem = glob_problem(pattern)
    if problem:
        raise errors.FilterError(f"Bad path glob: {problem}.")
    return _Glob(pattern, glob_matcher(pattern, prefix=True))


def collection(*names: str) -> Filter:
    """Select the variables of the named collections (``"params"``, ``"batch_stats"``).

    Example:
        >>> import metoryx as mx
        >>> mx.filters.collection("batch_stats")(("batch_stats", "bn", "mean"), None)
        True
    """
    return _Collection(_names("collection", names))


def tag(*names: str) -> Filter:
    """Select the variables that carry any of the tags ``names`` (needs the variable info).

    Tag variables in the definition world with :func:`metoryx.tag`, :func:`metoryx.freeze`,
    ``mx.Parameter(..., tags=...)`` or ``layer.kernel.tags = (...)``.

    Example:
        >>> import jax, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(2, 3), mx.Dense(3, 1))
        >>> _ = mx.tag(model.layers[0], "backbone")
        >>> variables = mx.init(model)(jax.random.key(0))
        >>> picked = mx.filter(variables, mx.filters.tag("backbone"), mx.variable_info(model))
        >>> jax.tree.map(lambda a: a.shape, picked)
        {'params': {'layers': {'0': {'bias': (3,), 'kernel': (2, 3)}}}}
    """
    return _Tag(_names("tag", names))


def any_of(*specs: Spec) -> Filter:
    """Select what any of ``specs`` selects (a tuple of specs means the same).

    Example:
        >>> import metoryx as mx
        >>> mx.filters.any_of("params/head", mx.filters.tag("lora"))
        any_of(path('params/head'), tag('lora'))
    """
    return _AnyOf(_members("any_of", specs))


def all_of(*specs: Spec) -> Filter:
    """Select what every one of ``specs`` selects.

    Example:
        >>> import metoryx as mx
        >>> f = mx.filters.all_of("params", mx.filters.path("**/kernel"))
        >>> f(("params", "fc", "kernel"), None), f(("params", "fc", "bias"), None)
        (True, False)
    """
    return _AllOf(_members("all_of", specs))


def not_(spec: Spec) -> Filter:
    """Select what ``spec`` does not.

    Example:
        >>> import metoryx as mx
        >>> mx.filters.not_("params")(("batch_stats", "bn", "mean"), None)
        True
    """
    return _Not(as_filter(spec))


def _names(kind: str, names: tuple[Any, ...]) -> tuple[str, ...]:
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise errors.FilterError(
            f"mx.filters.{kind} takes one or more non-empty names (str), got "
            f"{', '.join(map(repr, names)) or 'none'}."
        )
    return tuple(names)


def _members(kind: str, specs: tuple[Spec, ...]) -> tuple[Filter, ...]:
    if not specs:
        raise errors.FilterError(
            f"mx.filters.{kind} needs at least one spec: with none it would select "
            f"{'nothing' if kind == 'any_of' else 'everything'}, which is never meant."
        )
    return tuple(as_filter(s) for s in specs)


def _documented(spec: Filter, doc: str) -> Filter:
    object.__setattr__(spec, "__doc__", doc)  # what help() and inspect.getdoc show
    return spec


frozen = _documented(
    tag(FROZEN),
    """The variables :func:`metoryx.freeze` tagged: ``mx.filters.tag("frozen")``.

    Example:
        >>> import metoryx as mx
        >>> mx.filters.frozen
        tag('frozen')
    """,
)

trainable = _documented(
    all_of("params", not_(frozen)),
    """What an optimizer trains by default: the ``"params"`` collection minus frozen variables.

    Example:
        >>> import metoryx as mx
        >>> mx.filters.trainable
        all_of(path('params'), not_(tag('frozen')))
    """,
)


# ---------------------------------------------------------------------------------------------
# Applying a filter to a variables tree.


def _infos_of(tree: Mapping[str, Any], info: Any, needs_info: bool) -> list[tuple[Path, Any]]:
    """Each leaf path of ``tree`` with its VariableInfo from ``info`` (None without info)."""
    paths = list(flatten_variables(tree))
    if info is None:
        if needs_info:
            raise errors.FilterError(
                "This filter selects by tag or module type, which the arrays do not carry: "
                "pass the variable info too, e.g. mx.filter(variables, spec, "
                "mx.variable_info(model))."
            )
        return [(p, None) for p in paths]
    if not isinstance(info, Mapping):
        raise errors.FilterError(
            f"`info` must be the tree mx.variable_info(model) returns, got {type(info).__name__}."
        )
    known = flatten_variables(cast("Mapping[str, Any]", info))
    unknown = [path_str(p) for p in paths if not isinstance(known.get(p), VariableInfo)]
    if unknown:
        raise errors.FilterError(
            f"`info` has no record for {len(unknown)} path(s) of the tree: "
            f"{', '.join(unknown[:8])}{', ...' if len(unknown) > 8 else ''}. Pass the info of "
            f"the model these variables belong to, and the variables dict with its collection "
            f"level ({{'params': ...}}, not variables['params'])."
        )
    return [(p, known[p]) for p in paths]


def _check_tree(tree: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(tree, Mapping):
        raise errors.FilterError(
            f"{what}: expected a variables dict (nested dicts of arrays, as init_fn returns), "
            f"got {type(tree).__name__}."
        )
    return cast("Mapping[str, Any]", tree)


def _selector(tree: Mapping[str, Any], spec: Spec, info: Any, what: str) -> set[Path]:
    """The paths of ``tree`` that ``spec`` selects; an error with near misses for none."""
    compiled = as_filter(spec)
    infos = _infos_of(tree, info, compiled.needs_info)
    chosen = {p for p, i in infos if compiled(p, i)}
    if not chosen:
        raise errors.NoMatchError(
            f"{what}: the filter {compiled!r} selects none of the {len(infos)} variables. "
            f"{compiled.hint(infos)}"
        )
    return chosen


def _split(
    node: Mapping[Any, Any], prefix: Path, chosen: set[Path]
) -> tuple[dict[Any, Any], dict[Any, Any]]:
    selected: dict[Any, Any] = {}
    rest: dict[Any, Any] = {}
    for key, value in node.items():
        here = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            inner, other = _split(cast("Mapping[Any, Any]", value), here, chosen)
            if inner:
                selected[key] = inner
            if other:
                rest[key] = other
        elif isinstance(value, Mapping):
            rest[key] = {}  # an empty dict matches no variable; kept so combine restores it
        else:
            (selected if here in chosen else rest)[key] = value
    return selected, rest


def partition(
    variables: Mapping[str, Any], spec: Spec, info: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``variables`` into ``(selected, rest)``, two nested dicts of the same arrays.

    Each part holds only its own arrays, no placeholders: differentiate or optimize one part
    and JAX and optax never see the other. :func:`combine` puts them back exactly.

    Args:
        variables: a variables dict (or any tree of the same paths: gradients, a sub-tree
            chosen before).
        spec: a filter spec (see :mod:`metoryx.filters`).
        info: ``mx.variable_info(model)``; needed when the spec selects by tag or module type.

    Returns:
        ``(selected, rest)``.

    Raises:
        NoMatchError: when the spec selects no variable (the message lists near misses).
        FilterError: when the spec is malformed, or needs ``info`` that was not given.

    Example:
        >>> import jax, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(2, 3), mx.BatchNorm(3))
        >>> variables = mx.init(model)(jax.random.key(0))
        >>> params, rest = mx.partition(variables, "params")
        >>> sorted(params), sorted(rest)
        (['params'], ['batch_stats'])
        >>> mx.combine(params, rest) == variables
        True
    """
    tree = _check_tree(variables, "mx.partition")
    chosen = _selector(tree, spec, info, "mx.partition")
    return _split(tree, (), chosen)


def filter(variables: Mapping[str, Any], spec: Spec, info: Any = None) -> dict[str, Any]:  # noqa: A001
    """The part of ``variables`` that ``spec`` selects: ``partition(variables, spec, info)[0]``.

    Args:
        variables: a variables dict (or any tree of the same paths).
        spec: a filter spec (see :mod:`metoryx.filters`).
        info: ``mx.variable_info(model)``; needed when the spec selects by tag or module type.

    Raises:
        NoMatchError: when the spec selects no variable (the message lists near misses).
        FilterError: when the spec is malformed, or needs ``info`` that was not given.

    Example:
        >>> import jax, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(2, 3), mx.LayerNorm(3))
        >>> variables = mx.init(model)(jax.random.key(0))
        >>> kernels = mx.filter(variables, "params/**/kernel")
        >>> jax.tree.map(lambda a: a.shape, kernels)
        {'params': {'layers': {'0': {'kernel': (2, 3)}}}}
        >>> norms = mx.filter(variables, mx.LayerNorm, mx.variable_info(model))
        >>> sorted(norms["params"]["layers"]["1"])
        ['bias', 'scale']
    """
    tree = _check_tree(variables, "mx.filter")
    chosen = _selector(tree, spec, info, "mx.filter")
    return _split(tree, (), chosen)[0]


def combine(*parts: Any) -> dict[str, Any]:
    """Merge disjoint parts of a variables dict back into one: the inverse of :func:`partition`.

    Exact and lossless: every array comes back as the same object at its path. No input is
    modified.

    Raises:
        VariablesStructureError: when two parts hold the same path, or one holds an array
            where another holds a dict; the message names every such path.

    Example:
        >>> import jax, metoryx as mx
        >>> variables = mx.init(mx.Dense(2, 3))(jax.random.key(0))
        >>> kernel, bias = mx.partition(variables, "params/kernel")
        >>> mx.combine(kernel, bias) == variables
        True
    """
    clashes: list[str] = []
    merged: dict[Any, Any] = {}
    for i, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise errors.VariablesStructureError(
                f"mx.combine: part {i} is a {type(part).__name__}; every part must be a nested "
                f"dict such as mx.partition returns."
            )
        _merge(merged, cast("Mapping[Any, Any]", part), (), clashes)
    if clashes:
        shown = ", ".join(clashes[:10]) + (", ..." if len(clashes) > 10 else "")
        raise errors.VariablesStructureError(
            f"mx.combine: the parts overlap at {len(clashes)} path(s): {shown}. Combine parts "
            f"of one partition (each path in exactly one part)."
        )
    return merged


def _merge(into: dict[Any, Any], part: Mapping[Any, Any], prefix: Path, clashes: list[str]) -> None:
    for key, value in part.items():
        here = (*prefix, str(key))
        if isinstance(value, Mapping):
            inner = cast("Mapping[Any, Any]", value)
            target = into.setdefault(key, {})
            if isinstance(target, dict):
                _merge(cast("dict[Any, Any]", target), inner, here, clashes)
            else:
                clashes.append(f"{path_str(here)} (an array in one part, a dict in another)")
        elif key in into:
            kind = "a dict in one part" if isinstance(into[key], dict) else "in two parts"
            clashes.append(f"{path_str(here)} ({kind})")
        else:
            into[key] = value


def optax_labels(
    info: Mapping[str, Any], labels: Mapping[str, Spec], default: str | None = None
) -> Callable[[Any], Any]:
    """The ``param_labels`` of ``optax.multi_transform``: a label per variable, by filter.

    Each variable gets the label whose spec selects it, or ``default``. The result is a
    function from a tree of the model's paths (the whole variables dict, or the trainable part
    of a partition) to the same tree of label strings, which is what ``multi_transform``
    accepts, so the same labels serve any part the optimizer is given.

    Args:
        info: ``mx.variable_info(model)``.
        labels: ``{label: spec}``, e.g. ``{"lora": mx.filters.tag("lora"), "head":
            "params/head"}``; every spec must select at least one variable.
        default: the label of the variables no spec selects; None makes those an error.

    Raises:
        NoMatchError: when a spec selects nothing.
        FilterError: when two labels select the same variable, or a variable has no label and
            there is no default.

    Example:
        >>> import jax, optax, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(2, 3), mx.Dense(3, 1))
        >>> variables = mx.init(model)(jax.random.key(0))
        >>> labels = mx.optax_labels(mx.variable_info(model), {"head": "params/layers/1"},
        ...                          default="body")
        >>> labels(variables)["params"]["layers"]["1"]["kernel"]
        'head'
        >>> optimizer = optax.multi_transform(
        ...     {"head": optax.adam(1e-3), "body": optax.sgd(1e-4)}, labels)
        >>> state = optimizer.init(variables)
    """
    tree = _check_tree(info, "mx.optax_labels")
    if not isinstance(labels, Mapping) or any(not isinstance(k, str) for k in labels):
        raise errors.FilterError(
            f"mx.optax_labels: `labels` must be a dict {{label (str): spec}}, got "
            f"{type(labels).__name__} {labels!r:.60}."
        )
    if default is not None and not isinstance(default, str):
        raise errors.FilterError(
            f"mx.optax_labels: `default` must be a label (str) or None, got {default!r:.40}."
        )
    chosen = {
        label: _selector(tree, spec, tree, f"mx.optax_labels, label {label!r}")
        for label, spec in labels.items()
    }
    label_of: dict[Path, str] = {}
    overlaps: list[str] = []
    for label, paths in chosen.items():
        for p in paths:
            if p in label_of:
                overlaps.append(f"{path_str(p)} ({label_of[p]!r} and {label!r})")
            label_of[p] = label
    if overlaps:
        raise errors.FilterError(
            f"mx.optax_labels: {len(overlaps)} variable(s) have two labels: "
            f"{', '.join(overlaps[:8])}. Make the specs disjoint, e.g. with mx.filters.not_."
        )

    def param_labels(params: Any) -> Any:
        flat = flatten_variables(_check_tree(params, "mx.optax_labels' labels function"))
        unlabelled = [path_str(p) for p in flat if p not in label_of and default is None]
        if unlabelled:
            raise errors.FilterError(
                f"mx.optax_labels: no label selects {len(unlabelled)} variable(s): "
                f"{', '.join(unlabelled[:8])}. Add a spec for them or pass `default=`."
            )
        return _relabel(cast("Mapping[Any, Any]", params), (), label_of, default)

    return param_labels


def _relabel(node: Mapping[Any, Any], prefix: Path, label_of: dict[Path, str], default: Any) -> Any:
    out: dict[Any, Any] = {}
    for key, value in node.items():
        here = (*prefix, str(key))
        if isinstance(value, Mapping):
            out[key] = _relabel(cast("Mapping[Any, Any]", value), here, label_of, default)
        else:
            out[key] = label_of.get(here, default)
    return out
