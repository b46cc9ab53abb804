"""mx.summary: rows per module call, variables per collection, FLOPs from XLA, abstractly."""

import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import metoryx as mx

F32 = jnp.float32


def _row(result, path, module=None):
    rows = [r for r in result.rows if r.path == path and (module is None or r.module == module)]
    assert len(rows) == 1, [(r.path, r.module) for r in result.rows]
    return rows[0]


class ConvNet(mx.Module):
    def __init__(self):
        self.conv = mx.Conv(3, 16, kernel_size=(3, 3), padding="VALID", use_bias=False)
        self.bn = mx.BatchNorm(16)
        self.fc = mx.Dense(6 * 6 * 16, 10)

    def __call__(self, x, is_training=False):
        x = mx.relu(self.bn(self.conv(x), is_training=is_training))
        return self.fc(x.reshape(x.shape[0], -1))


class Block(mx.Module):
    def __init__(self, d=16):
        self.fc = mx.Dense(d, d)
        self.bn = mx.BatchNorm(d)

    def __call__(self, x, is_training=False):
        return self.bn(self.fc(x), is_training=is_training)


class Stacked(mx.Module):
    def __init__(self, n=6):
        self.blocks = mx.Repeat(Block, n)

    def __call__(self, x, is_training=False):
        return self.blocks(x, is_training=is_training)


class Unrolled(mx.Module):
    def __init__(self, n=6):
        self.blocks = [Block() for _ in range(n)]

    def __call__(self, x, is_training=False):
        for block in self.blocks:
            x = block(x, is_training=is_training)
        return x


def test_mlp_rows_give_paths_types_shapes_and_parameters():
    model = mx.Sequential(mx.Dense(3, 8), mx.relu, mx.Dense(8, 2))
    result = mx.summary(model, jnp.ones((4, 3)), show=False)
    assert [(r.path, r.module, r.depth) for r in result.rows] == [
        ("", "Sequential", 0),
        ("layers/0", "Dense", 1),
        ("layers/2", "Dense", 1),
    ]
    first = result.rows[1]
    assert first.inputs == (jax.ShapeDtypeStruct((4, 3), F32),)
    assert first.output == jax.ShapeDtypeStruct((4, 8), F32)
    assert first.variables == {"params": 3 * 8 + 8} and first.variable_bytes == {"params": 128}
    assert result.rows[0].variables == result.variables == {"params": 32 + 18}
    assert all(r.runs == 1 for r in result.rows)


def test_dense_flops_are_the_matmul_and_the_bias_add():
    batch, n_in, n_out = 8, 64, 32
    result = mx.summary(mx.Dense(n_in, n_out), jax.ShapeDtypeStruct((batch, n_in), F32), show=False)
    # XLA counts the bias add too: batch * out, beside the 2 * in * out * batch of the matmul.
    assert result.rows[0].flops == 2 * n_in * n_out * batch + batch * n_out
    no_bias = mx.summary(
        mx.Dense(n_in, n_out, use_bias=False), jnp.ones((batch, n_in)), show=False
    ).flops
    assert no_bias == pytest.approx(2 * n_in * n_out * batch, rel=0.01)


def test_conv_flops_and_batch_stats():
    batch = 2
    result = mx.summary(ConvNet(), jnp.ones((batch, 8, 8, 3)), is_training=True, show=False)
    conv = _row(result, "conv")
    assert conv.output == jax.ShapeDtypeStruct((batch, 6, 6, 16), F32)
    assert conv.flops == pytest.approx(2 * 6 * 6 * 3 * 3 * 3 * 16 * batch, rel=0.01)
    bn = _row(result, "bn")
    assert bn.variables == {"params": 32, "batch_stats": 32}
    assert result.variables == {"params": 3 * 3 * 3 * 16 + 32 + 576 * 10 + 10, "batch_stats": 32}
    assert result.variable_bytes["batch_stats"] == 32 * 4
    assert bn.keywords == {"is_training": True}


def test_a_call_reading_a_weight_tied_elsewhere_is_costed_like_its_twin():
    # The decoder's kernel is the encoder's, stored at the encoder's path: its call is lowered
    # with more than its own variables.
    class Tied(mx.Module):
        def __init__(self):
            self.encoder = mx.Dense(16, 16)
            self.decoder = mx.Dense(16, 16)
            self.decoder.kernel = self.encoder.kernel

        def __call__(self, x):
            return self.decoder(mx.relu(self.encoder(x)))

    result = mx.summary(Tied(), jnp.ones((4, 16)), show=False)
    assert _row(result, "decoder").flops == _row(result, "encoder").flops == 2 * 16 * 16 * 4 + 64
    assert _row(result, "decoder").variables == {"params": 16}  # the bias: the kernel is tied


