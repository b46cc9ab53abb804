"""The lowered program of a model is the same in every process and for every equal model, so
JAX's persistent compilation cache serves a second process (issue 14: time to first step).

The cache key is a hash of the lowered module (and the compile options and versions): anything
of ours that leaked into the program (an object id, a counter, a name drawn at random, a hash
that depends on ``PYTHONHASHSEED``) would make every process miss. Checked on the jitted train
step (``value_and_grad`` and an ``optax.adam`` update) of two models: a small GPT with
``mx.Repeat`` and causal attention, and a ConvNet with BatchNorm and dropout.

Run as a script (``python tests/test_compilation_cache.py OUT [CACHE_DIR]``), this file is the
child process: it writes the lowered texts and, with a cache directory, the number of
persistent-cache hits of each step's compile and of an eager ``init_fn`` (one jitted program)
to ``OUT`` as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import metoryx as mx


class Block(mx.Module):
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


class GPT(mx.Module):
    def __init__(self, vocab: int = 32, seq: int = 8, d: int = 16, heads: int = 2, n: int = 2):
        super().__init__()
        self.tokens = mx.Embed(vocab, d)
        self.positions = mx.Embed(seq, d)
        self.blocks = mx.Repeat(lambda: Block(d, heads), n)
        self.ln_f = mx.LayerNorm(d)
        self.head = mx.Dense(d, vocab)

    def __call__(self, ids: jax.Array, is_training: bool = False) -> jax.Array:
        x = self.tokens(ids) + self.positions(jnp.arange(ids.shape[-1]))[None]
        return self.head(self.ln_f(self.blocks(x)))


class ConvNet(mx.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = mx.Conv(1, 8, kernel_size=(3, 3))
        self.bn1 = mx.BatchNorm(8)
        self.conv2 = mx.Conv(8, 16, kernel_size=(3, 3))
        self.fc = mx.Dense(2 * 2 * 16, 10)

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        x = mx.max_pool(mx.relu(self.bn1(self.conv1(x), is_training)), (2, 2), strides=(2, 2))
        x = mx.max_pool(mx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        x = mx.dropout(x.reshape(x.shape[0], -1), 0.5, is_training=is_training)
        return self.fc(x)


# name: (model factory, input, labels)
MODELS = {
    "gpt": (GPT, jax.ShapeDtypeStruct((2, 8), jnp.int32), jax.ShapeDtypeStruct((2, 8), jnp.int32)),
    "convnet": (
        ConvNet,
        jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32),
        jax.ShapeDtypeStruct((4,), jnp.int32),
    ),
}


def lowered(
    model: mx.Module, x: jax.ShapeDtypeStruct, y: jax.ShapeDtypeStruct
) -> jax.stages.Lowered:
    """The lowered train step of ``model``, from abstract variables (nothing is computed)."""
    init_fn, apply_fn = mx.transform(model)
    optimizer = optax.adam(1e-3)

    def step(variables, opt_state, rng, x, y):
        def loss_fn(params):
            logits, new_variables = apply_fn(
                {**variables, "params": params}, rng, x, is_training=True
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, new_variables

        (loss, new_variables), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"]
        )
        updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {**new_variables, "params": params}, opt_state, loss

    variables = jax.eval_shape(init_fn, jax.random.key(0))
    opt_state = jax.eval_shape(optimizer.init, variables["params"])
    rng = jax.eval_shape(lambda: jax.random.key(1))
    with jax.numpy_dtype_promotion("standard"):  # the users' mode: optax mixes int32 and floats
        return jax.jit(step).lower(variables, opt_state, rng, x, y)


def child(out: Path, cache_dir: str | None) -> None:
    """Write each model's lowered step (and, with a cache, its cache hits) to ``out``."""
    hits: list[str] = []
    if cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

        def listen(event: str, **kwargs: object) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                hits.append(event)

        jax.monitoring.register_event_listener(listen)
    key = jax.random.key(0)
    report = {}
    for name, (factory, x, y) in MODELS.items():
        model = factory()
        step = lowered(model, x, y)
        report[name] = {"text": step.as_text(), "hits": 0, "init_hits": 0}
        if cache_dir is not None:
            before = len(hits)
            step.compile()
            report[name]["hits"] = len(hits) - before
            before = len(hits)
            jax.block_until_ready(mx.transform(model).init(key))  # an eager init: one program
            report[name]["init_hits"] = len(hits) - before
    out.write_text(json.dumps(report))


def run_child(tmp_path: Path, name: str, cache_dir: Path | None = None, seed: str = "0") -> dict:
    out = tmp_path / f"{name}.json"
    args = [sys.executable, __file__, str(out)] + ([str(cache_dir)] if cache_dir else [])
    # Another hash seed per process: a set or dict order that leaked into the program shows.
    env = {**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


@pytest.mark.slow  # two fresh processes, each importing JAX and compiling both steps
def test_the_lowered_step_is_the_same_in_two_processes_and_the_second_hits_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = run_child(tmp_path, "first", cache, seed="1")
    files = sorted(p.name for p in cache.iterdir())
    second = run_child(tmp_path, "second", cache, seed="2")
    for name in MODELS:
        assert first[name]["text"] == second[name]["text"], name
        assert first[name]["hits"] == 0, name  # a fresh cache: compiled and written
        assert second[name]["hits"] == 1, name  # served from the cache, not compiled
        # An eager init is one program: compiled the first time, from the cache the second.
        assert (first[name]["init_hits"], second[name]["init_hits"]) == (0, 1), name
    # Every program the second process compiled came from the cache: nothing was added.
    assert sorted(p.name for p in cache.iterdir()) == files


def test_equal_models_and_a_second_transform_lower_to_the_same_program():
    for name, (factory, x, y) in MODELS.items():
        model = factory()
        texts = {
            lowered(model, x, y).as_text(),
            lowered(model, x, y).as_text(),  # the same model transformed again
            lowered(factory(), x, y).as_text(),  # a separately built, equal model
        }
        assert len(texts) == 1, name


def test_the_program_names_no_object_of_this_process():
    # What a leak would look like: an id() or a repr with an address in the module text.
    factory, x, y = MODELS["gpt"]
    model = factory()
    text = lowered(model, x, y).as_text(debug_info=True)
    for obj in (model, model.blocks, model.head, model.head.kernel):
        assert str(id(obj)) not in text
        assert hex(id(obj)) not in text


if __name__ == "__main__":
    child(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
