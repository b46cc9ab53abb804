"""Moving weights between metoryx and other libraries.

:mod:`metoryx.interop.torch` reads and writes PyTorch ``state_dict`` s. How a layer's variables
correspond to a PyTorch module's entries is described by the layer itself, in the terms of
:mod:`metoryx.layout` (``mx.layout``), which sits below the layers; this package sits above them.

Example:
    >>> import metoryx as mx
    >>> [c.torch_keys for c in mx.layout.torch_conversions(mx.LayerNorm(4))]
    [('weight',), ('bias',)]
"""

from metoryx.interop import torch as torch

__all__ = ["torch"]