def test_alike_calls_of_an_unrolled_stack_cost_alike():
    unrolled = mx.Sequential(*[mx.Dense(8, 8) for _ in range(6)])
    result = mx.summary(unrolled, jnp.ones((2, 8)), show=False)
    layer_flops = {row.flops for row in result.rows[1:]}
    assert layer_flops == {2 * 8 * 8 * 2 + 16}
    assert result.flops == pytest.approx(6 * (2 * 8 * 8 * 2 + 16), rel=0.01)


def test_root_row_and_totals_are_the_whole_models_cost():
    model = ConvNet()
    x = jnp.ones((2, 8, 8, 3))
    init_fn, apply_fn = mx.transform(model)
    variables = jax.eval_shape(init_fn, jax.random.key(0))
    whole = jax.jit(apply_fn).lower(variables, None, x).cost_analysis()
    result = mx.summary(model, x, show=False)
    assert result.rows[0].flops == result.flops == whole["flops"]
    assert result.bytes_accessed == pytest.approx(whole["bytes accessed"], rel=0.01)
    children = sum(r.flops for r in result.rows if r.depth == 1)
    assert children <= result.flops  # the rest is the root's own relu and reshape


def test_a_module_called_twice_gives_two_rows():
    class Twice(mx.Module):
        def __init__(self):
            self.fc = mx.Dense(4, 4)

        def __call__(self, x):
            return self.fc(self.fc(x))

    result = mx.summary(Twice(), jnp.ones((2, 4)), show=False)
    assert [r.path for r in result.rows] == ["", "fc", "fc"]
    assert result.rows[1].flops == result.rows[2].flops


def test_repeat_is_one_row_per_template_counted_n_times():
    x = jnp.ones((4, 16))
    stacked = mx.summary(Stacked(6), x, is_training=True, show=False)
    unrolled = mx.summary(Unrolled(6), x, is_training=True, show=False)
    wrapper = _row(stacked, "blocks", "Repeat")
    block = _row(stacked, "blocks", "Block")
    assert (wrapper.runs, block.runs, _row(stacked, "blocks/fc").runs) == (1, 6, 6)
    assert block.variables == {"params": 16 * 16 + 16 + 32, "batch_stats": 32}  # one copy
    assert wrapper.variables == {"params": 6 * (16 * 16 + 48), "batch_stats": 6 * 32}
    assert stacked.variables == unrolled.variables
    assert block.flops == _row(unrolled, "blocks/3").flops
    # XLA counts a loop's body once; the summary counts it 6 times, like the unrolled model.
    assert stacked.flops == pytest.approx(unrolled.flops, rel=0.01)
    assert wrapper.flops == pytest.approx(6 * block.flops, rel=0.01)


def test_vmap_members_are_one_row_with_their_count():
    class Ensemble(mx.Module):
        def __init__(self):
            self.members = mx.vmap(
                mx.Dense(8, 8), in_axes=None, variable_axes={"params": 0}, axis_size=3
            )

        def __call__(self, x):
            return self.members(x)

    result = mx.summary(Ensemble(), jnp.ones((2, 8)), show=False)
    member = _row(result, "members", "Dense")
    assert member.runs == 3 and member.output.shape == (2, 8)
    assert member.variables == {"params": 72}
    assert _row(result, "members", "Vmap").variables == {"params": 3 * 72}
    assert result.flops == pytest.approx(3 * member.flops, rel=0.05)


def test_transformed_models_and_methods():
    model = mx.Sequential(mx.Dense(3, 8), mx.Dense(8, 2))
    direct = mx.summary(model, jnp.ones((4, 3)), show=False)
    assert mx.summary(mx.transform(model), jnp.ones((4, 3)), show=False) == direct

    class Encoder(mx.Module):
        def __init__(self):
            self.fc = mx.Dense(3, 5)

        def encode(self, x):
            return self.fc(x)

    result = mx.summary(mx.transform(Encoder(), "encode"), jnp.ones((2, 3)), show=False)
    assert [r.path for r in result.rows] == ["fc"]
    assert result.flops == result.rows[0].flops


