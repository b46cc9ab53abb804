"""The models the benchmarks train, written once per library, each built the same way.

Three models:

- ``gpt``: a small GPT (token and learned positional embeddings, ``n`` pre-LayerNorm blocks of
  causal multi-head self-attention and a 4x GELU MLP, a final LayerNorm, a Dense head to the
  vocabulary), the model of ``bench_deep.py``; its blocks unrolled (a Python loop) or stacked
  (one scan over layers), each block rematerialized in the backward pass or not.
- ``convnet``: the digits ConvNet of ``examples/train_digits.py`` (two 3x3 convolutions with
  ReLU and 2x2 max pooling, dropout, two Dense layers) on 8x8x1 images, batch 64.
- ``resnet``: a ResNet-18-style network, basic blocks ``[2, 2, 2, 2]`` of widths 16-32-64-128
  (a 3x3 stem, no max pooling, 1x1 projection shortcuts where the shape changes), BatchNorm in
  training mode, global average pooling, on 32x32x3 images, batch 16.

And five ways of writing each (``LIBRARIES``): ``"metoryx"``, ``"jax"`` (hand-written: plain
``jnp``/``lax`` functions on a dict of arrays, in metoryx's variable layout), and the peers
where installed, ``"linen"`` (Flax Linen), ``"nnx"`` (Flax NNX, its documented fast path for
small models: ``nnx.split`` once outside, ``nnx.merge`` inside a plain ``jax.jit``, so no graph
traversal per call) and ``"equinox"``. Each peer uses its own layers written its own idiomatic
way (Equinox layers are unbatched and ``jax.vmap``-ed, channels first; Flax's BatchNorm keeps
its default one-pass variance).

Every builder returns a :class:`Built`: trainable ``params``, the other ``state`` (BatchNorm
running statistics, ``{}`` if none), a pure ``forward(params, state, rng, x) -> (logits,
new_state)`` in training mode, and the batch ``(x, y)`` in the library's input layout.
:func:`make_train_step` turns it into the jitted train step the benchmarks time.

``reference=`` makes a builder start from the weights of :func:`reference_params` (metoryx's
``init_fn``, unrolled layout), converted to its own layout, so that all libraries compute the
same first-step loss; without it each library uses its own initializers.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp
import optax
from jax import lax

import metoryx as mx


def _optional(name: str) -> Any:
    """The module ``name``, or None where it is not installed (the peers are optional)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


if TYPE_CHECKING:
    import equinox as eqx
    import flax
    from flax import linen as nn
    from flax import nnx
else:
    flax, nn, nnx, eqx = (_optional(n) for n in ("flax", "flax.linen", "flax.nnx", "equinox"))

LIBRARIES = ("metoryx", "jax") + (("linen", "nnx") if flax else ()) + (("equinox",) if eqx else ())
MODELS = ("gpt", "convnet", "resnet")
PEER_MODULES = tuple(m for m in (flax, eqx) if m is not None)
KEY = jax.random.key(0)
LN_EPSILON = 1e-5  # all sides: Flax's default is 1e-6
BN_MOMENTUM = 0.9  # weight of the old running statistics (PyTorch's 0.1)
BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class Shape:
    """The GPT's sizes."""

    d_model: int
    heads: int
    batch: int
    seq: int
    vocab: int = 256

    def __str__(self) -> str:
        return (
            f"d_model {self.d_model}, {self.heads} heads, batch {self.batch}, seq {self.seq}, "
            f"vocab {self.vocab}"
        )


GPT_SHAPE = Shape(d_model=64, heads=4, batch=8, seq=32)
GPT_BLOCKS = 12
CONVNET_BATCH, CONVNET_IMAGE = 64, (8, 8, 1)
RESNET_BATCH, RESNET_IMAGE = 16, (32, 32, 3)
RESNET_WIDTHS, RESNET_DEPTHS = (16, 32, 64, 128), (2, 2, 2, 2)
CLASSES = 10

Forward = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass
class Built:
    """One model in one library: what the train step needs.

    Attributes:
        library: one of ``LIBRARIES``.
        params: the trainable arrays (a PyTree).
        state: the rest of the variables, updated by each step (``{}`` if none).
        forward: ``(params, state, rng, x) -> (logits, new_state)``, training mode.
        x: the input batch, in the library's layout.
        y: the integer labels (next tokens for the GPT).
    """

    library: str
    params: Any
    state: Any
    forward: Forward
    x: jax.Array
    y: jax.Array


