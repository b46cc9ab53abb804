"""Lifted transformations: JAX's transformations over modules that hold variables.

``mx.checkpoint``, ``mx.Repeat``, ``mx.scan``, ``mx.vmap``, ``mx.cond``/``mx.switch`` and
``mx.stack``/``mx.unstack``; see ``metoryx/_core/lifting.py`` for how State, random keys and
sown values cross the transformation's boundary. Every name here is also at the top level,
which is the spelling the documentation uses.

Example:
    >>> import metoryx as mx
    >>> mx.lift.Repeat is mx.Repeat
    True
"""

from metoryx.lift.branch import cond, switch
from metoryx.lift.checkpoint import checkpoint
from metoryx.lift.scan import Repeat, scan
from metoryx.lift.stacking import stack, unstack
from metoryx.lift.vmap import vmap

__all__ = ["Repeat", "checkpoint", "cond", "scan", "stack", "switch", "unstack", "vmap"]