def test_shape_dtype_structs_and_arrays_give_the_same_summary():
    model = mx.Dense(3, 2, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    a = mx.summary(model, jnp.ones((4, 3), jnp.bfloat16), show=False)
    b = mx.summary(model, jax.ShapeDtypeStruct((4, 3), jnp.bfloat16), show=False)
    assert a == b and a.variable_bytes == {"params": 8 * 2}


def test_dropout_gets_a_key_by_default_and_rngs_are_accepted():
    class Net(mx.Module):
        def __init__(self):
            self.fc = mx.Dense(3, 3)
            self.drop = mx.Dropout(0.5)

        def __call__(self, x, is_training=False):
            return self.drop(self.fc(x), is_training=is_training)

    a = mx.summary(Net(), jnp.ones((2, 3)), is_training=True, show=False)
    b = mx.summary(Net(), jnp.ones((2, 3)), rngs=jax.random.key(7), is_training=True, show=False)
    assert a == b and a.rows[2].module == "Dropout"


def test_plain_text_without_rich(monkeypatch, capsys):
    for name in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)
    result = mx.summary(mx.Sequential(mx.Dense(3, 8), mx.Dense(8, 2)), jnp.ones((4, 3)))
    printed = capsys.readouterr().out
    assert printed == str(result) + "\n"
    lines = printed.splitlines()
    assert lines[0].split() == "path module inputs outputs params FLOPs bytes accessed".split()
    assert lines[2].split()[:5] == ["(root)", "Sequential", "float32[4,3]", "float32[4,2]", "50"]
    assert lines[-1].split()[:2] == ["Total", "50"]
    assert len({line.index("float32[4,") for line in lines[2:5]}) == 1  # aligned columns


def test_rich_table(capsys):
    pytest.importorskip("rich")
    from rich.table import Table

    result = mx.summary(mx.Dense(3, 2), jnp.ones((4, 3)))
    printed = capsys.readouterr().out
    assert "Dense" in printed and "Total" in printed and "┃" in printed
    table = result.__rich__()
    assert isinstance(table, Table) and table.row_count == 2  # the row and the totals


def test_a_rich_table_wider_than_the_console_keeps_its_cells_whole(capsys):
    pytest.importorskip("rich")
    wide = mx.Sequential(mx.Dense(32, 64), mx.MLP(64, [128], 32), mx.LayerNorm(32))
    mx.summary(wide, jnp.ones((2, 8, 32)))  # captured output: an 80-column console
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) > 80  # the terminal wraps the lines, not rich each cell
    assert any("layers/1/layers/0" in line and "float32[2,8,128]" in line for line in lines)


def test_errors_name_the_model_or_the_failing_call():
    with pytest.raises(mx.errors.ModuleStructureError, match="mx.summary expects an mx.Module"):
        mx.summary(lambda x: x, jnp.ones(3))
    with pytest.raises(mx.errors.LayerConfigError, match="show"):
        mx.summary(mx.Dense(3, 2), jnp.ones((1, 3)), show="no")
    model = mx.Sequential(mx.Dense(3, 8), mx.Dense(4, 2))
    with pytest.raises(Exception) as info:
        mx.summary(model, jnp.ones((2, 3)), show=False)
    ours = [n for n in info.value.__notes__ if n.startswith("mx.summary")]
    assert len(ours) == 1 and "Dense at 'layers/1'" in ours[0] and "float32[2,8]" in ours[0]
    with pytest.raises(TypeError) as info:
        mx.summary(model, show=False)  # the input is missing
    assert "Sequential at '(root)'" in info.value.__notes__[0]


def test_the_recording_hook_leaves_a_transformed_model_working():
    transformed = mx.transform(mx.Sequential(mx.Dense(3, 8), mx.Dense(8, 2)))
    variables = transformed.init(jax.random.key(0))
    before, _ = transformed.apply(variables, None, jnp.ones((2, 3)))
    mx.summary(transformed, jnp.ones((2, 3)), show=False)
    after, _ = jax.jit(transformed.apply)(variables, None, jnp.ones((2, 3)))
    assert jnp.array_equal(before, after)
    _, _, found = mx.capture(transformed.apply, outputs="layers/0")(
        variables, None, jnp.ones((2, 3))
    )
    assert found["layers/0"][0].shape == (2, 8)


BIG = textwrap.dedent(
    """
    import resource, sys, jax, jax.numpy as jnp, metoryx as mx

    def peak_kib():
        # This process's own peak: ru_maxrss keeps the peak of the process that forked it
        # (a pytest worker of several GB) across exec on Linux; VmHWM starts afresh with exec.
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes there, KiB here

    class Big(mx.Module):  # 10 billion parameters, 40 GB in float32
        def __init__(self):
            self.layers = [mx.Dense(50_000, 50_000, use_bias=False) for _ in range(4)]

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    result = mx.summary(Big(), jax.ShapeDtypeStruct((8, 50_000), jnp.float32), show=False)
    print(result.variables["params"], result.variable_bytes["params"], result.flops)
    print(peak_kib())
    """
)


def test_a_ten_billion_parameter_model_is_summarised_without_its_weights():
    done = subprocess.run([sys.executable, "-c", BIG], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    count, size, flops, peak_kib = done.stdout.split()
    assert int(count) == 10_000_000_000 and int(size) == 40_000_000_000
    assert float(flops) == 4 * 2 * 50_000 * 50_000 * 8
    assert int(peak_kib) < 2 * 1024 * 1024, f"peak RSS {int(peak_kib) / 1024:.0f} MiB"
    assert not math.isnan(float(flops))
