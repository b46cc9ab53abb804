"""dot_product_attention, MultiHeadAttention and RotaryEmbedding: PyTorch parity (SDPA and
nn.MultiheadAttention, weights moved by load_state_dict), dropout, transformations, the
key/value cache against the full causal pass, and every error."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close  # tests/_tolerance.py

import metoryx as mx
from metoryx.interop.torch import load_state_dict, to_state_dict
from metoryx.layout import torch_conversions
from metoryx.nn.attention import MultiHeadAttention, RotaryEmbedding, dot_product_attention

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4
# Two JAX programs of the same attention (jitted and not, batched and per example, decoded and
# full) sum and fuse in their own orders: compared within tests/_tolerance.py's bound for the
# roundings along the way. The function alone: a 4-term q.k, a softmax and a sum over up to 6
# keys (~24). The layer adds its projections (8- and 16-term dots) and rotary embeddings (~64).
N_FUNCTION = 24
N_LAYER = 64


def _normal(shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _key(seed):
    """A key for dropout: RBG compiles in a fraction of threefry's time on CPU."""
    return jax.random.key(seed, impl="rbg")


def _forward_backward(fn, args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)


# ---------------------------------------------------------------------------------------------
# dot_product_attention against torch.nn.functional.scaled_dot_product_attention.

# name: (batch, T, S, heads, kv_heads, mask kind, is_causal)
SDPA_CASES = {
    "plain": ((2,), 3, 5, 2, 2, None, False),
    "no_batch_causal": ((), 4, 4, 2, 2, None, True),
    "two_batch_axes_bool_mask": ((2, 2), 3, 4, 2, 2, "bool", False),
    "float_mask": ((2,), 3, 4, 2, 2, "float", False),
    "causal_top_left_t_ne_s": ((1,), 3, 5, 2, 2, None, True),
    "gqa_causal_bool_mask": ((2,), 4, 4, 4, 2, "bool", True),
    "mqa_float_mask": ((1,), 2, 3, 3, 1, "float", False),
}


@pytest.mark.parametrize("case", SDPA_CASES)
def test_function_matches_torch_sdpa(torch, case):
    batch, t, s, heads, kv_heads, mask_kind, is_causal = SDPA_CASES[case]
    q = torch.randn(*batch, heads, t, 8)
    k, v = torch.randn(*batch, kv_heads, s, 8), torch.randn(*batch, kv_heads, s, 8)
    # Broadcast over the heads; keep at least one key per query (PyTorch gives NaN otherwise).
    bool_mask = torch.rand(*batch, 1, t, s) > 0.3
    bool_mask[..., 0] = True
    args, torch_mask = [q, k, v], None
    if mask_kind == "float":
        args.append(torch.randn(*batch, heads, t, s))
    elif mask_kind == "bool":
        torch_mask = bool_mask
    to_ours = tuple(range(len(batch))) + tuple(len(batch) + a for a in (1, 0, 2))

    def torch_fn(q, k, v, *bias):
        return torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias[0] if bias else torch_mask,
            is_causal=is_causal,
            enable_gqa=kv_heads != heads,
        )

    def jax_fn(q, k, v, *bias):
        mask = None if torch_mask is None else jnp.asarray(torch_mask.numpy())
        return dot_product_attention(
            q, k, v, mask, bias[0] if bias else None, is_causal, dropout_rate=0.0
        )

    torch_args = [a.detach().clone().requires_grad_(True) for a in args]
    jax_args = [jnp.asarray(a.detach().numpy()) for a in args]
    jax_args[:3] = [a.transpose(to_ours) for a in jax_args[:3]]
    cotangent = np.random.default_rng(1).standard_normal(jax_args[0].shape).astype(np.float32)
    out, grads = jax.jit(_forward_backward, static_argnums=0)(jax_fn, jax_args, cotangent)
    torch_out = torch_fn(*torch_args)
    np.testing.assert_allclose(
        out, torch_out.detach().numpy().transpose(to_ours), atol=FORWARD_TOL, rtol=FORWARD_TOL
    )
    (torch_out * torch.from_numpy(cotangent.transpose(to_ours).copy())).sum().backward()
    for i, (grad, arg) in enumerate(zip(grads, torch_args, strict=True)):
        expected = arg.grad.numpy()
        np.testing.assert_allclose(
            grad, expected.transpose(to_ours) if i < 3 else expected, atol=GRAD_TOL, rtol=GRAD_TOL
        )


def test_causal_offset_is_bottom_right_and_may_be_traced(torch):
    t, s = 2, 5
    q, k, v = torch.randn(1, 2, t, 4), torch.randn(1, 2, s, 4), torch.randn(1, 2, s, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(t, s, dtype=torch.bool).tril(s - t)
    )
    ours = [jnp.asarray(a.numpy()).transpose(0, 2, 1, 3) for a in (q, k, v)]
    out = dot_product_attention(*ours, is_causal=True, causal_offset=s - t)
    np.testing.assert_allclose(out, expected.numpy().transpose(0, 2, 1, 3), atol=FORWARD_TOL)
    traced = jax.jit(lambda o: dot_product_attention(*ours, is_causal=True, causal_offset=o))(
        jnp.int32(s - t)
    )
    assert_close(traced, out, n=N_FUNCTION)


