"""metoryx: PyTorch's way of building models, JAX's way of running them.

Build a model as a plain mutable object, then ``mx.transform(model)`` snapshots it into two pure
functions, ``init_fn(key) -> variables`` and ``apply_fn(variables, rngs, *args, **kwargs) ->
(output, new_variables)``, that every JAX transformation sees through.

Example:
    >>> import jax, jax.numpy as jnp, metoryx as mx
    >>> init_fn, apply_fn = mx.transform(mx.Dense(3, 2))
    >>> y, _ = apply_fn(init_fn(jax.random.key(0)), None, jnp.ones((1, 3)))
    >>> y.shape
    (1, 2)
"""

from metoryx import errors, filters, initializers, interop, layout, lift, nn
from metoryx._core.assign import assign_variables
from metoryx._core.info import VariableInfo, variable_info
from metoryx._core.module import Module
from metoryx._core.override import overridden
from metoryx._core.rng import PRNGKeys, next_rng_key
from metoryx._core.transform import Transformed, apply, init, transform
from metoryx._core.variables import Parameter, State, Variable
from metoryx.filters import combine, filter, optax_labels, partition
from metoryx.intermediates import capture, sow
from metoryx.lift.branch import cond, switch
from metoryx.lift.checkpoint import checkpoint
from metoryx.lift.scan import Repeat, scan
from metoryx.lift.stacking import stack, unstack
from metoryx.lift.vmap import vmap
from metoryx.lora import LoRA, lora, merge_lora
from metoryx.nn._compute import layer_training
from metoryx.nn.activations import (
    PReLU,
    celu,
    elu,
    gelu,
    glu,
    hard_tanh,
    leaky_relu,
    log_sigmoid,
    log_softmax,
    relu,
    relu6,
    selu,
    sigmoid,
    silu,
    softmax,
    softplus,
    swish,
    tanh,
)
from metoryx.nn.attention import MultiHeadAttention, RotaryEmbedding, dot_product_attention
from metoryx.nn.attention_layout import AttentionLayout
from metoryx.nn.containers import MLP, Flatten, Identity, Lambda, Sequential
from metoryx.nn.conv import Conv, ConvTranspose
from metoryx.nn.dropout import Dropout, dropout
from metoryx.nn.linear import Dense, Einsum, Embed
from metoryx.nn.mode import set_training
from metoryx.nn.normalization import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from metoryx.nn.pooling import adaptive_avg_pool, avg_pool, global_avg_pool, max_pool, min_pool
from metoryx.nn.positional import apply_rotary, rotary_frequencies, sinusoidal_embedding
from metoryx.nn.recurrent import (
    RNN,
    Bidirectional,
    GRUCell,
    LSTMCell,
    SimpleRNNCell,
    StackedRNN,
)
from metoryx.nn.reparametrization import SpectralNorm, WeightNorm
from metoryx.precision import Policy, set_precision
from metoryx.saving import load, save
from metoryx.summary import Summary, SummaryRow, summary
from metoryx.surgery import modules, replace
from metoryx.tagging import freeze, tag, unfreeze, untag

__version__ = "0.1.0"

__all__ = [
    "AttentionLayout",
    "BatchNorm",
    "Bidirectional",
    "Conv",
    "ConvTranspose",
    "Dense",
    "Dropout",
    "Einsum",
    "Embed",
    "Flatten",
    "GRUCell",
    "GroupNorm",
    "Identity",
    "InstanceNorm",
    "LSTMCell",
    "Lambda",
    "LayerNorm",
    "LoRA",
    "MLP",
    "Module",
    "MultiHeadAttention",
    "PRNGKeys",
    "PReLU",
    "Parameter",
    "Policy",
    "RMSNorm",
    "RNN",
    "Repeat",
    "RotaryEmbedding",
    "Sequential",
    "SimpleRNNCell",
    "SpectralNorm",
    "StackedRNN",
    "State",
    "Summary",
    "SummaryRow",
    "Transformed",
    "Variable",
    "VariableInfo",
    "WeightNorm",
    "adaptive_avg_pool",
    "apply",
    "apply_rotary",
    "assign_variables",
    "avg_pool",
    "capture",
    "celu",
    "checkpoint",
    "combine",
    "cond",
    "dot_product_attention",
    "dropout",
    "elu",
    "errors",
    "filter",
    "filters",
    "freeze",
    "gelu",
    "global_avg_pool",
    "glu",
    "hard_tanh",
    "init",
    "initializers",
    "interop",
    "layer_training",
    "layout",
    "leaky_relu",
    "lift",
    "load",
    "log_sigmoid",
    "log_softmax",
    "lora",
    "max_pool",
    "merge_lora",
    "min_pool",
    "modules",
    "next_rng_key",
    "nn",
    "optax_labels",
    "overridden",
    "partition",
    "relu",
    "relu6",
    "replace",
    "rotary_frequencies",
    "save",
    "scan",
    "selu",
    "set_precision",
    "set_training",
    "sigmoid",
    "silu",
    "sinusoidal_embedding",
    "softmax",
    "softplus",
    "sow",
    "stack",
    "summary",
    "swish",
    "switch",
    "tag",
    "tanh",
    "transform",
    "unfreeze",
    "unstack",
    "untag",
    "variable_info",
    "vmap",
]
