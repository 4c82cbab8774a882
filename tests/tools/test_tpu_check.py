"""tools/tpu_check.py without libtpu: case discovery, the checks, the table."""

import importlib.util
import pathlib

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"efflax_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_check = _load("tpu_check")


def _result(name, chip="v5e", *, kernels=3, min_kernels=3, temp=2**20, baseline=False, **extra):
    memory = dict(argument=2**20, output=2**20, temp=temp, alias=0, generated_code=0)
    memory["total"] = memory["argument"] + memory["output"] + temp
    return dict(
        kind="case",
        module="attention",
        list=extra.pop("list", "CASES"),
        index=0,
        chip=chip,
        family="attention",
        name=name,
        kernels=kernels,
        min_kernels=min_kernels,
        baseline=baseline,
        compile_s=1.5,
        memory=memory,
        cost=dict(flops=2e9, bytes=2**20, seconds=1e-3),
        **extra,
    )


def test_discovers_every_family_module_and_tolerates_a_broken_one(tmp_path, monkeypatch):
    assert "attention" in tpu_check.case_modules()
    jobs, broken = tpu_check.jobs_to_run(["v5e", "v6e"], "fwd+bwd d64", step=False)
    assert {j["chip"] for j in jobs} == {"v5e", "v6e"} and not broken
    cases = tpu_check.load_cases("attention")
    assert all(c.family == "attention" for c in cases)
    assert any(c.baseline and c.min_kernels == 0 for c in cases)

    def failing(module, attribute="CASES"):
        raise ImportError(f"{module} is being written")

    monkeypatch.setattr(tpu_check, "load_cases", failing)
    jobs, broken = tpu_check.jobs_to_run(["v5e"], "", step=True)
    assert [j["kind"] for j in jobs] == ["step"]
    assert broken and "being written" in broken[0]


def test_check_flags_missing_kernels_vmem_and_hbm():
    ok = _result("fwd+bwd d128")
    fell_back = _result("fwd+bwd d64", kernels=0)
    vmem = dict(_result("fwd+bwd d256"), error="Mosaic: scoped VMEM limit exceeded", reason="VMEM")
    too_big = _result("fwd+bwd S=65536", temp=20 * 2**30)
    baseline_oom = dict(
        _result("xla fwd+bwd", baseline=True, min_kernels=0),
        error="RESOURCE_EXHAUSTED: out of memory",
        reason="HBM",
    )
    problems = tpu_check.check([ok, fell_back, vmem, too_big, baseline_oom])
    assert len(problems) == 3
    assert "min_kernels=3" in problems[0]
    assert "does not fit VMEM" in problems[1]
    assert "> HBM" in problems[2]
    assert tpu_check._classify("... vmem ...") == "VMEM"
    assert tpu_check._classify("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm") == "HBM"


def test_table_has_chips_memory_scaling_and_the_step():
    results = [_result("fwd+bwd d128", chip) for chip in ("v5e", "v5p", "v6e")]
    results += [
        _result("fwd+bwd d128 S=4096 causal bf16", list="MEMORY_CASES", temp=2**27),
        _result(
            "xla fwd+bwd d128 S=4096 causal bf16",
            list="MEMORY_CASES",
            temp=2**31,
            baseline=True,
            min_kernels=0,
        ),
    ]
    step = _result("sharded train step", chip="v5e:2x4")
    step["kind"] = "step"
    step["collectives"] = {"all-reduce": 3, "all-to-all": 2, "all-gather": 0}
    text = tpu_check.table(
        results + [step], jax_version="0.12.0.1", libtpu="0.0.50", seconds=10.0, jobs=2
    )
    assert "| v5e kernels | v5e memory" in text and "v6e estimate" in text
    assert "| 4096 | 0.12 GiB / 0.13 GiB | 2.00 GiB / 2.00 GiB | 16x |" in text
    assert "all-reduce 3, all-to-all 2" in text and "all-gather" not in text.split("HLO:")[1]