def test_a_huge_python_causal_offset_means_every_or_no_key():
    # Found by tests/test_bad_arguments.py: 2**70 overflowed the int32 positions of the mask.
    q, k = _normal((2, 3, 2, 4)), _normal((2, 5, 2, 4), 1)
    every = dot_product_attention(q, k, k, is_causal=True, causal_offset=2**70)
    np.testing.assert_array_equal(every, dot_product_attention(q, k, k))
    none = dot_product_attention(q, k, k, is_causal=True, causal_offset=-(2**70))
    no_key = jnp.zeros((3, 5), bool)  # all masked: the mean of the values, JAX's convention
    np.testing.assert_array_equal(none, dot_product_attention(q, k, k, mask=no_key))


def test_scale_and_computation_dtype():
    q, k = _normal((2, 3, 2, 4)), _normal((2, 5, 2, 4), 1)

    @jax.jit
    def outputs(q, k):
        return (
            dot_product_attention(q, k, k, scale=1.0),  # the default is 1 / sqrt(4)
            dot_product_attention(q * 2.0, k, k),
            dot_product_attention(q, k, k, dtype=jnp.bfloat16),
            dot_product_attention(q.astype(jnp.bfloat16), k, k),  # promoted, as layers do
        )

    scaled, doubled, low, mixed = outputs(q, k)
    assert_close(scaled, doubled, n=N_FUNCTION)
    assert low.dtype == jnp.bfloat16 and mixed.dtype == jnp.float32
    np.testing.assert_allclose(low.astype(jnp.float32), mixed, atol=0.05)


@pytest.mark.parametrize("is_causal", [False, True])
def test_xla_implementation_is_jax_program(is_causal):
    q, k = jnp.ones((2, 3, 4, 8)), jnp.ones((2, 6, 2, 8))
    mask = jnp.ones((2, 1, 3, 6), bool)

    def ours(q, k, v, mask):
        return dot_product_attention(q, k, v, mask, is_causal=is_causal, implementation="xla")

    def jax_only(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)

    program = lambda f: str(jax.make_jaxpr(f)(q, k, k, mask))  # noqa: E731
    assert program(ours) == program(jax_only)


# ---------------------------------------------------------------------------------------------
# Implementations: the einsums (the default on CPU) against JAX's own function.

# name: (heads, kv_heads, T, S, mask shape, bias shape, is_causal, causal_offset)
IMPLEMENTATION_CASES = {
    "plain": (4, 4, 3, 5, None, None, False, 0),
    "causal": (4, 4, 4, 4, None, None, True, 0),
    "gqa_causal_shared_mask": (4, 2, 4, 6, (2, 1, 4, 6), None, True, 0),
    "gqa_per_head_mask_row": (4, 2, 3, 5, (2, 4, 1, 5), (4, 3, 5), False, 0),
    "mqa_bias_offset": (4, 1, 3, 6, None, (2, 1, 3, 6), True, 2),
    "gqa_key_mask_only": (6, 3, 3, 4, (2, 1, 1, 4), None, False, 0),
}


@pytest.mark.parametrize("case", IMPLEMENTATION_CASES)
def test_implementations_agree_with_jax(case):
    heads, kv_heads, t, s, mask_shape, bias_shape, is_causal, offset = IMPLEMENTATION_CASES[case]
    q, k, v = (
        _normal((2, t, heads, 8)),
        _normal((2, s, kv_heads, 8), 1),
        _normal((2, s, kv_heads, 8), 2),
    )
    rng = np.random.default_rng(3)
    mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) > 0.3)
    bias = None if bias_shape is None else _normal(bias_shape, 4)
    if is_causal and offset:  # JAX's function knows top-left causal masks only
        rows, cols = np.arange(t)[:, None] + offset, np.arange(s)[None, :]
        reference_mask = jnp.asarray(cols <= rows) if mask is None else mask & (cols <= rows)
    else:
        reference_mask = mask

    def reference(q, k, v):
        causal = is_causal and not offset
        return jax.nn.dot_product_attention(q, k, v, bias, reference_mask, is_causal=causal)

    def ours(implementation):
        def attend(q, k, v):
            return dot_product_attention(
                q, k, v, mask, bias, is_causal, causal_offset=offset, implementation=implementation
            )

        return attend

    cotangent = _normal(q.shape, 5)
    expected = jax.jit(lambda *a: _forward_backward(reference, a, cotangent))(q, k, v)
    for implementation in (None, "einsum", "xla"):
        attend = ours(implementation)
        got = jax.jit(lambda *a, f=attend: _forward_backward(f, a, cotangent))(q, k, v)
        assert_close(got[0], expected[0], n=N_FUNCTION)
        for g, e in zip(got[1], expected[1], strict=True):
            assert_close(g, e, n=N_FUNCTION)


def test_default_implementation_on_cpu_is_the_einsums(monkeypatch):
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(
        jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    )
    q, k = _normal((2, 3, 4, 8)), _normal((2, 5, 2, 8), 1)
    dot_product_attention(q, k, k, is_causal=True)
    layer = mx.transform(MultiHeadAttention(4, 16, num_kv_heads=2))
    variables = layer.init(jax.random.key(0))
    x = _normal((2, 3, 16))
    default = layer.apply(variables, None, x, is_causal=True)[0]
    assert calls == []
    forced_layer = MultiHeadAttention(4, 16, num_kv_heads=2, implementation="xla")
    assert "implementation=xla" in repr(forced_layer)
    forced = mx.transform(forced_layer)
    assert_close(forced.apply(variables, None, x, is_causal=True)[0], default, n=N_LAYER)
    assert [kw["implementation"] for kw in calls] == ["xla"]