def make_train_step(forward: Forward, optimizer: optax.GradientTransformation) -> Callable:
    """A new (unjitted) train step: ``(params, state, opt_state, rng, x, y) -> (params, state,
    opt_state, loss)``, the mean softmax cross-entropy, ``value_and_grad``, the optimizer update
    and ``optax.apply_updates``. A fresh function object each call."""

    def train_step(params, state, opt_state, rng, x, y):
        def loss_fn(p):
            logits, new_state = forward(p, state, rng, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, new_state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return train_step


def loss_of(built: Built, rng: jax.Array = KEY) -> float:
    """The loss of one forward pass (training mode) at the built weights, jitted."""

    def loss(params, state, x, y):
        logits, _ = built.forward(params, state, rng, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return float(jax.jit(loss)(built.params, built.state, built.x, built.y))


def batch(model: str) -> tuple[jax.Array, jax.Array]:
    """The common batch of ``model``: channels-last images and labels, or token ids and the
    next tokens."""
    data_key, label_key = jax.random.split(jax.random.key(42))
    if model == "gpt":
        s = GPT_SHAPE
        tokens = jax.random.randint(data_key, (s.batch, s.seq + 1), 0, s.vocab)
        return tokens[:, :-1], tokens[:, 1:]
    size, image = {
        "convnet": (CONVNET_BATCH, CONVNET_IMAGE),
        "resnet": (RESNET_BATCH, RESNET_IMAGE),
    }[model]
    x = jax.random.normal(data_key, (size, *image))
    return x, jax.random.randint(label_key, (size,), 0, CLASSES)


def build(model: str, library: str, reference: Any = None, **options: Any) -> Built:
    """``model`` (one of ``MODELS``) written with ``library`` (one of ``LIBRARIES``).

    ``options``: for the GPT ``n`` (blocks), ``scan`` (stacked blocks applied by one scan) and
    ``remat`` (each block rematerialized); for the ConvNet ``dropout`` (the rate, 0.5 as in the
    example). ``reference``: metoryx-layout params to start from (see
    :func:`reference_params`, the unrolled layout also for a stacked GPT)."""
    if library not in LIBRARIES:
        raise ValueError(f"library {library!r} is not installed; available: {LIBRARIES}")
    return _BUILDERS[model][library](reference=reference, **options)


def reference_params(model: str, **options: Any) -> Any:
    """metoryx's initial params of ``model`` from ``KEY``, the unrolled layout for the GPT."""
    if model == "gpt":
        options = {"n": options.get("n", GPT_BLOCKS)}
    return build(model, "metoryx", **options).params


# =============================================================================================
# metoryx


class Block(mx.Module):
    """A pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = mx.LayerNorm(d)
        self.attn = mx.MultiHeadAttention(heads, d)
        self.ln2 = mx.LayerNorm(d)
        self.fc1 = mx.Dense(d, 4 * d)
        self.fc2 = mx.Dense(4 * d, d)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), is_causal=True)
        return x + self.fc2(mx.gelu(self.fc1(self.ln2(x))))


LAYOUTS = ("unrolled", "checkpointed", "repeat", "repeat remat")


class GPT(mx.Module):
    """Embeddings, ``n`` blocks in one of ``LAYOUTS``, a final LayerNorm and the head."""

    blocks: Any  # a list of blocks, or one mx.Repeat

    def __init__(self, shape: Shape, n: int, layout: str):
        super().__init__()
        d = shape.d_model
        self.tokens = mx.Embed(shape.vocab, d)
        self.positions = mx.Embed(shape.seq, d)

        def block() -> Block:
            return Block(d, shape.heads)

        self.stacked = layout.startswith("repeat")
        if layout == "unrolled":
            self.blocks = [block() for _ in range(n)]
        elif layout == "checkpointed":
            self.blocks = [mx.checkpoint(block()) for _ in range(n)]
        else:
            self.blocks = mx.Repeat(block, n, remat=layout == "repeat remat")
        self.ln_f = mx.LayerNorm(d)
        self.head = mx.Dense(d, shape.vocab)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.tokens(ids) + self.positions(jnp.arange(ids.shape[-1]))
        if self.stacked:
            x = self.blocks(x)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(self.ln_f(x))


def gpt_layout(scan: bool, remat: bool) -> str:
    """The ``GPT`` layout of the stacked/rematerialized options."""
    return {
        (False, False): "unrolled",
        (False, True): "checkpointed",
        (True, False): "repeat",
        (True, True): "repeat remat",
    }[scan, remat]


class ConvNet(mx.Module):
    """The ConvNet of ``examples/train_digits.py``."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.conv1 = mx.Conv(1, 32, kernel_size=(3, 3))
        self.conv2 = mx.Conv(32, 64, kernel_size=(3, 3))
        self.fc1 = mx.Dense(2 * 2 * 64, 128)
        self.fc2 = mx.Dense(128, CLASSES)
        self.dropout = dropout

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        x = mx.max_pool(mx.relu(self.conv1(x)), kernel_size=(2, 2), strides=(2, 2))
        x = mx.max_pool(mx.relu(self.conv2(x)), kernel_size=(2, 2), strides=(2, 2))
        x = mx.dropout(x.reshape((x.shape[0], -1)), self.dropout, is_training=is_training)
        return self.fc2(mx.relu(self.fc1(x)))


class BasicBlock(mx.Module):
    """Two 3x3 convolutions with BatchNorm, and the (projected) shortcut."""

    def __init__(self, in_size: int, out_size: int, stride: int):
        super().__init__()
        self.conv1 = mx.Conv(in_size, out_size, (3, 3), strides=stride, padding=1, use_bias=False)
        self.bn1 = mx.BatchNorm(out_size, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        self.conv2 = mx.Conv(out_size, out_size, (3, 3), padding=1, use_bias=False)
        self.bn2 = mx.BatchNorm(out_size, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        self.project = stride != 1 or in_size != out_size
        if self.project:
            self.shortcut = mx.Conv(
                in_size, out_size, (1, 1), strides=stride, padding=0, use_bias=False
            )
            self.shortcut_bn = mx.BatchNorm(out_size, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        y = mx.relu(self.bn1(self.conv1(x), is_training))
        y = self.bn2(self.conv2(y), is_training)
        if self.project:
            x = self.shortcut_bn(self.shortcut(x), is_training)
        return mx.relu(x + y)


class ResNet(mx.Module):
    """ResNet-18-style: a 3x3 stem, four stages of basic blocks, average pooling, the head."""

    def __init__(self):
        super().__init__()
        width = RESNET_WIDTHS[0]
        self.stem = mx.Conv(RESNET_IMAGE[-1], width, (3, 3), padding=1, use_bias=False)
        self.stem_bn = mx.BatchNorm(width, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        blocks = []
        for stage, (out, depth) in enumerate(zip(RESNET_WIDTHS, RESNET_DEPTHS, strict=True)):
            for i in range(depth):
                blocks.append(BasicBlock(width, out, 2 if stage > 0 and i == 0 else 1))
                width = out
        self.blocks = blocks
        self.head = mx.Dense(width, CLASSES)

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        x = mx.relu(self.stem_bn(self.stem(x), is_training))
        for block in self.blocks:
            x = block(x, is_training)
        return self.head(mx.global_avg_pool(x, 2))


def _mx_built(model: mx.Module, name: str, reference: Any) -> Built:
    init_fn, apply_fn = mx.transform(model)
    variables = init_fn(KEY)
    params = variables.pop("params") if reference is None else reference
    variables.pop("params", None)

    def forward(params, state, rng, x):
        logits, new = apply_fn({"params": params, **state}, rng, x, is_training=True)
        return logits, {k: v for k, v in new.items() if k != "params"}

    return Built("metoryx", params, variables, forward, *batch(name))


def _mx_gpt(n: int = GPT_BLOCKS, scan: bool = False, remat: bool = False, reference=None):
    model = GPT(GPT_SHAPE, n, gpt_layout(scan, remat))
    init_fn, apply_fn = mx.transform(model)
    params = init_fn(KEY)["params"]
    if reference is not None:
        params = mx.stack(model, {"params": reference})["params"] if scan else reference

    def forward(params, state, rng, ids):
        return apply_fn({"params": params}, None, ids)[0], state

    return Built("metoryx", params, {}, forward, *batch("gpt"))


def _mx_convnet(dropout: float = 0.5, reference=None):
    return _mx_built(ConvNet(dropout), "convnet", reference)


def _mx_resnet(reference=None):
    return _mx_built(ResNet(), "resnet", reference)


# =============================================================================================
# Hand-written JAX: plain functions on metoryx's variable layout.


def _dense(p: Any, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def _layer_norm(p: Any, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + LN_EPSILON) * p["scale"] + p["bias"]


def _attention(p: Any, x: jax.Array, heads: int) -> jax.Array:
    """Causal self-attention, the projections as einsums over the kernels reshaped per head
    (a free reshape of the stored ``(d, d)`` kernels), the query scaled before the logits."""
    t, d = x.shape[-2:]
    size = d // heads

    def project(name: str) -> jax.Array:
        kernel = p[name]["kernel"].reshape(d, heads, size)
        return jnp.einsum("btd,dhk->bthk", x, kernel) + p[name]["bias"].reshape(heads, size)

    q, k, v = project("query") / math.sqrt(size), project("key"), project("value")
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(logits.dtype).min), axis=-1)
    out = jnp.einsum("bhqs,bshk->bqhk", weights, v)
    kernel = p["out"]["kernel"].reshape(heads, size, d)
    return jnp.einsum("bqhk,hkd->bqd", out, kernel) + p["out"]["bias"]


def _block(p: Any, x: jax.Array) -> jax.Array:
    x = x + _attention(p["attn"], _layer_norm(p["ln1"], x), GPT_SHAPE.heads)
    return x + _dense(p["fc2"], jax.nn.gelu(_dense(p["fc1"], _layer_norm(p["ln2"], x))))


def _jax_gpt(n: int = GPT_BLOCKS, scan: bool = False, remat: bool = False, reference=None):
    """Stacked: one ``lax.scan`` over the blocks' params stacked on a leading axis."""
    params = reference_params("gpt", n=n) if reference is None else reference
    if scan:
        blocks = [params["blocks"][str(i)] for i in range(n)]
        params = {**params, "blocks": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}
    block = jax.checkpoint(_block, prevent_cse=not scan) if remat else _block

    def forward(p, state, rng, ids):
        x = p["tokens"]["embedding"][ids] + p["positions"]["embedding"][: ids.shape[-1]]
        if scan:
            x, _ = lax.scan(lambda x, bp: (block(bp, x), None), x, p["blocks"])
        else:
            for i in range(n):
                x = block(p["blocks"][str(i)], x)
        return _dense(p["head"], _layer_norm(p["ln_f"], x)), state

    return Built("jax", params, {}, forward, *batch("gpt"))


def _conv(p: Any, x: jax.Array, stride: int = 1, padding: Any = "SAME") -> jax.Array:
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    y = lax.conv_general_dilated(
        x, p["kernel"], (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"] if "bias" in p else y


def _max_pool(x: jax.Array) -> jax.Array:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _jax_convnet(dropout: float = 0.5, reference=None):
    params = reference_params("convnet") if reference is None else reference

    def forward(p, state, rng, x):
        x = _max_pool(jax.nn.relu(_conv(p["conv1"], x)))
        x = _max_pool(jax.nn.relu(_conv(p["conv2"], x)))
        x = x.reshape(x.shape[0], -1)
        if dropout:
            keep = jax.random.bernoulli(rng, 1 - dropout, x.shape)
            x = jnp.where(keep, x / (1 - dropout), 0)
        return _dense(p["fc2"], jax.nn.relu(_dense(p["fc1"], x))), state

    return Built("jax", params, {}, forward, *batch("convnet"))


def _batch_norm(p: Any, s: Any, x: jax.Array) -> tuple[jax.Array, Any]:
    """Training mode: batch statistics (two passes), the running ones updated as metoryx."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    centered = x - mean
    var = jnp.square(centered).mean(axes)
    count = math.prod(x.shape[:-1])
    new = {
        "mean": BN_MOMENTUM * s["mean"] + (1 - BN_MOMENTUM) * mean,
        "var": BN_MOMENTUM * s["var"] + (1 - BN_MOMENTUM) * var * (count / (count - 1)),
    }
    return centered * (lax.rsqrt(var + BN_EPSILON) * p["scale"]) + p["bias"], new


def _resnet_strides() -> list[int]:
    return [
        2 if stage > 0 and i == 0 else 1
        for stage, depth in enumerate(RESNET_DEPTHS)
        for i in range(depth)
    ]


def _jax_resnet(reference=None):
    mx_built = _mx_resnet()
    params = mx_built.params if reference is None else reference
    strides = _resnet_strides()

    def forward(p, state, rng, x):
        s = state["batch_stats"]
        new: dict[str, Any] = {"blocks": {}}
        x, new["stem_bn"] = _batch_norm(p["stem_bn"], s["stem_bn"], _conv(p["stem"], x, 1, 1))
        x = jax.nn.relu(x)
        for i, stride in enumerate(strides):
            bp, bs, bn = p["blocks"][str(i)], s["blocks"][str(i)], {}
            y, bn["bn1"] = _batch_norm(bp["bn1"], bs["bn1"], _conv(bp["conv1"], x, stride, 1))
            y = jax.nn.relu(y)
            y, bn["bn2"] = _batch_norm(bp["bn2"], bs["bn2"], _conv(bp["conv2"], y, 1, 1))
            if "shortcut" in bp:
                shortcut = _conv(bp["shortcut"], x, stride, 0)
                x, bn["shortcut_bn"] = _batch_norm(bp["shortcut_bn"], bs["shortcut_bn"], shortcut)
            x = jax.nn.relu(x + y)
            new["blocks"][str(i)] = bn
        return _dense(p["head"], x.mean((1, 2))), {"batch_stats": new}

    return Built("jax", params, mx_built.state, forward, *batch("resnet"))


# =============================================================================================
# Flax Linen

if nn is not None:

    class LinenBlock(nn.Module):
        d: int
        heads: int

        @nn.compact
        def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            h = nn.LayerNorm(epsilon=LN_EPSILON, name="ln1")(x)
            attn = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")
            x = x + attn(h, h, mask=mask)
            h = nn.LayerNorm(epsilon=LN_EPSILON, name="ln2")(x)
            h = nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(4 * self.d, name="fc1")(h)))
            return x + h, None

    class LinenGPT(nn.Module):
        """``scan``: ``nn.scan`` over one block (``variable_axes={"params": 0}``); ``remat``:
        ``nn.remat`` of the block."""

        shape: Shape
        n: int
        remat: bool
        scan: bool = True

        @nn.compact
        def __call__(self, ids: jax.Array) -> jax.Array:
            s = self.shape
            x = nn.Embed(s.vocab, s.d_model, name="tokens")(ids)
            x = x + nn.Embed(s.seq, s.d_model, name="positions")(jnp.arange(ids.shape[-1]))
            if self.scan:
                block = nn.remat(LinenBlock, prevent_cse=False) if self.remat else LinenBlock
                blocks = nn.scan(
                    block,
                    variable_axes={"params": 0},
                    split_rngs={"params": True},
                    in_axes=nn.broadcast,  # pyright: ignore[reportArgumentType]
                    length=self.n,
                )
                x, _ = blocks(s.d_model, s.heads, name="blocks")(x, None)
            else:
                block = nn.remat(LinenBlock) if self.remat else LinenBlock
                for i in range(self.n):
                    x, _ = block(s.d_model, s.heads, name=f"blocks_{i}")(x, None)
            x = nn.LayerNorm(epsilon=LN_EPSILON, name="ln_f")(x)
            return nn.Dense(s.vocab, name="head")(x)

    class LinenConvNet(nn.Module):
        dropout: float = 0.5

        @nn.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3), name="conv1")(x)), (2, 2), (2, 2))
            x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3), name="conv2")(x)), (2, 2), (2, 2))
            x = x.reshape(x.shape[0], -1)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            return nn.Dense(CLASSES, name="fc2")(nn.relu(nn.Dense(128, name="fc1")(x)))

    class LinenBasicBlock(nn.Module):
        out: int
        stride: int

        @nn.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            def bn(name: str) -> nn.BatchNorm:
                return nn.BatchNorm(not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)

            s = (self.stride, self.stride)
            y = nn.Conv(self.out, (3, 3), s, padding=1, use_bias=False, name="conv1")(x)
            y = nn.relu(bn("bn1")(y))
            y = nn.Conv(self.out, (3, 3), padding=1, use_bias=False, name="conv2")(y)
            y = bn("bn2")(y)
            if self.stride != 1 or x.shape[-1] != self.out:
                x = nn.Conv(self.out, (1, 1), s, padding=0, use_bias=False, name="shortcut")(x)
                x = bn("shortcut_bn")(x)
            return nn.relu(x + y)

    class LinenResNet(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            bn = nn.BatchNorm(not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="stem_bn")
            x = nn.Conv(RESNET_WIDTHS[0], (3, 3), padding=1, use_bias=False, name="stem")(x)
            x = nn.relu(bn(x))
            outs = [w for w, depth in zip(RESNET_WIDTHS, RESNET_DEPTHS, strict=True)]
            outs = [w for w, d in zip(outs, RESNET_DEPTHS, strict=True) for _ in range(d)]
            for i, (out, stride) in enumerate(zip(outs, _resnet_strides(), strict=True)):
                x = LinenBasicBlock(out, stride, name=f"blocks_{i}")(x, train)
            return nn.Dense(CLASSES, name="head")(x.mean((1, 2)))


def _linen_gpt(n: int = GPT_BLOCKS, scan: bool = False, remat: bool = False, reference=None):
    model = LinenGPT(GPT_SHAPE, n, remat, scan)
    x, y = batch("gpt")
    params = jax.jit(model.init)(KEY, x)["params"]
    if reference is not None:
        params = _linen_gpt_params(reference, n, scan)

    def forward(p, state, rng, ids):
        return cast(jax.Array, model.apply({"params": p}, ids)), state

    return Built("linen", params, {}, forward, x, y)


def _linen_built(model: Any, name: str, params: Any, state: Any) -> Built:
    def forward(p, state, rng, x):
        return model.apply(
            {"params": p, **state}, x, True, rngs={"dropout": rng}, mutable=list(state)
        )

    return Built("linen", params, state, forward, *batch(name))


def _linen_convnet(dropout: float = 0.5, reference=None):
    model = LinenConvNet(dropout)
    variables = dict(jax.jit(model.init, static_argnums=2)(KEY, batch("convnet")[0], False))
    params = variables.pop("params")
    if reference is not None:
        params = _same_tree(reference)
    return _linen_built(model, "convnet", params, variables)


def _linen_resnet(reference=None):
    model = LinenResNet()
    variables = dict(jax.jit(model.init, static_argnums=2)(KEY, batch("resnet")[0], False))
    params = variables.pop("params")
    if reference is not None:
        params = _flat_blocks(reference)
    return _linen_built(model, "resnet", params, variables)


# =============================================================================================
# Flax NNX: split once outside, merge inside the jitted function.

if nnx is not None:

    class NNXBlock(nnx.Module):
        def __init__(self, d: int, heads: int, rngs: Any):
            self.ln1 = nnx.LayerNorm(d, epsilon=LN_EPSILON, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, d, decode=False, keep_rngs=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, epsilon=LN_EPSILON, rngs=rngs)
            self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
            self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
            x = x + self.attn(self.ln1(x), mask=mask)
            return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

    class NNXGPT(nnx.Module):
        """``scan``: blocks created by ``nnx.vmap`` (stacked) and applied by ``nnx.scan``;
        ``remat``: ``nnx.remat`` of each block."""

        blocks: Any  # an nnx.List of blocks, or one block of stacked variables

        def __init__(self, shape: Shape, n: int, scan: bool, remat: bool, rngs: Any):
            d = shape.d_model
            self.tokens = nnx.Embed(shape.vocab, d, rngs=rngs)
            self.positions = nnx.Embed(shape.seq, d, rngs=rngs)
            self.scan, self.remat = scan, remat
            if scan:

                @nnx.split_rngs(splits=n)
                @nnx.vmap(in_axes=(0,), out_axes=0)
                def stacked(rngs: Any) -> NNXBlock:
                    return NNXBlock(d, shape.heads, rngs)

                self.blocks = stacked(rngs)
            else:
                self.blocks = nnx.List([NNXBlock(d, shape.heads, rngs) for _ in range(n)])
            self.ln_f = nnx.LayerNorm(d, epsilon=LN_EPSILON, rngs=rngs)
            self.head = nnx.Linear(d, shape.vocab, rngs=rngs)

        def __call__(self, ids: jax.Array) -> jax.Array:
            x = self.tokens(ids) + self.positions(jnp.arange(ids.shape[-1]))

            def apply(block: NNXBlock, x: jax.Array) -> jax.Array:
                return block(x)

            if self.scan:
                body = nnx.remat(apply, prevent_cse=False) if self.remat else apply
                x = nnx.scan(
                    lambda x, block: body(block, x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry
                )(x, self.blocks)
            else:
                body = nnx.remat(apply) if self.remat else apply
                for block in self.blocks:
                    x = body(block, x)
            return self.head(self.ln_f(x))

    class NNXConvNet(nnx.Module):
        def __init__(self, dropout: float, rngs: Any):
            self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
            self.fc1 = nnx.Linear(2 * 2 * 64, 128, rngs=rngs)
            self.fc2 = nnx.Linear(128, CLASSES, rngs=rngs)
            self.dropout = nnx.Dropout(dropout)

        def __call__(self, x: jax.Array, rngs: Any) -> jax.Array:
            x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
            x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
            x = self.dropout(x.reshape(x.shape[0], -1), rngs=rngs)
            return self.fc2(nnx.relu(self.fc1(x)))

    def _nnx_bn(size: int, rngs: Any) -> Any:
        return nnx.BatchNorm(size, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)

    class NNXBasicBlock(nnx.Module):
        def __init__(self, in_size: int, out: int, stride: int, rngs: Any):
            s = (stride, stride)
            self.conv1 = nnx.Conv(in_size, out, (3, 3), s, padding=1, use_bias=False, rngs=rngs)
            self.bn1 = _nnx_bn(out, rngs)
            self.conv2 = nnx.Conv(out, out, (3, 3), padding=1, use_bias=False, rngs=rngs)
            self.bn2 = _nnx_bn(out, rngs)
            self.project = stride != 1 or in_size != out
            if self.project:
                self.shortcut = nnx.Conv(
                    in_size, out, (1, 1), s, padding=0, use_bias=False, rngs=rngs
                )
                self.shortcut_bn = _nnx_bn(out, rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            y = nnx.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            if self.project:
                x = self.shortcut_bn(self.shortcut(x))
            return nnx.relu(x + y)

    class NNXResNet(nnx.Module):
        def __init__(self, rngs: Any):
            width = RESNET_WIDTHS[0]
            self.stem = nnx.Conv(
                RESNET_IMAGE[-1], width, (3, 3), padding=1, use_bias=False, rngs=rngs
            )
            self.stem_bn = _nnx_bn(width, rngs)
            blocks = []
            strides = iter(_resnet_strides())
            for out, depth in zip(RESNET_WIDTHS, RESNET_DEPTHS, strict=True):
                for _ in range(depth):
                    blocks.append(NNXBasicBlock(width, out, next(strides), rngs))
                    width = out
            self.blocks = nnx.List(blocks)
            self.head = nnx.Linear(width, CLASSES, rngs=rngs)

        def __call__(self, x: jax.Array, rngs: Any = None) -> jax.Array:
            x = nnx.relu(self.stem_bn(self.stem(x)))
            for block in self.blocks:
                x = block(x)
            return self.head(x.mean((1, 2)))


def _nnx_built(model: Any, name: str, call: Callable[[Any, jax.Array, Any], jax.Array]) -> Built:
    """``nnx.split`` into params and the rest; the forward merges them back, calls, and
    splits the rest out again (the BatchNorm statistics it updated)."""
    graphdef, params, state = nnx.split(model, nnx.Param, ...)

    def forward(p, state, rng, x):
        module = nnx.merge(graphdef, p, state, copy=True)  # Variables of this trace level
        logits = call(module, x, rng)
        return logits, nnx.split(module, nnx.Param, ...)[2]

    return Built("nnx", params, state, forward, *batch(name))


def _nnx_gpt(n: int = GPT_BLOCKS, scan: bool = False, remat: bool = False, reference=None):
    model = NNXGPT(GPT_SHAPE, n, scan, remat, nnx.Rngs(KEY))
    if reference is not None:
        _nnx_load_gpt(model, reference, n, scan)
    return _nnx_built(model, "gpt", lambda m, ids, rng: m(ids))


def _nnx_convnet(dropout: float = 0.5, reference=None):
    model = NNXConvNet(dropout, nnx.Rngs(KEY))
    if reference is not None:
        _nnx_load(model, reference)
    return _nnx_built(model, "convnet", lambda m, x, rng: m(x, nnx.Rngs(dropout=rng)))


def _nnx_resnet(reference=None):
    model = NNXResNet(nnx.Rngs(KEY))
    model.train()
    if reference is not None:
        _nnx_load(model, reference)
    return _nnx_built(model, "resnet", lambda m, x, rng: m(x))


# =============================================================================================
# Equinox: unbatched layers, jax.vmap over the batch, channels first.

if eqx is not None:

    class EqxBlock(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __init__(self, d: int, heads: int, key: jax.Array):
            k1, k2, k3 = jax.random.split(key, 3)
            self.ln1 = eqx.nn.LayerNorm(d, eps=LN_EPSILON)
            biases = dict.fromkeys(
                ("use_query_bias", "use_key_bias", "use_value_bias", "use_output_bias"), True
            )
            self.attn = eqx.nn.MultiheadAttention(heads, d, **biases, key=k1)
            self.ln2 = eqx.nn.LayerNorm(d, eps=LN_EPSILON)
            self.fc1 = eqx.nn.Linear(d, 4 * d, key=k2)
            self.fc2 = eqx.nn.Linear(4 * d, d, key=k3)

        def __call__(self, x: jax.Array) -> jax.Array:  # (seq, d): Equinox layers are unbatched
            mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
            h = jax.vmap(self.ln1)(x)
            x = x + self.attn(h, h, h, mask=mask)
            h = jax.vmap(self.ln2)(x)
            return x + jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(h)))

    class EqxGPT(eqx.Module):
        """``scan``: blocks built by ``eqx.filter_vmap`` (every array with a leading axis of
        ``n``), applied by ``lax.scan`` over ``eqx.partition``'s arrays (``jax.checkpoint`` of
        the body with ``remat``); unrolled: a list of blocks (``eqx.filter_checkpoint`` of
        each with ``remat``)."""

        tokens: eqx.nn.Embedding
        positions: eqx.nn.Embedding
        blocks: Any
        ln_f: eqx.nn.LayerNorm
        head: eqx.nn.Linear
        remat: bool = eqx.field(static=True)
        scan: bool = eqx.field(static=True)

        def __init__(self, shape: Shape, n: int, remat: bool, key: jax.Array, scan: bool = True):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            d = shape.d_model
            self.tokens = eqx.nn.Embedding(shape.vocab, d, key=k1)
            self.positions = eqx.nn.Embedding(shape.seq, d, key=k2)
            keys = jax.random.split(k3, n)
            if scan:
                self.blocks = eqx.filter_vmap(lambda k: EqxBlock(d, shape.heads, k))(keys)
            else:
                self.blocks = [EqxBlock(d, shape.heads, k) for k in keys]
            self.ln_f = eqx.nn.LayerNorm(d, eps=LN_EPSILON)
            self.head = eqx.nn.Linear(d, shape.vocab, key=k4)
            self.remat, self.scan = remat, scan

        def __call__(self, ids: jax.Array) -> jax.Array:  # (seq,) -> (seq, vocab)
            x = jax.vmap(self.tokens)(ids) + jax.vmap(self.positions)(jnp.arange(ids.shape[0]))
            if self.scan:
                arrays, static = eqx.partition(self.blocks, eqx.is_array)

                def body(x: jax.Array, layer: Any) -> tuple[jax.Array, None]:
                    return eqx.combine(layer, static)(x), None

                if self.remat:
                    body = jax.checkpoint(body, prevent_cse=False)
                x, _ = lax.scan(body, x, arrays)
            else:
                for block in self.blocks:
                    x = eqx.filter_checkpoint(block)(x) if self.remat else block(x)
            return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))

    class EqxConvNet(eqx.Module):
        conv1: eqx.nn.Conv2d
        conv2: eqx.nn.Conv2d
        pool: eqx.nn.MaxPool2d
        dropout: eqx.nn.Dropout
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __init__(self, dropout: float, key: jax.Array):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            self.conv1 = eqx.nn.Conv2d(1, 32, 3, padding="SAME", key=k1)
            self.conv2 = eqx.nn.Conv2d(32, 64, 3, padding="SAME", key=k2)
            self.pool = eqx.nn.MaxPool2d(2, 2)
            self.dropout = eqx.nn.Dropout(dropout)
            self.fc1 = eqx.nn.Linear(2 * 2 * 64, 128, key=k3)
            self.fc2 = eqx.nn.Linear(128, CLASSES, key=k4)

        def __call__(self, x: jax.Array, key: jax.Array) -> jax.Array:  # (1, 8, 8)
            x = self.pool(jax.nn.relu(self.conv1(x)))
            x = self.pool(jax.nn.relu(self.conv2(x)))
            x = self.dropout(x.reshape(-1), key=key)
            return self.fc2(jax.nn.relu(self.fc1(x)))

    def _eqx_bn(size: int) -> Any:
        return eqx.nn.BatchNorm(size, "batch", eps=BN_EPSILON, momentum=BN_MOMENTUM, mode="batch")

    class EqxBasicBlock(eqx.Module):
        conv1: eqx.nn.Conv2d
        bn1: eqx.nn.BatchNorm
        conv2: eqx.nn.Conv2d
        bn2: eqx.nn.BatchNorm
        shortcut: eqx.nn.Conv2d | None
        shortcut_bn: eqx.nn.BatchNorm | None

        def __init__(self, in_size: int, out: int, stride: int, key: jax.Array):
            k1, k2, k3 = jax.random.split(key, 3)
            self.conv1 = eqx.nn.Conv2d(in_size, out, 3, stride, 1, use_bias=False, key=k1)
            self.bn1 = _eqx_bn(out)
            self.conv2 = eqx.nn.Conv2d(out, out, 3, 1, 1, use_bias=False, key=k2)
            self.bn2 = _eqx_bn(out)
            if stride != 1 or in_size != out:
                self.shortcut = eqx.nn.Conv2d(in_size, out, 1, stride, 0, use_bias=False, key=k3)
                self.shortcut_bn = _eqx_bn(out)
            else:
                self.shortcut = self.shortcut_bn = None

        def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
            y, state = self.bn1(self.conv1(x), state)
            y, state = self.bn2(self.conv2(jax.nn.relu(y)), state)
            if self.shortcut is not None and self.shortcut_bn is not None:
                x, state = self.shortcut_bn(self.shortcut(x), state)
            return jax.nn.relu(x + y), state

    class EqxResNet(eqx.Module):
        stem: eqx.nn.Conv2d
        stem_bn: eqx.nn.BatchNorm
        blocks: list
        head: eqx.nn.Linear

        def __init__(self, key: jax.Array):
            keys = iter(jax.random.split(key, 2 + sum(RESNET_DEPTHS)))
            width = RESNET_WIDTHS[0]
            self.stem = eqx.nn.Conv2d(
                RESNET_IMAGE[-1], width, 3, 1, 1, use_bias=False, key=next(keys)
            )
            self.stem_bn = _eqx_bn(width)
            strides = iter(_resnet_strides())
            self.blocks = []
            for out, depth in zip(RESNET_WIDTHS, RESNET_DEPTHS, strict=True):
                for _ in range(depth):
                    self.blocks.append(EqxBasicBlock(width, out, next(strides), next(keys)))
                    width = out
            self.head = eqx.nn.Linear(width, CLASSES, key=next(keys))

        def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:  # (3, H, W)
            x, state = self.stem_bn(self.stem(x), state)
            x = jax.nn.relu(x)
            for block in self.blocks:
                x, state = block(x, state)
            return self.head(x.mean((1, 2))), state


def _eqx_params(model: Any) -> tuple[Any, Any]:
    return eqx.partition(model, eqx.is_inexact_array)


def _eqx_gpt(n: int = GPT_BLOCKS, scan: bool = False, remat: bool = False, reference=None):
    model = EqxGPT(GPT_SHAPE, n, remat, KEY, scan)
    if reference is not None:
        model = _eqx_load_gpt(model, reference, n, scan)
    params, static = _eqx_params(model)

    def forward(p, state, rng, ids):
        return jax.vmap(eqx.combine(p, static))(ids), state

    return Built("equinox", params, {}, forward, *batch("gpt"))


def _eqx_convnet(dropout: float = 0.5, reference=None):
    model = EqxConvNet(dropout, KEY)
    if reference is not None:
        model = _eqx_load_convnet(model, reference)
    params, static = _eqx_params(model)
    x, y = batch("convnet")

    def forward(p, state, rng, x):
        keys = jax.random.split(rng, x.shape[0])
        return jax.vmap(eqx.combine(p, static))(x, keys), state

    return Built("equinox", params, {}, forward, x.transpose(0, 3, 1, 2), y)


def _eqx_resnet(reference=None):
    model, state = eqx.nn.make_with_state(EqxResNet)(KEY)
    if reference is not None:
        model = _eqx_load_resnet(model, reference)
    params, static = _eqx_params(model)
    x, y = batch("resnet")

    def forward(p, state, rng, x):
        model = eqx.combine(p, static)
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    return Built("equinox", params, state, forward, x.transpose(0, 3, 1, 2), y)


# =============================================================================================
# Weight conversion from metoryx's layout (reference=...).


def _same_tree(reference: Any) -> Any:
    return jax.tree.map(jnp.asarray, reference)


def _flat_blocks(reference: Any) -> dict[str, Any]:
    """``blocks/<i>/...`` as Flax Linen's ``blocks_<i>/...``."""
    out = {k: v for k, v in reference.items() if k != "blocks"}
    out.update({f"blocks_{i}": v for i, v in reference["blocks"].items()})
    return out


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _linen_block(p: Any) -> dict[str, Any]:
    """metoryx's attention kernels ``(d, d)`` as Linen/NNX's ``(d, heads, head_dim)`` and
    ``(heads, head_dim, d)``: the features of each head are contiguous in both."""
    heads = GPT_SHAPE.heads
    attn = {}
    for name in ("query", "key", "value"):
        kernel, bias = p["attn"][name]["kernel"], p["attn"][name]["bias"]
        d = kernel.shape[0]
        attn[name] = {
            "kernel": kernel.reshape(d, heads, -1),
            "bias": bias.reshape(heads, -1),
        }
    out = p["attn"]["out"]
    attn["out"] = {
        "kernel": out["kernel"].reshape(heads, -1, out["kernel"].shape[1]),
        "bias": out["bias"],
    }
    return {**{k: v for k, v in p.items() if k != "attn"}, "attn": attn}


def _linen_gpt_params(reference: Any, n: int, scan: bool) -> dict[str, Any]:
    blocks = [_linen_block(reference["blocks"][str(i)]) for i in range(n)]
    out = {k: v for k, v in reference.items() if k != "blocks"}
    if scan:
        out["blocks"] = _stack(blocks)
    else:
        out.update({f"blocks_{i}": b for i, b in enumerate(blocks)})
    return out


def _nnx_load(module: Any, tree: Any) -> None:
    """Set the NNX variables of ``module`` from a nested dict of the same attribute names
    (list indices as strings)."""
    for name, value in tree.items():
        child = module[int(name)] if name.isdigit() else getattr(module, name)
        if isinstance(value, dict):
            _nnx_load(child, value)
        else:
            child.value = jnp.asarray(value, child.value.dtype).reshape(child.value.shape)


def _nnx_load_gpt(model: Any, reference: Any, n: int, scan: bool) -> None:
    blocks = {str(i): _linen_block(reference["blocks"][str(i)]) for i in range(n)}
    rest = {k: v for k, v in reference.items() if k != "blocks"}
    _nnx_load(model, rest)
    if scan:
        _nnx_load(model.blocks, _stack([blocks[str(i)] for i in range(n)]))
    else:
        _nnx_load(model.blocks, blocks)


def _eqx_linear(layer: Any, p: Any) -> Any:
    layer = eqx.tree_at(lambda m: m.weight, layer, p["kernel"].T)
    return eqx.tree_at(lambda m: m.bias, layer, p["bias"])


def _eqx_norm(layer: Any, p: Any) -> Any:
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (p["scale"], p["bias"]))


def _eqx_conv(layer: Any, p: Any) -> Any:
    layer = eqx.tree_at(lambda m: m.weight, layer, p["kernel"].transpose(3, 2, 0, 1))
    if "bias" in p:
        layer = eqx.tree_at(lambda m: m.bias, layer, p["bias"].reshape(-1, 1, 1))
    return layer


def _eqx_block(block: Any, p: Any) -> Any:
    attn = block.attn
    for name in ("query", "key", "value"):
        proj = f"{name}_proj"
        attn = eqx.tree_at(
            lambda a, proj=proj: getattr(a, proj),
            attn,
            _eqx_linear(getattr(attn, proj), p["attn"][name]),
        )
    attn = eqx.tree_at(
        lambda a: a.output_proj, attn, _eqx_linear(attn.output_proj, p["attn"]["out"])
    )
    return eqx.tree_at(
        lambda b: (b.ln1, b.attn, b.ln2, b.fc1, b.fc2),
        block,
        (
            _eqx_norm(block.ln1, p["ln1"]),
            attn,
            _eqx_norm(block.ln2, p["ln2"]),
            _eqx_linear(block.fc1, p["fc1"]),
            _eqx_linear(block.fc2, p["fc2"]),
        ),
    )


def _eqx_load_gpt(model: Any, reference: Any, n: int, scan: bool) -> Any:
    if scan:
        arrays, static = eqx.partition(model.blocks, eqx.is_array)
        one = eqx.combine(jax.tree.map(lambda a: a[0], arrays), static)
        converted = [_eqx_block(one, reference["blocks"][str(i)]) for i in range(n)]
        parts = [eqx.partition(b, eqx.is_array)[0] for b in converted]
        blocks = eqx.combine(_stack(parts), static)
    else:
        blocks = [_eqx_block(b, reference["blocks"][str(i)]) for i, b in enumerate(model.blocks)]
    return eqx.tree_at(
        lambda m: (m.tokens.weight, m.positions.weight, m.blocks, m.ln_f, m.head),
        model,
        (
            reference["tokens"]["embedding"],
            reference["positions"]["embedding"],
            blocks,
            _eqx_norm(model.ln_f, reference["ln_f"]),
            _eqx_linear(model.head, reference["head"]),
        ),
    )


def _eqx_load_convnet(model: Any, reference: Any) -> Any:
    # metoryx flattens (h, w, c), Equinox (c, h, w): permute fc1's input rows.
    kernel = reference["fc1"]["kernel"]
    fc1 = {
        "kernel": kernel.reshape(2, 2, 64, -1).transpose(2, 0, 1, 3).reshape(kernel.shape),
        "bias": reference["fc1"]["bias"],
    }
    return eqx.tree_at(
        lambda m: (m.conv1, m.conv2, m.fc1, m.fc2),
        model,
        (
            _eqx_conv(model.conv1, reference["conv1"]),
            _eqx_conv(model.conv2, reference["conv2"]),
            _eqx_linear(model.fc1, fc1),
            _eqx_linear(model.fc2, reference["fc2"]),
        ),
    )


def _eqx_bn_params(layer: Any, p: Any) -> Any:
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (p["scale"], p["bias"]))


def _eqx_load_resnet(model: Any, reference: Any) -> Any:
    blocks = []
    for i, block in enumerate(model.blocks):
        p = reference["blocks"][str(i)]
        names = ["conv1", "bn1", "conv2", "bn2"] + (
            ["shortcut", "shortcut_bn"] if "shortcut" in p else []
        )
        for name in names:
            load = _eqx_conv if "conv" in name or name == "shortcut" else _eqx_bn_params
            block = eqx.tree_at(
                lambda b, name=name: getattr(b, name), block, load(getattr(block, name), p[name])
            )
        blocks.append(block)
    return eqx.tree_at(
        lambda m: (m.stem, m.stem_bn, m.blocks, m.head),
        model,
        (
            _eqx_conv(model.stem, reference["stem"]),
            _eqx_bn_params(model.stem_bn, reference["stem_bn"]),
            blocks,
            _eqx_linear(model.head, reference["head"]),
        ),
    )


_BUILDERS: dict[str, dict[str, Callable[..., Built]]] = {
    "gpt": {"metoryx": _mx_gpt, "jax": _jax_gpt},
    "convnet": {"metoryx": _mx_convnet, "jax": _jax_convnet},
    "resnet": {"metoryx": _mx_resnet, "jax": _jax_resnet},
}
if nn is not None:
    _BUILDERS["gpt"]["linen"] = _linen_gpt
    _BUILDERS["convnet"]["linen"] = _linen_convnet
    _BUILDERS["resnet"]["linen"] = _linen_resnet
    _BUILDERS["gpt"]["nnx"] = _nnx_gpt
    _BUILDERS["convnet"]["nnx"] = _nnx_convnet
    _BUILDERS["resnet"]["nnx"] = _nnx_resnet
if eqx is not None:
    _BUILDERS["gpt"]["equinox"] = _eqx_gpt
    _BUILDERS["convnet"]["equinox"] = _eqx_convnet
    _BUILDERS["resnet"]["equinox"] = _eqx_resnet
