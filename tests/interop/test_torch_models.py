"""End to end: networks written once in PyTorch and once in metoryx with the same attribute
names; the PyTorch weights loaded with load_state_dict; logits within 1e-4, and a few SGD steps
in both staying within 1e-4 (parameters and running statistics)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metoryx as mx
from metoryx.interop.torch import load_state_dict, to_state_dict

TOL = 1e-4
LEARNING_RATE = 0.1
STEPS = 3

# ResNet-18's structure (stem, four stages of two basic blocks, projection shortcuts where the
# shape changes) at an eighth of its widths, to keep the test fast on a CPU.
WIDTHS = (8, 16, 32, 64)
NUM_CLASSES = 5


class BasicBlock(mx.Module):
    def __init__(self, in_size, out_size, stride):
        self.conv1 = mx.Conv(in_size, out_size, (3, 3), stride, padding=1, use_bias=False)
        self.bn1 = mx.BatchNorm(out_size, momentum=0.9)
        self.conv2 = mx.Conv(out_size, out_size, (3, 3), padding=1, use_bias=False)
        self.bn2 = mx.BatchNorm(out_size, momentum=0.9)
        self.downsample = None
        if stride != 1 or in_size != out_size:
            self.downsample = [
                mx.Conv(in_size, out_size, (1, 1), stride, padding=0, use_bias=False),
                mx.BatchNorm(out_size, momentum=0.9),
            ]

    def __call__(self, x, is_training):
        y = mx.relu(self.bn1(self.conv1(x), is_training))
        y = self.bn2(self.conv2(y), is_training)
        if self.downsample is not None:
            conv, bn = self.downsample
            x = bn(conv(x), is_training)
        return mx.relu(y + x)


class ResNet18(mx.Module):
    def __init__(self):
        self.conv1 = mx.Conv(3, WIDTHS[0], (7, 7), 2, padding=3, use_bias=False)
        self.bn1 = mx.BatchNorm(WIDTHS[0], momentum=0.9)
        sizes = (WIDTHS[0], *WIDTHS)
        for stage in range(4):
            stride = 1 if stage == 0 else 2
            blocks = [
                BasicBlock(sizes[stage], sizes[stage + 1], stride),
                BasicBlock(sizes[stage + 1], sizes[stage + 1], 1),
            ]
            setattr(self, f"layer{stage + 1}", blocks)
        self.fc = mx.Dense(WIDTHS[-1], NUM_CLASSES)

    def __call__(self, x, is_training):
        x = mx.relu(self.bn1(self.conv1(x), is_training))
        x = mx.max_pool(x, (3, 3), 2, padding=1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, is_training)
        return self.fc(mx.global_avg_pool(x, 2))


def _torch_resnet18(torch):
    nn = torch.nn

    class TorchBlock(nn.Module):
        def __init__(self, in_size, out_size, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_size, out_size, 3, stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_size)
            self.conv2 = nn.Conv2d(out_size, out_size, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_size)
            self.downsample = None
            if stride != 1 or in_size != out_size:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_size, out_size, 1, stride, bias=False), nn.BatchNorm2d(out_size)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class TorchResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, WIDTHS[0], 7, 2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(WIDTHS[0])
            sizes = (WIDTHS[0], *WIDTHS)
            for stage in range(4):
                stride = 1 if stage == 0 else 2
                blocks = nn.Sequential(
                    TorchBlock(sizes[stage], sizes[stage + 1], stride),
                    TorchBlock(sizes[stage + 1], sizes[stage + 1], 1),
                )
                setattr(self, f"layer{stage + 1}", blocks)
            self.fc = nn.Linear(WIDTHS[-1], NUM_CLASSES)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = nn.functional.max_pool2d(x, 3, 2, padding=1)
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = stage(x)
            return self.fc(x.mean(dim=(2, 3)))

    return TorchResNet18()


def _randomize_statistics(torch, module):
    """Running statistics away from PyTorch's zeros and ones, so that evaluation mode shows
    whether they were loaded."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)


def _assert_same_state(torch_module, model, variables):
    ours = to_state_dict(model, variables)
    theirs = torch_module.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        if tensor.is_floating_point():
            np.testing.assert_allclose(ours[name], tensor, atol=TOL, rtol=TOL, err_msg=name)