def test_projections_that_are_no_dense_are_called_and_reshaped(numpy_init):
    # A Dense projects straight into heads (Dense(..., heads=)); a replacement such as a LoRA
    # adapter is called as it is and its output reshaped.
    layer = MultiHeadAttention(4, 16, num_kv_heads=2)
    variables = numpy_init(mx.transform(layer).init)
    x = _normal((2, 3, 16))
    plain = mx.transform(layer).apply(variables, None, x, is_causal=True)[0]
    adapted = mx.lora(layer, rank=2, target=lambda path, module: path[-1] != "out")
    init_fn, apply_fn = mx.transform(adapted)
    lora_variables = init_fn(jax.random.key(1))
    lora_variables["params"].update(
        {
            name: {**lora_variables["params"][name], **variables["params"][name]}
            for name in variables["params"]
        }
    )
    assert_close(apply_fn(lora_variables, None, x, is_causal=True)[0], plain, n=N_LAYER)
    lora_variables["params"]["key"]["lora_b"] = jnp.ones_like(
        lora_variables["params"]["key"]["lora_b"]
    )
    assert not np.allclose(apply_fn(lora_variables, None, x, is_causal=True)[0], plain, atol=1e-3)


def test_implementation_errors():
    q, k = _normal((2, 3, 4, 8)), _normal((2, 5, 2, 8), 1)
    with pytest.raises(
        mx.errors.LayerConfigError, match=r"'einsum', 'xla' or 'cudnn', got 'flash'"
    ):
        dot_product_attention(q, k, k, implementation="flash")
    with pytest.raises(mx.errors.LayerConfigError, match=r"no dropout.*implementation='einsum'"):
        dot_product_attention(q, k, k, dropout_rate=0.1, rng=_key(0), implementation="xla")
    with pytest.raises(mx.errors.LayerConfigError, match=r"MultiHeadAttention.*got 'XLA'"):
        MultiHeadAttention(4, 16, implementation="XLA")
    with pytest.raises(mx.errors.LayerConfigError, match=r"MultiHeadAttention.*no dropout"):
        MultiHeadAttention(4, 16, dropout_rate=0.1, implementation="cudnn")
    if jax.default_backend() == "cpu":  # JAX's cuDNN attention needs an NVIDIA GPU
        with pytest.raises(mx.errors.LayerConfigError, match=r"'cudnn' cannot run this call"):
            dot_product_attention(q.astype(jnp.bfloat16), k, k, implementation="cudnn")


# ---------------------------------------------------------------------------------------------
# Dropout on the attention weights.


def _attention_inputs(heads=4, kv_heads=2, t=3, s=6):
    return (
        _normal((2, t, heads, 8)),
        _normal((2, s, kv_heads, 8), 1),
        _normal((2, s, kv_heads, 8), 2),
    )


def test_dropout_path_computes_what_jax_computes():
    # A rate so small that nothing is dropped: the written-out path, with a mask, a bias, the
    # causal mask and grouped heads, must give JAX's numbers.
    q, k, v = _attention_inputs()
    mask = jnp.asarray(np.random.default_rng(3).random((2, 1, 3, 6)) > 0.3)
    bias = _normal((4, 3, 6), 4)

    @jax.jit
    def both(q, k, v, mask, bias):
        return [
            (
                dot_product_attention(q, k, v, mask, bias, causal, implementation="xla"),
                dot_product_attention(q, k, v, mask, bias, causal, dropout_rate=1e-9, rng=_key(0)),
            )
            for causal in (False, True)
        ]

    for reference, dropped in both(q, k, v, mask, bias):
        assert_close(dropped, reference, n=N_FUNCTION)


def test_dropout_statistics_and_reproducibility():
    q, k, v = _attention_inputs()

    @jax.jit
    def outputs(keys):
        return (
            dot_product_attention(q, k, v),
            jax.vmap(lambda key: dot_product_attention(q, k, v, dropout_rate=0.5, rng=key))(keys),
            dot_product_attention(q, k, v, dropout_rate=0.0, rng=keys[0]),
            dot_product_attention(q, k, v, dropout_rate=1.0),
        )

    keys = jax.random.split(_key(0), 1000)
    reference, samples, zero, everything = outputs(keys)
    error = np.abs(samples.mean(0) - reference) / (samples.std(0) / np.sqrt(len(keys)))
    assert error.max() < 5  # unbiased: the mean is within 5 standard errors everywhere
    assert not np.allclose(samples[0], reference, atol=1e-3)
    np.testing.assert_array_equal(samples[0], outputs(keys)[1][0])  # the same key, the same
    assert not np.array_equal(samples[0], samples[1])
    np.testing.assert_array_equal(zero, reference)
    np.testing.assert_array_equal(everything, np.zeros(everything.shape))


