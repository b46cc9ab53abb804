"""Checks of the configuration arguments that layers and lifted wrappers share."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from metoryx import errors


def bool_argument(where: str, name: str, value: Any) -> bool:
    """``value`` as a Python bool if it is one (or a NumPy bool), else a LayerConfigError.

    A flag such as ``use_bias`` decides what a layer builds; Python's truthiness would take
    ``use_bias="no"`` for True and ``use_bias=None`` for False, silently.

    Example:
        >>> from metoryx._core.arguments import bool_argument
        >>> bool_argument("Dense", "use_bias", True)
        True
    """
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(cast("np.bool_[Any]", value))
    raise errors.LayerConfigError(
        f"{where}: `{name}` must be True or False, got {type(value).__name__} {value!r:.40}. "
        f"Pass {name}=True or {name}=False."
    )
