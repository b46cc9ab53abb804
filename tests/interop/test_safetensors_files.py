"""load_state_dict from safetensors files (one file, shards with an index, a directory) and
save_state_dict, through NumPy alone: these run where PyTorch is not installed."""

import json
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import metoryx as mx
from metoryx.interop.torch import load_state_dict, save_state_dict


class Net(mx.Module):
    def __init__(self):
        self.embed = mx.Embed(7, 8)
        self.attn = mx.MultiHeadAttention(
            4,
            8,
            num_kv_heads=2,
            use_bias=False,
            torch_layout=mx.AttentionLayout(query="q", key="k", value="v", out="o"),
        )
        self.norm = mx.LayerNorm(8)
        self.head = mx.Dense(8, 3)


def _state_dict(dtype=np.float32):
    rng = np.random.default_rng(0)
    shapes = {
        "embed.weight": (7, 8),
        "attn.q.weight": (8, 8),
        "attn.k.weight": (4, 8),  # 2 key/value heads of head_dim 2
        "attn.v.weight": (4, 8),
        "attn.o.weight": (8, 8),
        "norm.weight": (8,),
        "norm.bias": (8,),
        "head.weight": (3, 8),
        "head.bias": (3,),
    }
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def _assert_loaded(variables, state_dict):
    params = variables["params"]
    np.testing.assert_array_equal(params["attn"]["key"]["kernel"], state_dict["attn.k.weight"].T)
    np.testing.assert_array_equal(params["head"]["kernel"], state_dict["head.weight"].T)
    np.testing.assert_array_equal(params["norm"]["scale"], state_dict["norm.weight"])


def test_a_safetensors_file_loads_like_the_dict(tmp_path):
    state_dict = _state_dict()
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state_dict, str(path))
    from_file = load_state_dict(Net(), path)
    _assert_loaded(from_file, state_dict)
    from_dict = load_state_dict(Net(), state_dict)
    jax.tree.map(np.testing.assert_array_equal, from_file, from_dict)
    # A str path and the directory that holds model.safetensors read the same.
    for source in (str(path), tmp_path):
        jax.tree.map(np.testing.assert_array_equal, load_state_dict(Net(), source), from_dict)


def test_a_sharded_checkpoint_loads_through_its_index_or_its_directory(tmp_path):
    state_dict = _state_dict()
    names = list(state_dict)
    shards = {
        "model-00001-of-00002.safetensors": names[:4],
        "model-00002-of-00002.safetensors": names[4:],
    }
    for file, part in shards.items():
        safetensors.numpy.save_file({n: state_dict[n] for n in part}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = load_state_dict(Net(), state_dict)
    for source in (tmp_path / "model.safetensors.index.json", tmp_path):
        jax.tree.map(np.testing.assert_array_equal, load_state_dict(Net(), source), expected)


def test_bfloat16_tensors_load_and_cast_to_the_variables_dtype(tmp_path):
    state_dict = _state_dict(ml_dtypes.bfloat16)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state_dict, str(path))
    variables = load_state_dict(Net(), path)
    kernel = variables["params"]["head"]["kernel"]
    assert kernel.dtype == np.float32  # the variable's dtype; bfloat16 -> float32 is exact
    np.testing.assert_array_equal(kernel, state_dict["head.weight"].T.astype(np.float32))


def test_save_state_dict_writes_what_load_state_dict_and_safetensors_read(tmp_path, getkey):
    model = Net()
    variables = mx.init(model)(getkey())
    path = tmp_path / "out.safetensors"
    save_state_dict(model, variables, path, metadata={"step": "3"})
    jax.tree.map(np.testing.assert_array_equal, load_state_dict(model, path), variables)
    written = safetensors.numpy.load_file(str(path))
    assert written.keys() == _state_dict().keys()
    np.testing.assert_array_equal(
        written["attn.k.weight"], variables["params"]["attn"]["key"]["kernel"].T
    )
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}  # transformers requires "pt"


def test_save_state_dict_keeps_bfloat16(tmp_path, getkey):
    model = mx.Dense(3, 4, param_dtype=jax.numpy.bfloat16)  # param_dtype: the storage dtype
    variables = mx.init(model)(getkey())
    path = tmp_path / "model.safetensors"
    save_state_dict(model, variables, path)
    assert safetensors.numpy.load_file(str(path))["weight"].dtype == ml_dtypes.bfloat16
    jax.tree.map(np.testing.assert_array_equal, load_state_dict(model, path), variables)


def test_loading_from_a_file_checks_names_and_shapes_as_for_a_dict(tmp_path):
    state_dict = _state_dict()
    state_dict["attn.k.weight"] = np.zeros((8, 8), np.float32)  # as many kv heads as heads
    del state_dict["head.bias"]
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state_dict, str(path))
    with pytest.raises(
        mx.errors.VariableShapeError, match=r"attn.k.weight: expected \(4, 8\), got \(8, 8\)"
    ):
        load_state_dict(Net(), path)
    state_dict["attn.k.weight"] = np.zeros((4, 8), np.float32)
    safetensors.numpy.save_file(state_dict, str(path))
    with pytest.raises(mx.errors.VariablesStructureError, match=r"Missing \(1\): head.bias"):
        load_state_dict(Net(), path)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "absent.safetensors", "absent.safetensors: no such file"),
        (lambda d: d, "holds neither model.safetensors nor model.safetensors.index.json"),
        (lambda d: _write(d / "model.safetensors", b"\x00" * 5), "not a readable safetensors file"),
        (lambda d: _write(d / "torn.safetensors", _torn()), "not a readable safetensors file"),
        (lambda d: _write(d / "i.index.json", b"{not json"), "not a sharded checkpoint's index"),
        (lambda d: _write(d / "i.index.json", b'{"weight_map": [1]}'), '"weight_map" must map'),
        (
            lambda d: _write(d / "i.index.json", b'{"weight_map": {"a": "gone.safetensors"}}'),
            "shards that are not beside it: gone.safetensors",
        ),
    ],
)
def test_unreadable_checkpoints_raise_checkpoint_error_naming_the_file(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(mx.errors.CheckpointError, match=match) as info:
        load_state_dict(Net(), path)
    assert str(path) in str(info.value)


def _write(path, data):
    path.write_bytes(data)
    return path


def _torn():
    return safetensors.numpy.save(_state_dict())[:-10]


def test_no_torch_is_imported_to_read_or_write_files(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, numpy as np, safetensors.numpy, metoryx as mx
        from metoryx.interop.torch import load_state_dict, save_state_dict
        path = {str(tmp_path / "model.safetensors")!r}
        safetensors.numpy.save_file({{"weight": np.ones((4, 3), np.float32),
                                      "bias": np.zeros(4, np.float32)}}, path)
        variables = load_state_dict(mx.Dense(3, 4), path)
        save_state_dict(mx.Dense(3, 4), variables, path)
        load_state_dict(mx.Dense(3, 4), path)
        print("torch" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