def test_layer_dropout_draws_from_apply_fn_rngs(numpy_init):
    init_fn, apply_fn = mx.transform(MultiHeadAttention(2, 8, dropout_rate=0.5))
    variables = numpy_init(init_fn)
    x = _normal((2, 4, 8))
    run = jax.jit(
        lambda rngs, **kw: apply_fn(variables, rngs, x, **kw)[0], static_argnames="is_training"
    )
    evaluation = run(None)
    a, c = run(_key(0), is_training=True), run(_key(1), is_training=True)
    assert not np.allclose(a, evaluation) and not np.allclose(a, c)
    np.testing.assert_array_equal(a, run(_key(0), is_training=True))
    b = run({"dropout": _key(0)}, is_training=True)  # the stream itself, not derived from it
    assert not np.allclose(b, evaluation) and not np.allclose(b, a)
    no_dropout = mx.transform(MultiHeadAttention(2, 8))[1]
    assert_close(evaluation, jax.jit(no_dropout)(variables, None, x)[0], n=N_LAYER)
    with pytest.raises(mx.errors.MissingRngError, match="MultiHeadAttention"):
        apply_fn(variables, None, x, is_training=True)


# ---------------------------------------------------------------------------------------------
# Transformations.


def test_jit_grad_vmap():
    q, k, v = _attention_inputs()
    mask = jnp.asarray(np.random.default_rng(3).random((2, 4, 3, 6)) > 0.2)
    fn = lambda q, k, v, mask: dot_product_attention(q, k, v, mask, is_causal=True)  # noqa: E731

    @jax.jit
    def outputs(q, k, v, mask):
        grads = jax.grad(lambda *a: fn(*a, mask).sum(), argnums=(0, 1, 2))(q, k, v)
        return fn(q, k, v, mask), jax.vmap(fn)(q, k, v, mask), grads

    batched, per_example, grads = outputs(q, k, v, mask)
    assert_close(per_example, batched, n=N_FUNCTION)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_layer_under_jit_grad_vmap(numpy_init):
    layer = MultiHeadAttention(4, 8, num_kv_heads=2, rotary=RotaryEmbedding())
    init_fn, apply_fn = mx.transform(layer)
    variables = numpy_init(init_fn)
    x = _normal((3, 5, 8))
    run = lambda v, x: apply_fn(v, None, x, is_causal=True)[0]  # noqa: E731

    @jax.jit
    def outputs(variables, x):
        grads = jax.grad(lambda v: run(v, x).sum())(variables)
        return run(variables, x), jax.vmap(run, (None, 0))(variables, x), grads

    batched, per_example, grads = outputs(variables, x)
    assert_close(per_example, batched, n=N_LAYER)
    assert jax.tree.structure(grads) == jax.tree.structure(variables)


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention against torch.nn.MultiheadAttention.


def _check_against_torch_mha(torch, torch_layer, layer, torch_inputs, torch_call, our_call):
    """Outputs within 1e-5, gradients of inputs and parameters within 1e-4, weights moved by
    load_state_dict and our parameter gradients laid out by to_state_dict."""
    params = load_state_dict(layer, torch_layer.state_dict())["params"]
    apply_fn = mx.transform(layer)[1]
    torch_inputs = [a.detach().clone().requires_grad_(True) for a in torch_inputs]
    torch_out = torch_call(*torch_inputs)
    cotangent = np.random.default_rng(0).standard_normal(torch_out.shape).astype(np.float32)
    (torch_out * torch.from_numpy(cotangent)).sum().backward()

    def ours(params, *inputs):
        return our_call(lambda *a, **kw: apply_fn({"params": params}, None, *a, **kw)[0], *inputs)

    jax_inputs = [jnp.asarray(a.detach().numpy()) for a in torch_inputs]
    out, (param_grads, *input_grads) = jax.jit(_forward_backward, static_argnums=0)(
        ours, [params, *jax_inputs], cotangent
    )
    np.testing.assert_allclose(out, torch_out.detach().numpy(), atol=FORWARD_TOL, rtol=FORWARD_TOL)
    for grad, arg in zip(input_grads, torch_inputs, strict=True):
        np.testing.assert_allclose(grad, arg.grad.numpy(), atol=GRAD_TOL, rtol=GRAD_TOL)
    expected = {name: p.grad.numpy() for name, p in torch_layer.named_parameters()}
    got = {k: t.numpy() for k, t in to_state_dict(layer, {"params": param_grads}).items()}
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        np.testing.assert_allclose(grad, expected[name], atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=name)


def test_self_attention_matches_torch(torch):
    torch_layer = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    _check_against_torch_mha(
        torch,
        torch_layer,
        MultiHeadAttention(2, 8),
        [torch.randn(2, 5, 8)],
        lambda x: torch_layer(x, x, x, need_weights=False)[0],
        lambda layer, x: layer(x),  # key and value omitted: self-attention
    )


def test_masks_match_torch(torch):
    torch_layer = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])  # True: ignore
    attn_mask = torch.rand(4, 5) > 0.7
    attn_mask[:, 0] = False

    def ours(layer, q, kv):
        keep = ~jnp.asarray(padding.numpy())[:, None, None, :]
        return layer(q, kv, kv, keep & ~jnp.asarray(attn_mask.numpy())[None, None])

    _check_against_torch_mha(
        torch,
        torch_layer,
        MultiHeadAttention(2, 8),
        [torch.randn(2, 4, 8), torch.randn(2, 5, 8)],
        lambda q, kv: torch_layer(
            q, kv, kv, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False
        )[0],
        ours,
    )


