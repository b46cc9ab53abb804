"""Hugging Face models built from small configs (random weights, nothing downloaded), saved with
save_pretrained as safetensors (one file, and shards), loaded into their metoryx twins by path
with mx.AttentionLayout, and compared on the same tokens; save_state_dict's file loads back
into transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx
from metoryx.interop.torch import load_state_dict, save_state_dict

TOL = 1e-5
VOCAB, WIDTH, HEADS, LAYERS, LENGTH = 32, 16, 4, 2, 7

LLAMA_LAYOUT = mx.AttentionLayout(query="q_proj", key="k_proj", value="v_proj", out="o_proj")
GPT2_LAYOUT = mx.AttentionLayout(qkv="c_attn", out="c_proj", weights="conv1d")


@pytest.fixture
def transformers(torch):
    return pytest.importorskip("transformers")


class LlamaMLP(mx.Module):
    def __init__(self, hidden):
        self.gate_proj = mx.Dense(WIDTH, hidden, use_bias=False)
        self.up_proj = mx.Dense(WIDTH, hidden, use_bias=False)
        self.down_proj = mx.Dense(hidden, WIDTH, use_bias=False)

    def __call__(self, x):
        return self.down_proj(mx.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(mx.Module):
    def __init__(self, kv_heads):
        self.input_layernorm = mx.RMSNorm(WIDTH, epsilon=1e-6)
        self.self_attn = mx.MultiHeadAttention(
            HEADS,
            WIDTH,
            num_kv_heads=kv_heads,
            use_bias=False,
            rotary=mx.RotaryEmbedding(max_timescale=10000.0),
            torch_layout=LLAMA_LAYOUT,
        )
        self.post_attention_layernorm = mx.RMSNorm(WIDTH, epsilon=1e-6)
        self.mlp = LlamaMLP(2 * WIDTH)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x), is_causal=True)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(mx.Module):
    """transformers' LlamaModel (and MistralModel): its last hidden state."""

    def __init__(self, kv_heads):
        self.embed_tokens = mx.Embed(VOCAB, WIDTH)
        self.layers = [LlamaLayer(kv_heads) for _ in range(LAYERS)]
        self.norm = mx.RMSNorm(WIDTH, epsilon=1e-6)

    def __call__(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class GPT2MLP(mx.Module):
    def __init__(self):
        self.c_fc = mx.Dense(WIDTH, 4 * WIDTH)
        self.c_proj = mx.Dense(4 * WIDTH, WIDTH)

    def __call__(self, x):
        return self.c_proj(mx.gelu(self.c_fc(x), approximate=True))

    def torch_conversions(self):
        # GPT-2's Conv1D stores weights (in, out), our kernels' layout: the same arrays.
        return [
            mx.layout.same(f"{n}.{entry}", f"{n}/{variable}")
            for n in ("c_fc", "c_proj")
            for entry, variable in (("weight", "kernel"), ("bias", "bias"))
        ]


class GPT2Block(mx.Module):
    def __init__(self):
        self.ln_1 = mx.LayerNorm(WIDTH)
        self.attn = mx.MultiHeadAttention(HEADS, WIDTH, torch_layout=GPT2_LAYOUT)
        self.ln_2 = mx.LayerNorm(WIDTH)
        self.mlp = GPT2MLP()

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x), is_causal=True)
        return x + self.mlp(self.ln_2(x))


class GPT2(mx.Module):
    """transformers' GPT2Model: its last hidden state."""

    def __init__(self):
        self.wte = mx.Embed(VOCAB, WIDTH)
        self.wpe = mx.Embed(LENGTH, WIDTH)
        self.h = [GPT2Block() for _ in range(LAYERS)]
        self.ln_f = mx.LayerNorm(WIDTH)

    def __call__(self, ids):
        x = self.wte(ids) + self.wpe(jnp.arange(ids.shape[-1]))[None]
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


def _llama(transformers, kv_heads):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=LENGTH,
        rms_norm_eps=1e-6,
    )
    return transformers.LlamaModel(config).eval()


def _gpt2(transformers):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=LENGTH
    )
    return transformers.GPT2Model(config).eval()


def _randomize(torch, hf_model):
    """Norm weights and biases away from 1 and 0, so that a mix-up shows."""
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _compare(torch, hf_model, model, variables):
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    expected = hf_model(input_ids=ids).last_hidden_state.detach().numpy()
    out, _ = mx.apply(model)(variables, None, jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1], ids=["mha", "gqa", "mqa"])
def test_llama_loads_from_safetensors_shards(torch, transformers, tmp_path, kv_heads):
    theirs = _llama(transformers, kv_heads)
    _randomize(torch, theirs)
    # Small shards: the checkpoint is split in several files with an index.
    theirs.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="8KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = Llama(kv_heads)
    variables = load_state_dict(model, tmp_path)
    assert variables["params"]["layers"]["0"]["self_attn"]["key"]["kernel"].shape == (
        WIDTH,
        kv_heads * WIDTH // HEADS,
    )
    _compare(torch, theirs, model, variables)


@pytest.mark.slow
def test_gpt2_loads_from_one_safetensors_file_and_saves_back(torch, transformers, tmp_path):
    theirs = _gpt2(transformers)
    _randomize(torch, theirs)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    model = GPT2()
    variables = load_state_dict(model, tmp_path / "model.safetensors")
    _compare(torch, theirs, model, variables)

    # Our file in a directory with the config loads into transformers, strictly.
    out = tmp_path / "ours"
    out.mkdir()
    theirs.config.save_pretrained(out)
    save_state_dict(model, variables, out / "model.safetensors")
    again = transformers.GPT2Model.from_pretrained(out).eval()
    for name, tensor in theirs.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), tensor.numpy(), name)


@pytest.mark.slow
def test_bert_self_attention_layout(torch, transformers, tmp_path):
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=LENGTH,
    )
    theirs = transformers.BertModel(config, add_pooling_layer=False).eval()
    _randomize(torch, theirs)
    attention = theirs.encoder.layer[0].attention  # BertAttention: self.{q,k,v}, output.dense
    layout = mx.AttentionLayout(
        query="self.query", key="self.key", value="self.value", out="output.dense"
    )
    ours = mx.MultiHeadAttention(HEADS, WIDTH, torch_layout=layout)
    state = {k: v for k, v in attention.state_dict().items() if "LayerNorm" not in k}
    path = tmp_path / "attention.safetensors"
    safetensors_torch = pytest.importorskip("safetensors.torch")  # it imports torch
    safetensors_torch.save_file(state, str(path))
    variables = load_state_dict(ours, path)
    x = torch.randn(2, LENGTH, WIDTH)
    # BertSelfOutput adds the input and normalizes after output.dense: compare up to there.
    with torch.no_grad():
        context = attention.self(x)[0]
        expected = attention.output.dense(context).numpy()
    out, _ = mx.apply(ours)(variables, None, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=TOL)
