"""Lifted transformations: JAX's transformations over modules that hold variables.

``mx.checkpoint``, ``mx.Repeat``, ``mx.scan``, ``mx.vmap``, ``mx.cond``/``mx.switch`` and
``mx.stack``/``mx.unstack``; see ``metoryx/_core/lifting.py`` for how State, random keys and
sown values cross the transformation's boundary.
"""
