"""The measuring tools of the bench: HBM bytes from compiled HLO, and the device check."""

import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import device_check, hlo_bytes


def _bytes(fn, *args):
    return hlo_bytes.hbm_bytes(jax.jit(fn).lower(*args).compile().as_text())


def test_shape_bytes_counts_every_array_of_a_tuple():
    assert hlo_bytes.shape_bytes("f32[1000]{0}") == 4000
    assert hlo_bytes.shape_bytes("(bf16[8,16]{1,0}, s32[], pred[3])") == 256 + 4 + 3
    assert hlo_bytes.shape_bytes("s4[3]") == 2


def test_one_fused_kernel_moves_its_input_and_output_once():
    x = jax.ShapeDtypeStruct((1024, 256), jnp.float32)
    # One fusion: reads x (1 MiB), writes the row sums (4 KiB).
    assert _bytes(lambda x: jnp.sum(jnp.exp(x) * 2.0, axis=1), x) == 1024 * 256 * 4 + 1024 * 4


def test_a_loop_counts_its_body_per_trip_and_a_slice_as_the_slice():
    n, chunk = 4096, 512
    x = jax.ShapeDtypeStruct((n, 128), jnp.float32)

    def chunked_sum(x):
        def body(i, acc):
            return acc + jnp.sum(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk), axis=0)

        return jax.lax.fori_loop(0, n // chunk, body, jnp.zeros((128,), jnp.float32))

    text = jax.jit(chunked_sum).lower(x).compile().as_text()
    moved, size = hlo_bytes.hbm_bytes(text), n * 128 * 4
    # XLA:CPU slices each chunk out (read + write) and reduces it (read): 3x x's bytes plus
    # the accumulator's, where counting the sliced operand whole would give 8 trips x 2x.
    assert 3 * size <= moved <= 3 * size + 64 * 1024, moved / size
    # Without XLA's recorded trip count (the TPU compiler records none), the condition's
    # bound `i < 8` gives the same count.
    assert "known_trip_count" in text
    unrecorded = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
    assert hlo_bytes.hbm_bytes(unrecorded) == moved


@pytest.mark.slow  # the whole device check, interpreted (35 s): run it before a device run
def test_device_check_smoke_agrees_on_this_backend(tmp_path, capsys):
    # On CPU the Pallas kernels run interpreted: this proves the script, not the chip.
    rc = device_check.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "device_check.json").exists()
    # Six loss agreements (bf16 and float32, each reduction) and four attention ones.
    assert "10/10 checks pass" in out
    assert out.count('"check": "attention_agreement"') == 4


def test_device_check_refuses_to_call_a_cpu_run_native(tmp_path):
    assert device_check.main(["--out", str(tmp_path)]) == 2


def test_bench_table_columns_line_up_and_help_documents_them(capsys):
    from bench import __main__ as bench_main

    rows = [
        {"op": "softmax", "case": "a case wider than its column header", "time_ratio": 1.5},
        {"op": "cross_entropy", "case": "short", "softjax_MiB": 12.0},
    ]
    lines = bench_main.format_table(rows).splitlines()
    starts = [[line.index(v) for v in ("softmax", "cross_entropy") if v in line] for line in lines]
    assert starts[1] == starts[2] == [lines[0].index("op")]  # the op column starts alike
    header = lines[0]
    assert lines[2].index("12") == header.index("softjax_MiB")
    with pytest.raises(SystemExit) as exit_:
        bench_main.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in bench_main.COLUMNS)


def test_timings_measure_wall_and_process_cpu_time():
    from bench import harness

    def spin(seconds):  # busy for `seconds` of this process's CPU time
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    def sleep(seconds):  # idle: wall time without CPU time
        time.sleep(seconds)

    busy, idle = harness.timings([lambda: spin(0.02), lambda: sleep(0.02)], (), reps=3, warmup=0)
    assert busy.wall >= 0.02 and idle.wall >= 0.02
    assert busy.cpu >= 0.02 and idle.cpu < 0.01
    row = harness.ratio_columns(busy, idle)
    assert row["time_ratio"] == busy.wall / idle.wall and row["cpu_ratio"] == busy.cpu / idle.cpu
    assert harness.ratio_columns(busy, None) == {"softjax_ms": 1e3 * busy.wall}


