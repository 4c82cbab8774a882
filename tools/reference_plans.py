"""Reference plans: efflax's TransformerLM variants compiled for GPU hosts and TPU slices.

Each plan is one AdamW training step of ``efflax.plan.plan_lm`` compiled without the hardware
(``make plan-env``'s toolchain). Each variant sits beside its baseline (same size, batch,
sequence and target). Plans run one per process, in the priority order below, and append one
JSON line each to ``docs/plans/plans.jsonl`` (a plan already there is skipped, so an
interrupted run resumes); ``--write`` turns the records into the ``plans`` section of
BENCHMARKS.md and plots in ``docs/plans/*.png``.

    JAX_PLATFORMS=cpu .venv-xla/bin/python tools/reference_plans.py            # run all
    JAX_PLATFORMS=cpu .venv-xla/bin/python tools/reference_plans.py --only 3   # first 3
    JAX_PLATFORMS=cpu .venv-xla/bin/python tools/reference_plans.py --write
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import pathlib
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from efflax._src.plan.lm import LMConfig  # noqa: E402

RECORDS = ROOT / "docs" / "plans" / "plans.jsonl"
SECTION = "plans"
GiB = 1024**3

# Compile time grows with depth (minutes per layer on 2 shared cores): plans compile at 1 and
# 2 layers and extrapolate linearly to the full depth (efflax.plan.plan_lm(depths=...));
# parameter / optimizer bytes and FLOPs are exact. The baseline is also compiled at full depth
# (depths None) to measure what the extrapolation misses.
DEPTHS = (1, 2)
_S = dict(size="gpt2-small", batch=16, seq=1024)
_LONG = dict(size="gpt2-small", batch=8, seq=8192)
_B = dict(size="1b", batch=16, seq=2048)
_MOE = dict(data=1, expert=8)
# (group, target, config, depths): the group names the comparison a plan belongs to.
PLANS: list[tuple[str, str, LMConfig, tuple[int, int] | None]] = [
    ("a: attention kernel", "v5e-8", LMConfig(**_S), DEPTHS),
    ("a: attention kernel", "h100x8", LMConfig(**_S), DEPTHS),
    ("a: attention kernel", "h100x8", LMConfig(**_S, attention="pallas"), DEPTHS),
    ("b: Monarch MLP", "v5e-8", LMConfig(**_S, mlp="monarch"), DEPTHS),
    ("b: Monarch MLP", "h100x8", LMConfig(**_S, mlp="monarch"), DEPTHS),
    ("c: MoE", "v5e-8", LMConfig(**_S, mlp="moe-ec", **_MOE), DEPTHS),
    ("c: MoE", "h100x8", LMConfig(**_S, mlp="moe-ec", **_MOE), DEPTHS),
    ("c: MoE", "v5e-8", LMConfig(**_S, mlp="moe-top2", **_MOE), DEPTHS),
    ("d: FLASH, long context", "v5e-8", LMConfig(**_LONG), DEPTHS),
    ("d: FLASH, long context", "v5e-8", LMConfig(**_LONG, block="flash"), DEPTHS),
    ("weak scaling", "v5e-64", LMConfig(**{**_S, "batch": 128}), DEPTHS),
    ("weak scaling", "v5e-256", LMConfig(**{**_S, "batch": 512}), DEPTHS),
    ("weak scaling", "v5e-16", LMConfig(**{**_S, "batch": 32}), DEPTHS),
    ("d: FLASH, long context", "h100x8", LMConfig(**_LONG), DEPTHS),
    ("d: FLASH, long context", "h100x8", LMConfig(**_LONG, block="flash"), DEPTHS),
    ("c: MoE", "h100x8", LMConfig(**_S, mlp="moe-top2", **_MOE), DEPTHS),
    ("1B", "v5e-8", LMConfig(**_B, model=4), DEPTHS),
    ("1B", "h100x8", LMConfig(**_B), DEPTHS),
    ("1B", "h100x8", LMConfig(**_B, attention="pallas"), DEPTHS),
    ("1B", "v5p-8", LMConfig(**_B), DEPTHS),
    ("1B", "v6e-8", LMConfig(**_B, model=2), DEPTHS),
    ("1B", "h100x16", LMConfig(**{**_B, "batch": 32}), DEPTHS),
    ("1B", "a100x8", LMConfig(**_B), DEPTHS),
    ("weak scaling", "v6e-64", LMConfig(**{**_B, "batch": 128}), DEPTHS),
    ("weak scaling", "v5p-64", LMConfig(**{**_B, "batch": 64}), DEPTHS),
    ("a: attention kernel", "v5e-8", LMConfig(**_S), None),
]


def key_of(target: str, config: LMConfig, depths: tuple[int, int] | None) -> str:
    return f"{target}|{json.dumps(dataclasses.asdict(config), sort_keys=True)}|{depths}"


def _done() -> dict[str, dict]:
    if not RECORDS.exists():
        return {}
    out = {}
    for line in RECORDS.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            # A failed retry (e.g. a duplicate run stopped by hand) never hides a finished plan.
            if "error" in record and "error" not in out.get(record["key"], {"error": ""}):
                continue
            out[record["key"]] = record
    return out


def run_one(group: str, target: str, config: LMConfig, depths: tuple[int, int] | None) -> dict:
    """Child process: compile one plan and return its record (errors recorded, not raised)."""
    from efflax._src.plan import core
    from efflax._src.plan.lm import plan_lm

    record = {
        "key": key_of(target, config, depths),
        "depths": depths,
        "group": group,
        "target": target,
        "config": dataclasses.asdict(config),
        "label": config.label,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        plan = plan_lm(config, target, depths=depths)
    except core.PlanError as e:
        record["error"] = str(e)
        return record
    record.update(plan.to_dict())
    record["report"] = str(plan)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, default=None, help="run the first N plans")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per plan")
    parser.add_argument("--jobs", type=int, default=1, help="plans compiled at once")
    parser.add_argument(
        "--pick", default=None, help="comma-separated plan numbers (1-based) to run, in order"
    )
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md and plots")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_one(*PLANS[args.child])))
        return 0
    if args.write:
        from tools import _plans_md

        _plans_md.write(list(_done().values()), PLANS, key_of)
        return 0
    RECORDS.parent.mkdir(parents=True, exist_ok=True)
    done = _done()
    todo = [
        (index, plan)
        for index, plan in enumerate(PLANS[: args.only])
        if key_of(*plan[1:]) not in done
    ]
    if args.pick:
        wanted = [int(n) - 1 for n in args.pick.split(",")]
        todo = sorted(
            (item for item in todo if item[0] in wanted), key=lambda i: wanted.index(i[0])
        )
    lock = threading.Lock()

    def run(index: int, plan: tuple) -> None:
        group, target, config, depths = plan
        how = "full depth" if depths is None else f"at {depths} layers, extrapolated"
        print(f"[{index + 1}/{len(PLANS)}] {target}: {config.label} ({how})", flush=True)
        start = time.time()
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(index)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if lines:
                record = json.loads(lines[-1])
            else:
                tail = [ln for ln in out.stderr.splitlines() if ln.strip()][-3:]
                record = {"error": f"exit {out.returncode}: {' | '.join(tail)}"}
        except subprocess.TimeoutExpired:
            record = {"error": f"not compiled within {args.timeout} s"}
        record.setdefault("key", key_of(target, config, depths))
        record.setdefault("depths", depths)
        record.setdefault("group", group)
        record.setdefault("target", target)
        record.setdefault("config", dataclasses.asdict(config))
        record.setdefault("label", config.label)
        record["wall_seconds"] = round(time.time() - start)
        with lock:
            with RECORDS.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(record.get("report") or f"ERROR {record['error']}", flush=True)

    # Plans are independent processes; --jobs of them share the machine.
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda item: run(*item), todo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