def _sgd_steps(torch, torch_module, model, variables, inputs, jax_inputs, labels):
    """``STEPS`` steps of plain SGD on the softmax cross-entropy, in training mode, in both;
    ``inputs`` are PyTorch's arguments of the model, ``jax_inputs`` ours."""
    _, apply_fn = mx.transform(model)
    optimizer = optax.sgd(LEARNING_RATE)

    @jax.jit
    def step(variables, opt_state, inputs, labels):
        def loss_fn(params):
            logits, new = apply_fn({**variables, "params": params}, None, *inputs, is_training=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new

        grads, new = jax.grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = optimizer.update(grads, opt_state)
        return {**new, "params": optax.apply_updates(variables["params"], updates)}, opt_state

    torch_optimizer = torch.optim.SGD(torch_module.parameters(), lr=LEARNING_RATE)
    torch_module.train()
    opt_state = optimizer.init(variables["params"])
    for _ in range(STEPS):
        torch_optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(torch_module(*inputs), labels)
        loss.backward()
        torch_optimizer.step()
        variables, opt_state = step(variables, opt_state, jax_inputs, labels.numpy())
    return variables


@pytest.mark.slow
def test_resnet18_matches_torch(torch):
    theirs = _torch_resnet18(torch)
    _randomize_statistics(torch, theirs)
    model = ResNet18()
    variables = load_state_dict(model, theirs.state_dict())
    # Batch statistics of at least 32 values per channel at the last stage (8 images, 2x2):
    # with fewer, BatchNorm amplifies float32 rounding differences between the two libraries
    # step after step (4 images at 1x1 drift apart by 4e-3 in three steps).
    x = torch.randn(8, 3, 64, 64)
    labels = torch.tensor([0, 3, 1, 4, 2, 2, 0, 1])

    images = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    logits, _ = jax.jit(mx.apply(model), static_argnames="is_training")(
        variables, None, images, is_training=False
    )
    expected = theirs.eval()(x).detach().numpy()
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=TOL)

    variables = _sgd_steps(torch, theirs, model, variables, (x,), (images,), labels)
    _assert_same_state(theirs, model, variables)


# A small Transformer encoder: PyTorch's own TransformerEncoderLayer (post-norm, ReLU), token
# embeddings plus learned positions, masked mean pooling, a linear head.
VOCAB, WIDTH, HEADS, FFN, LENGTH = 11, 16, 4, 32, 6


class EncoderLayer(mx.Module):
    """The twin of torch.nn.TransformerEncoderLayer(WIDTH, HEADS, FFN, dropout=0)."""

    def __init__(self):
        self.self_attn = mx.MultiHeadAttention(HEADS, WIDTH)
        self.linear1 = mx.Dense(WIDTH, FFN)
        self.linear2 = mx.Dense(FFN, WIDTH)
        self.norm1 = mx.LayerNorm(WIDTH)
        self.norm2 = mx.LayerNorm(WIDTH)

    def __call__(self, x, mask):
        x = self.norm1(x + self.self_attn(x, mask=mask))
        return self.norm2(x + self.linear2(mx.relu(self.linear1(x))))


class Encoder(mx.Module):
    def __init__(self):
        self.embed = mx.Embed(VOCAB, WIDTH)
        self.pos = mx.Parameter(mx.initializers.normal(), (LENGTH, WIDTH))
        self.layers = [EncoderLayer(), EncoderLayer()]
        self.head = mx.Dense(WIDTH, NUM_CLASSES)

    def __call__(self, ids, valid, is_training):
        x = self.embed(ids) + self.pos[None]
        mask = valid[:, None, None, :]  # (batch, heads, queries, keys): attend to real tokens
        for layer in self.layers:
            x = layer(x, mask)
        weights = valid.astype(x.dtype)[..., None]
        return self.head((x * weights).sum(axis=1) / weights.sum(axis=1))


def _torch_encoder(torch):
    nn = torch.nn

    class TorchEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.pos = nn.Parameter(torch.randn(LENGTH, WIDTH))
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(WIDTH, HEADS, FFN, dropout=0.0, batch_first=True)
                for _ in range(2)
            )
            self.head = nn.Linear(WIDTH, NUM_CLASSES)

        def forward(self, ids, valid):
            x = self.embed(ids) + self.pos
            for layer in self.layers:
                x = layer(x, src_key_padding_mask=~valid)
            weights = valid.to(x.dtype)[..., None]
            return self.head((x * weights).sum(dim=1) / weights.sum(dim=1))

    return TorchEncoder()


@pytest.mark.slow
def test_transformer_encoder_matches_torch(torch):
    theirs = _torch_encoder(torch)
    model = Encoder()
    variables = load_state_dict(model, theirs.state_dict())
    ids = torch.randint(0, VOCAB, (4, LENGTH))
    valid = torch.arange(LENGTH)[None, :] < torch.tensor([[6], [4], [5], [2]])
    labels = torch.tensor([0, 3, 1, 4])

    inputs = (jnp.asarray(ids.numpy()), jnp.asarray(valid.numpy()))
    logits, _ = mx.apply(model)(variables, None, *inputs, is_training=False)
    expected = theirs.eval()(ids, valid).detach().numpy()
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=TOL)

    variables = _sgd_steps(torch, theirs, model, variables, (ids, valid), inputs, labels)
    _assert_same_state(theirs, model, variables)
