"""Layers and layer functions, one topic per file.

Every public name here is also at the top level, which is the spelling the documentation uses
(``mx.Dense``); ``mx.nn`` lists the layers alone, for browsing and completion.

Example:
    >>> import metoryx as mx
    >>> mx.nn.Dense is mx.Dense
    True
    >>> "MultiHeadAttention" in mx.nn.__all__
    True
"""

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
    "MLP",
    "MultiHeadAttention",
    "PReLU",
    "RMSNorm",
    "RNN",
    "RotaryEmbedding",
    "Sequential",
    "SimpleRNNCell",
    "SpectralNorm",
    "StackedRNN",
    "WeightNorm",
    "adaptive_avg_pool",
    "apply_rotary",
    "avg_pool",
    "celu",
    "dot_product_attention",
    "dropout",
    "elu",
    "gelu",
    "global_avg_pool",
    "glu",
    "hard_tanh",
    "layer_training",
    "leaky_relu",
    "log_sigmoid",
    "log_softmax",
    "max_pool",
    "min_pool",
    "relu",
    "relu6",
    "rotary_frequencies",
    "selu",
    "set_training",
    "sigmoid",
    "silu",
    "sinusoidal_embedding",
    "softmax",
    "softplus",
    "swish",
    "tanh",
]
