"""tools/gpu_check.py and tools/gpu_bench.py without a GPU: parsing, the checks, the tables."""

import importlib.util
import pathlib

import pytest

from experiments._benchmarks_md import write_section

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"efflax_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
gpu_bench = _load("gpu_bench")

_PTX = """
.version 8.7
.target sm_90a
.visible .entry monarch_chain(
)
{
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
	cp.async.cg.shared.global [%r3], [%rd4], 16;
}
"""
_LOG = """ptxas info    : Compiling entry function 'monarch_chain' for 'sm_90a'
ptxas info    : Function properties for monarch_chain
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers
"""


def test_parses_ptx_and_ptxas_reports(tmp_path):
    (tmp_path / "kernel.abc.ptx").write_text(_PTX)
    (tmp_path / "kernel.abc.log").write_text(_LOG)
    (kernel,) = gpu_check._parse_ptx_dumps(tmp_path).values()
    assert (kernel["wgmma"], kernel["mma_sync"], kernel["cp_async"]) == (2, 1, 1)
    assert (kernel["registers"], kernel["spill_stores"], kernel["spill_loads"]) == (64, 4, 4)
    xla = tmp_path / "xla"
    xla.mkdir()
    (xla / "m.thunk_sequence.txt").write_text(
        "003: kCustomKernel [prev=002 (1) | sink        ] monarch_chain grid: [128, 4, 1] "
        "threads: [128, 1, 1]  shared_memory: 18432 bytes\n"
    )
    launches, _ = gpu_check._parse_xla_dumps(xla)
    assert launches["monarch_chain"] == {"grid": "128,4,1", "threads": 128, "shared_memory": 18432}


def test_check_flags_spills_shared_memory_and_failed_compiles():
    cell = gpu_check.monarch_cells()[0]
    good = {"name": "monarch_chain", "registers": 90, "spill_stores": 0, "spill_loads": 0}
    results = [
        {"cell": cell, "target": "H100", "compile_s": 1.0, "kernels": [good]},
        {"cell": cell, "target": "A100", "compile_s": 1.0, "kernels": [dict(good, spill_loads=4)]},
        {"cell": cell, "target": "A100", "kernels": [dict(good, shared_memory=200_000)]},
        {"cell": cell, "target": "H100", "error": "boom", "kernels": []},
    ]
    problems = gpu_check.check(results, known={})
    assert len(problems) == 3
    assert "spills" in problems[0] and "shared memory 200000 B > 166912 B" in problems[1]
    assert "did not compile" in problems[2]
    table = gpu_check.table(results[:2], jax_version="0", seconds=1.0, jobs=1)
    assert "| monarch 1024->1024 nb=4 (square) | `monarch_chain` | 90 | 0 |" in table


def test_matrix_covers_the_issue():
    cells = [gpu_check.describe(c) for c in gpu_check.monarch_cells()]
    for n in (1024, 4096, 8192):
        for nblocks in (4, 16):
            assert f"monarch {n}->{n} nb={nblocks} (square)" in cells
            assert f"monarch {n}->{4 * n} nb={nblocks} (rect)" in cells
    assert "monarch 1024->1024 nb=32 (square)" in cells
    attention = gpu_check.attention_cells()
    assert {c["head_dim"] for c in attention} == {64, 128, 256}
    assert {c["dtype"] for c in attention} == {"bfloat16", "float16"}
    assert {c["causal"] for c in attention} == {True, False}
    for feature in ("kv_heads", "segment_ids", "block_sparse"):
        assert any(c.get(feature) for c in attention), feature


def test_gpu_check_skips_with_a_message_without_the_plugin(capsys):
    if gpu_check.prerequisites() is None:
        pytest.skip("the CUDA plugin is installed here: gpu-check really runs (make gpu-check)")
    assert gpu_check.main(["--no-write"]) == 0
    assert "gpu-check SKIPPED" in capsys.readouterr().out


def test_gpu_bench_says_no_gpu_and_writes_nothing(capsys):
    if gpu_bench.gpu_present()[0]:
        pytest.skip("a GPU is present")
    assert gpu_bench.main([]) == 0
    out = capsys.readouterr().out
    assert "NO GPU PRESENT" in out and "pytest" in out and "bench_monarch" in out


def test_bench_tables_go_into_a_regenerated_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written text\n")
    output = "warming up\n| n | x |\n|---|---|\n| 1024 | 2.0 |\n\ndevice: H100\n3 passed in 1.0s\n"
    results = [
        {
            "name": "Monarch",
            "command": ["py", "-m", "b"],
            "returncode": 0,
            "seconds": 1.0,
            "tables": gpu_bench.tables_of(output),
        }
    ]
    write_section("gpu-bench", gpu_bench.render(results, "a GPU", "2026-12-01"), path=path)
    write_section("gpu-bench", gpu_bench.render(results, "another GPU", "2026-12-02"), path=path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text\n")
    assert text.count("<!-- BEGIN gpu-bench -->") == 1 and "another GPU" in text
    assert "| 1024 | 2.0 |" in text and "3 passed" in text and "warming up" not in text


def test_mixed_chunk_cases_trace():
    # The GPU compile check's mixed-chunk cases are well formed (abstract evaluation only).
    import jax

    cases = gpu_check.mixed_chunk_cases()
    assert {c["name"] for c in cases} == {
        "mixed_chunk_fwd_causal",
        "mixed_chunk_fwd_bwd_causal",
        "mixed_chunk_fwd_full",
        "mixed_chunk_fwd_bwd_full",
    }
    for case in cases:
        out = jax.eval_shape(case["fn"], *case["args"])
        assert jax.tree.leaves(out)[0].shape == case["args"][4].shape