def test_float_mask_and_causal_match_torch(torch):
    torch_layer = torch.nn.MultiheadAttention(8, 4, batch_first=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)  # float: 0 and -inf
    _check_against_torch_mha(
        torch,
        torch_layer,
        MultiHeadAttention(4, 8),
        [torch.randn(3, 5, 8), torch.randn(4, 5, 5)],
        lambda x, bias: torch_layer(
            x, x, x, attn_mask=causal + bias.repeat(3, 1, 1), need_weights=False
        )[0],
        lambda layer, x, bias: layer(x, bias=bias, is_causal=True),
    )


def test_cross_attention_with_kdim_vdim_matches_torch(torch):
    torch_layer = torch.nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)
    assert "q_proj_weight" in torch_layer.state_dict()
    _check_against_torch_mha(
        torch,
        torch_layer,
        MultiHeadAttention(2, 8, key_size=6, value_size=5),
        [torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)],
        lambda q, k, v: torch_layer(q, k, v, need_weights=False)[0],
        lambda layer, q, k, v: layer(q, k, v),
    )


def test_no_bias_matches_torch(torch):
    torch_layer = torch.nn.MultiheadAttention(6, 3, bias=False, batch_first=True)
    _check_against_torch_mha(
        torch,
        torch_layer,
        MultiHeadAttention(3, 6, use_bias=False),
        [torch.randn(2, 3, 6)],
        lambda x: torch_layer(x, x, x, need_weights=False)[0],
        lambda layer, x: layer(x),
    )


def test_torch_conversions_round_trip_and_cache(torch):
    torch_layer = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    layer = MultiHeadAttention(2, 8)
    layer.init_cache(2, 6)
    variables = load_state_dict(layer, torch_layer.state_dict())  # the cache starts empty
    assert jax.tree.map(jnp.shape, variables["cache"]) == {
        "cached_key": (2, 6, 2, 4),
        "cached_value": (2, 6, 2, 4),
        "cache_index": (),
    }
    assert not any(bool(a.any()) for a in jax.tree.leaves(variables["cache"]))
    back = to_state_dict(layer, variables)
    assert back.keys() == torch_layer.state_dict().keys()
    for name, tensor in torch_layer.state_dict().items():
        np.testing.assert_array_equal(back[name].numpy(), tensor.numpy())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_kv_heads=1), "num_kv_heads=1"),
        (dict(qkv_size=16), "qkv_size=16"),
        (dict(out_size=4), "out_size=4"),
    ],
)
def test_torch_conversions_without_twin(kwargs, fragment):
    with pytest.raises(mx.errors.LayerConfigError) as info:
        torch_conversions(MultiHeadAttention(2, 8, **kwargs))
    message = str(info.value)
    assert fragment in message and "torch.nn.MultiheadAttention has one size" in message
    assert "torch_layout=AttentionLayout(" in message  # Hugging Face layouts have no such limit


# ---------------------------------------------------------------------------------------------
# The layer: variables, rotary embeddings, dtypes.


def test_variables_paths_and_shapes():
    layer = MultiHeadAttention(4, 12, qkv_size=16, out_size=10, num_kv_heads=2, key_size=6)
    layer.init_cache((2, 3), 7, dtype=jnp.bfloat16)
    shapes = jax.tree.map(
        lambda a: (a.shape, a.dtype.name), jax.eval_shape(mx.init(layer), jax.random.key(0))
    )
    f32 = "float32"
    assert shapes == {
        "params": {
            "query": {"kernel": ((12, 16), f32), "bias": ((16,), f32)},
            "key": {"kernel": ((6, 8), f32), "bias": ((8,), f32)},
            "value": {"kernel": ((6, 8), f32), "bias": ((8,), f32)},
            "out": {"kernel": ((16, 10), f32), "bias": ((10,), f32)},
        },
        "cache": {
            "cached_key": ((2, 3, 7, 2, 4), "bfloat16"),
            "cached_value": ((2, 3, 7, 2, 4), "bfloat16"),
            "cache_index": ((), "int32"),
        },
    }
    assert layer.extra_repr() == (
        "num_heads=4, in_size=12, qkv_size=16, out_size=10, num_kv_heads=2, key_size=6, "
        "cache=(batch_shape=(2, 3), max_length=7)"
    )
    assert MultiHeadAttention(2, 8, dropout_rate=0.1).extra_repr() == (
        "num_heads=2, in_size=8, dropout_rate=0.1"
    )
    assert RotaryEmbedding(rotary_dim=4).extra_repr() == "max_timescale=10000.0, rotary_dim=4"


def test_computation_and_parameter_dtypes(numpy_init):
    layer = MultiHeadAttention(2, 8, dtype=jnp.bfloat16)
    init_fn, apply_fn = mx.transform(layer)
    variables = numpy_init(init_fn)
    x = _normal((2, 3, 8))
    stored = mx.transform(MultiHeadAttention(2, 8, param_dtype=jnp.bfloat16))
    reference_fn = mx.transform(MultiHeadAttention(2, 8))[1]

    @jax.jit
    def outputs(variables, stored_variables, x):
        return (
            apply_fn(variables, None, x)[0],
            reference_fn(variables, None, x)[0],
            stored[1](stored_variables, None, x.astype(jnp.bfloat16))[0],
        )

    y, reference, y16 = outputs(variables, numpy_init(stored[0]), x)
    assert y.dtype == jnp.bfloat16 and y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), reference, atol=0.1, rtol=0.1)