def test_rows_are_reported_once_each_as_they_are_added():
    from bench import harness

    seen = []
    harness._REPORTER[:] = [seen.append]
    try:
        rows = harness.Rows()
        rows.append({"op": "a"})
        rows += [{"op": "b"}, {"op": "c"}]
        outer = harness.Rows()
        outer += rows  # a family's rows gathered from a helper's: not reported twice
    finally:
        harness._REPORTER.clear()
    assert [r["op"] for r in seen] == ["a", "b", "c"] and len(outer) == 3


def test_breakdown_variants_all_compute_the_logsumexp():
    # Each timed variant is a logsumexp of ordinary logits (no ties, nothing dominant), so
    # the breakdown compares the cost of equal results.
    import numpy as np

    from bench import breakdown

    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * 2)
    want = np.asarray(jax.nn.logsumexp(x, axis=-1, keepdims=True))
    for name, fn in breakdown.VARIANTS.items():
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(x)), want, rtol=1e-6, err_msg=name)


def test_deviceless_names_the_triton_custom_call_the_kernels_lower_to():
    from bench import deviceless
    from softjax._vocab import pallas_gpu

    assert pallas_gpu.CUSTOM_CALL in deviceless.KERNEL_CALLS


def test_readme_table_is_rewritten_between_its_markers_from_the_json():
    from bench import readme

    run = {
        "machine": "test machine",
        "command": "python -m bench --full --json x.json",
        "seconds": 600,
        "rows": [
            {"family": "losses", "op": "cross_entropy", "case": "fwd", "time_ratio": 0.5},
            {"family": "vocab", "op": "linear_cross_entropy", "softjax_MiB": 160.0},
        ],
    }
    text = f"intro\n{readme.BEGIN}\nold table\n{readme.END}\nafter\n"
    once = readme.rewrite(text, readme.render(run))
    assert "old table" not in once and once.startswith("intro\n") and once.endswith("after\n")
    assert "`python -m bench --full --json x.json` on test machine, 10 minutes" in once
    assert "cross_entropy" in once and "0.5" in once and "160" in once
    # Columns no row of a family fills are left out of its table.
    losses = once.split("`losses`")[1].split("`vocab`")[0]
    assert "time_ratio" in losses and "softjax_MiB" not in losses
    assert readme.rewrite(once, readme.render(run)) == once
    # The commit the run measured, when it recorded one.
    assert "on test machine at commit 1234abc, 10" in readme.render({**run, "commit": "1234abc"})
    with pytest.raises(ValueError, match="must hold one"):
        readme.rewrite("no markers", "x")
    text = readme.README.read_text()
    assert text.count(readme.BEGIN) == 1 and text.count(readme.END) == 1


def test_bench_error_column_measures_ulps_as_the_tests_do():
    # The bench's *_err column and the tests' bounds are two copies of one measure (bench/
    # must not import tests/, nor the reverse): they must agree, entry rule included.
    from _tolerances import ulp_error as tests_ulp_error

    from bench.harness import ulp_error as bench_ulp_error

    rng = np.random.default_rng(3)
    ref = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-6, 4, 500),
                          [0.0, np.inf, -np.inf, 1e-45]])  # fmt: skip
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        out = jnp.asarray(ref, dtype)
        ours, theirs = bench_ulp_error(out, ref, dtype), tests_ulp_error(out, ref, dtype)
        assert ours == theirs and 0 < ours <= 0.5, (dtype, ours, theirs)


def test_bench_records_the_commit_it_measured():
    from bench.__main__ import commit

    if not (pathlib.Path(__file__).resolve().parents[1] / ".git").exists():
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{7,}(\+changes)?", commit() or ""), commit()
