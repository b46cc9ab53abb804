"""Training or evaluation mode per layer: :func:`set_training`, PyTorch's ``module.train(mode)``
for a whole sub-tree of the definition world."""

from __future__ import annotations

from typing import TypeVar

from metoryx import errors
from metoryx._core.module import Module
from metoryx._core.paths import path_str
from metoryx._core.tree import walk
from metoryx.nn._compute import bad_training_switch

_M = TypeVar("_M", bound=Module)


def set_training(module: _M, training: bool | None) -> _M:
    """Sets the ``training`` switch of every layer in ``module`` that has one, in place.

    A layer that behaves differently in training (:class:`~metoryx.BatchNorm`,
    :class:`~metoryx.Dropout`, :class:`~metoryx.MultiHeadAttention`, :class:`~metoryx.MLP`,
    :class:`~metoryx.StackedRNN`, :class:`~metoryx.SpectralNorm`) follows the call's
    ``is_training`` while its switch is None. ``False`` puts it in evaluation mode whatever the
    call says (PyTorch's ``bn.eval()``): a BatchNorm normalizes with its running statistics and
    leaves them unchanged, a dropout keeps everything. ``True`` makes it train even in calls
    with ``is_training=False``. ``None`` restores "follow the call".

    This is how a frozen backbone keeps its statistics while the head's dropout still trains:
    ``mx.set_training(model.backbone, False)``, then call with ``is_training=True``. The walk
    reaches every layer below ``module``: sub-modules of your own classes, lists and dicts of
    them, and the layers inside ``mx.Repeat`` and the other lifted wrappers (a shared layer
    once). Set the switch before ``mx.transform``: the snapshot keeps the mode it finds, and a
    compiled call pays nothing for it. A layer of your own opts in with the class attribute
    ``training: bool | None = None`` and :func:`~metoryx.layer_training`.

    Args:
        module: the model or the part of it to set (the definition world, not a snapshot).
        training: None (follow the call's ``is_training``), True (always train) or False
            (always evaluate).

    Returns:
        ``module`` itself, changed in place.

    Raises:
        LayerConfigError: if ``training`` is not None, True or False, or ``module`` holds no
            layer with a switch (nothing would change: usually the wrong part of the model).
        ModuleStructureError: if ``module`` is not a module, or its tree cannot be walked.

    Example:
        >>> import metoryx as mx
        >>> class Net(mx.Module):
        ...     def __init__(self):
        ...         self.backbone = mx.Sequential(mx.Dense(4, 8), mx.BatchNorm(8))
        ...         self.head = mx.Sequential(mx.Dropout(0.5), mx.Dense(8, 2))
        >>> model = Net()
        >>> mx.set_training(model.backbone, False).layers[1].training
        False
        >>> model.head.layers[0].training is None  # still follows the call
        True
    """
    if training is not None and training is not True and training is not False:
        raise errors.LayerConfigError(
            f"mx.set_training: {bad_training_switch(training)} Pass "
            f"mx.set_training(module, False) for evaluation mode."
        )
    modules = walk(module).modules
    switched = [layer for _, layer in modules if hasattr(type(layer), "training")]
    if not switched:
        held = ", ".join(
            f"{type(layer).__name__} at {path_str(path)!r}" if path else type(layer).__name__
            for path, layer in modules[:6]
        )
        more = f" and {len(modules) - 6} more" if len(modules) > 6 else ""
        raise errors.LayerConfigError(
            f"mx.set_training: no layer in this {type(module).__name__} has a training switch "
            f"(it holds {held}{more}), so nothing would change. The switch belongs to layers "
            f"that behave differently in training (e.g. mx.BatchNorm, mx.Dropout, "
            f"mx.MultiHeadAttention): pass the part of the model that holds them. A layer of "
            f"your own opts in with the class attribute `training: bool | None = None` and "
            f"mx.layer_training(self, is_training) in its __call__."
        )
    for layer in switched:
        layer.training = training
    return module