def test_rotary_embedding():
    x = _normal((2, 5, 3, 8))
    positions = jnp.arange(5) + 2
    full_fn = mx.transform(RotaryEmbedding(max_timescale=100.0))[1]
    partial_fn = mx.transform(RotaryEmbedding(rotary_dim=4))[1]

    @jax.jit
    def outputs(x, positions):
        return (
            full_fn({}, None, x, positions)[0],
            mx.apply_rotary(x, positions, 100.0),
            partial_fn({}, None, x, positions)[0],
            mx.apply_rotary(x[..., :4], positions),
        )

    full, expected_full, partial, expected_partial = outputs(x, positions)
    # The same rotation (x * cos - y * sin, ...), which XLA may fuse into two kernels and round
    # apart (a multiply-add fused in one): a few roundings. The unrotated rest is copied.
    assert_close(full, expected_full, n=4)
    assert_close(partial[..., :4], expected_partial, n=4)
    np.testing.assert_array_equal(partial[..., 4:], x[..., 4:])


def test_rotary_sees_relative_positions(numpy_init):
    init_fn, apply_fn = mx.transform(MultiHeadAttention(2, 8, rotary=RotaryEmbedding()))
    variables = numpy_init(init_fn)
    x, memory = _normal((2, 4, 8)), _normal((2, 6, 8), 1)
    t, s = jnp.arange(4), jnp.arange(6)

    @jax.jit
    def outputs(x, memory):
        run = lambda *args, **kwargs: apply_fn(variables, None, *args, **kwargs)[0]  # noqa: E731
        return (
            run(x, is_causal=True),
            run(x, is_causal=True, positions=t + 7),  # the same relative positions
            run(x, positions=t[::-1]),
            # Cross-attention: the keys count from 0 unless given their own positions.
            run(x, memory),
            run(x, memory, positions=t + 3, key_positions=s + 3),
            run(x, memory, positions=t + 3),
        )

    base, shifted, reversed_, cross, moved, only_queries_moved = outputs(x, memory)
    # Other positions round their angles (position * frequency, up to 13) apart: 4x N_LAYER.
    assert_close(shifted, base, n=4 * N_LAYER)
    assert not np.allclose(reversed_, base)
    assert_close(moved, cross, n=4 * N_LAYER)
    assert not np.allclose(only_queries_moved, cross)


# ---------------------------------------------------------------------------------------------
# The key/value cache.


def _decoder(numpy_init, batch_shape, max_length):
    """A GQA layer with rotary embeddings and a cache: ``apply_fn`` and variables with random
    parameters and an empty cache."""
    layer = MultiHeadAttention(4, 16, num_kv_heads=2, rotary=RotaryEmbedding())
    layer.init_cache(batch_shape, max_length)
    init_fn, apply_fn = mx.transform(layer)
    variables = numpy_init(init_fn)
    variables["cache"] = jax.tree.map(jnp.zeros_like, variables["cache"])
    return apply_fn, variables


@pytest.mark.parametrize("chunks", [(1,) * 6, (3, 1, 2)])
def test_decoding_equals_the_causal_pass(numpy_init, chunks):
    apply_fn, variables = _decoder(numpy_init, 2, 8)
    x = _normal((2, 6, 16), 1)
    full, unchanged = apply_fn(variables, None, x, is_causal=True)  # the cache is not used
    assert int(unchanged["cache"]["cache_index"]) == 0
    step = jax.jit(apply_fn, static_argnames="decode")
    outputs, start = [], 0
    for size in chunks:
        y, variables = step(variables, None, x[:, start : start + size], decode=True)
        outputs.append(y)
        start += size
    assert int(variables["cache"]["cache_index"]) == 6
    assert_close(jnp.concatenate(outputs, axis=1), full, n=N_LAYER)


def test_decoding_unbatched_with_a_padding_mask(numpy_init):
    apply_fn, variables = _decoder(numpy_init, (), 5)
    run = jax.jit(apply_fn, static_argnames=("decode", "is_causal"))
    x = _normal((4, 16), 2)
    keep = jnp.asarray([False, True, True, True, True])  # slot 0 is padding
    full, _ = run(variables, None, x, mask=keep[:4], is_causal=True)
    outputs = []
    for i in range(4):
        y, variables = run(variables, None, x[i : i + 1], mask=keep, decode=True)
        outputs.append(y)
    assert_close(jnp.concatenate(outputs)[1:], full[1:], n=N_LAYER)


def test_cache_overflow(numpy_init):
    apply_fn, variables = _decoder(numpy_init, 1, 4)
    step = jax.jit(apply_fn, static_argnames="decode")
    _, variables = step(variables, None, _normal((1, 3, 16)), decode=True)
    # A concrete index (outside jit): an error, raised before any work.
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(variables, None, _normal((1, 2, 16)), decode=True)
    message = str(info.value)
    assert "MultiHeadAttention (root)" in message and "holds 4 positions" in message
    assert "3 are filled" in message and "larger max_length" in message
    # Under jit the index is unknown: the output is NaN instead, and stays NaN.
    y, overflowed = step(variables, None, _normal((1, 2, 16)), decode=True)
    assert bool(jnp.isnan(y).all()) and int(overflowed["cache"]["cache_index"]) == 5
    y, _ = step(overflowed, None, _normal((1, 1, 16)), decode=True)
    assert bool(jnp.isnan(y).all())
    y, _ = step(variables, None, _normal((1, 1, 16)), decode=True)  # the last slot: fine
    assert not bool(jnp.isnan(y).any())


class _Block(mx.Module):
    def __init__(self, layer):
        self.attn = layer

    def __call__(self, *args, **kwargs):
        return self.attn(*args, **kwargs)


def test_decode_without_cache_or_with_another_batch(numpy_init):
    init_fn, apply_fn = mx.transform(_Block(MultiHeadAttention(2, 8)))
    with pytest.raises(mx.errors.LayerConfigError) as info:
        apply_fn(numpy_init(init_fn), None, jnp.ones((1, 1, 8)), decode=True)
    message = str(info.value)
    assert (
        "MultiHeadAttention at 'attn'" in message
        and "init_cache(batch_shape, max_length)" in message
    )
    layer = MultiHeadAttention(2, 8)
    layer.init_cache(2, 4)
    init_fn, apply_fn = mx.transform(_Block(layer))
    with pytest.raises(mx.errors.InputShapeError, match=r"batch axes \(2,\).*query \(3, 1, 8\)"):
        apply_fn(numpy_init(init_fn), None, jnp.ones((3, 1, 8)), decode=True)


# ---------------------------------------------------------------------------------------------
# Errors.

_Q, _K = jnp.ones((2, 3, 4, 8)), jnp.ones((2, 5, 2, 8))


@pytest.mark.parametrize(
    "args, kwargs, error, fragments",
    [
        ((jnp.ones((3, 8)), _K, _K), {}, mx.errors.InputShapeError, ["(3, 8)", "Split the heads"]),
        ((_Q, _K, jnp.ones((2, 5, 2, 4))), {}, mx.errors.InputShapeError, ["same shape"]),
        ((_Q, jnp.ones((3, 5, 2, 8)), jnp.ones((3, 5, 2, 8))), {}, mx.errors.InputShapeError,
         ["batch axes (2,)", "(3,)"]),
        ((_Q, jnp.ones((2, 5, 2, 4)), jnp.ones((2, 5, 2, 4))), {}, mx.errors.InputShapeError,
         ["head_dim 8", "key's 4"]),
        ((_Q, jnp.ones((2, 5, 3, 8)), jnp.ones((2, 5, 3, 8))), {}, mx.errors.InputShapeError,
         ["kv_heads=3 does not divide heads=4"]),
        ((_Q.astype(jnp.int32), _K.astype(jnp.int32), _K.astype(jnp.int32)), {},
         mx.errors.InputDtypeError, ["floating", "int32", "dtype=jnp.float32"]),
        ((_Q, _K, _K, jnp.ones((5, 3), bool)), {}, mx.errors.InputShapeError,
         ["`mask` of shape (5, 3)", "(2, 4, 3, 5)"]),
        ((_Q, _K, _K, jnp.ones((1, 2, 4, 3, 5), bool)), {}, mx.errors.InputShapeError,
         ["`mask` of shape (1, 2, 4, 3, 5)"]),
        ((_Q, _K, _K, jnp.ones((3, 5))), {}, mx.errors.InputDtypeError,
         ["`mask` must be boolean", "float32", "as `bias`"]),
        ((_Q, _K, _K, None, jnp.ones((2, 2, 3, 5))), {}, mx.errors.InputShapeError,
         ["`bias` of shape (2, 2, 3, 5)"]),
        ((_Q, _K, _K, None, jnp.ones((3, 5), bool)), {}, mx.errors.InputDtypeError,
         ["`bias` is added to the logits", "bool"]),
        ((_Q, _K, _K), {"causal_offset": 2}, mx.errors.LayerConfigError,
         ["causal_offset=2", "is_causal=False"]),
        ((_Q, _K, _K), {"causal_offset": jnp.int32(2)}, mx.errors.LayerConfigError,
         ["is_causal=False"]),
        ((_Q, _K, _K, None, None, True), {"causal_offset": 1.5}, mx.errors.InputDtypeError,
         ["`causal_offset` must be an int", "1.5"]),
        ((_Q, _K, _K, None, None, True), {"causal_offset": jnp.zeros(2, jnp.int32)},
         mx.errors.InputShapeError, ["single offset", "(2,)"]),
        ((_Q, _K, _K), {"dropout_rate": 1.5}, mx.errors.LayerConfigError,
         ["dot_product_attention", "dropout_rate", "1.5"]),
        # Found by tests/test_bad_arguments.py: these reached JAX or NumPy unchecked.
        ((_Q, _K, _K, "x"), {}, mx.errors.InputDtypeError, ["`mask` must be an array", "'x'"]),
        ((_Q, _K, _K, None, "D"), {}, mx.errors.InputDtypeError, ["`bias` must be an array"]),
        ((_Q, _K, _K, None, [None]), {}, mx.errors.InputDtypeError, ["`bias` must be an array"]),
        ((_Q, _K, _K, None, 2**70), {}, mx.errors.InputDtypeError, ["`bias`", "11805916"]),
        ((_Q, _K, _K, None, None, True), {"causal_offset": "2"}, mx.errors.InputDtypeError,
         ["`causal_offset` must be an array"]),
        ((_Q, _K, _K, None, None, np.ones(2)), {}, mx.errors.LayerConfigError,
         ["`is_causal` must be True or False"]),
        ((_Q, _K, _K), {"scale": "0.5"}, mx.errors.LayerConfigError, ["`scale`", "'0.5'"]),
        ((_Q, _K, _K), {"scale": [1.0, 2.0]}, mx.errors.LayerConfigError, ["`scale`", "None"]),
        ((_Q, _K, _K), {"dtype": "zeros"}, mx.errors.LayerConfigError, ["`dtype`", "'zeros'"]),
        ((_Q, _K, _K), {"dtype": jnp.int32}, mx.errors.LayerConfigError, ["a floating dtype"]),
        ((_Q, _K, _K), {"dropout_rate": 0.5, "rng": 0}, mx.errors.RngsTypeError,
         ["`rng` must be one random key", "got int 0", "rng=None"]),
        ((_Q, _K, _K), {"rng": jax.random.split(jax.random.key(0))}, mx.errors.RngsTypeError,
         ["a batch of keys of shape (2,)"]),
    ],
)  # fmt: skip
def test_function_errors(args, kwargs, error, fragments):
    with pytest.raises(error) as info:
        dot_product_attention(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("dot_product_attention")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_function_errors_name_the_calling_layer(numpy_init):
    init_fn, apply_fn = mx.transform(_Block(MultiHeadAttention(2, 8)))
    x = jnp.ones((2, 3, 8))
    with pytest.raises(mx.errors.InputShapeError) as info:
        apply_fn(numpy_init(init_fn), None, x, mask=jnp.ones((4, 3), bool))
    assert "dot_product_attention in MultiHeadAttention at 'attn'" in str(info.value)
    with pytest.raises(mx.errors.ApplyContextError):  # outside apply_fn, without rng
        dot_product_attention(_Q, _K, _K, dropout_rate=0.5)


def test_layer_input_errors(numpy_init):
    init_fn, apply_fn = mx.transform(_Block(MultiHeadAttention(2, 8, key_size=6)))
    variables = numpy_init(init_fn)
    x = jnp.ones((2, 3, 8))
    cases = [
        ((jnp.ones(8),), ["(*batch, length, features)", "(8,)"]),
        ((x, jnp.ones((2, 4, 6)), jnp.ones((2, 5, 8))), ["same leading axes", "(2, 5, 8)"]),
        ((x, jnp.ones((3, 4, 6)), jnp.ones((3, 4, 8))), ["same batch axes", "(3, 4, 6)"]),
    ]
    for args, fragments in cases:
        with pytest.raises(mx.errors.InputShapeError) as info:
            apply_fn(variables, None, *args)
        message = str(info.value)
        assert "MultiHeadAttention at 'attn'" in message
        for fragment in fragments:
            assert fragment in message, (fragment, message)
    with pytest.raises(mx.errors.InputShapeError, match="Dense at 'attn/key'.*in_size=6"):
        apply_fn(variables, None, x, x)
    with pytest.raises(mx.errors.LayerConfigError, match="'attn'.*no rotary embedding"):
        apply_fn(variables, None, x, positions=jnp.arange(3))


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(num_heads=0, in_size=8), ["`num_heads` must be a positive int"]),
        (dict(num_heads=2, in_size=8, key_size=2.0), ["`key_size`"]),
        (dict(num_heads=3, in_size=8), ["qkv_size=8", "multiple of num_heads=3", "qkv_size=6"]),
        (dict(num_heads=4, in_size=8, num_kv_heads=3), ["num_kv_heads=3 must divide"]),
        (dict(num_heads=2, in_size=8, dropout_rate=-0.1), ["`dropout_rate`"]),
        (dict(num_heads=2, in_size=8, rotary=True), ["RotaryEmbedding or None"]),
        (dict(num_heads=2, in_size=6, rotary=RotaryEmbedding()),
         ["head_dim=qkv_size // num_heads=3"]),
        (dict(num_heads=2, in_size=8, rotary=RotaryEmbedding(rotary_dim=6)),
         ["rotates 6 channels"]),
    ],
)  # fmt: skip
def test_layer_config_errors(kwargs, fragments):
    with pytest.raises(mx.errors.LayerConfigError) as info:
        MultiHeadAttention(**kwargs)
    message = str(info.value)
    assert message.startswith("MultiHeadAttention")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_rotary_and_cache_config_errors():
    with pytest.raises(mx.errors.LayerConfigError, match="`rotary_dim` must be even.*rotary_dim=4"):
        RotaryEmbedding(rotary_dim=5)
    with pytest.raises(mx.errors.LayerConfigError, match="`rotary_dim` must be a positive int"):
        RotaryEmbedding(rotary_dim=0)
    with pytest.raises(mx.errors.LayerConfigError, match="RotaryEmbedding: `max_timescale`"):
        RotaryEmbedding(max_timescale=-1.0)
    layer = MultiHeadAttention(2, 8)
    with pytest.raises(mx.errors.LayerConfigError, match=re.escape("init_cache: `max_length`")):
        layer.init_cache(2, 0)
    with pytest.raises(mx.errors.LayerConfigError, match=re.escape("init_cache: `batch_shape`")):
        layer.init_cache((2, -1), 4)
    _, apply_fn = mx.transform(RotaryEmbedding(rotary_dim=4))
    with pytest.raises(mx.errors.InputShapeError, match=r"rotary_dim=4.*head_dim 2"):
        apply_fn({}, None, jnp.ones((3, 1, 2)), jnp.arange(3))
