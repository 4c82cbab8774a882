"""The ``efflax`` console script: ``efflax list``, ``efflax reproduce``, ``efflax launch`` and
``efflax plan``."""

from __future__ import annotations

import argparse
import os
import sys


def _launch(argv: list[str]) -> int:
    """``efflax launch -n N [--cpu-devices D] [--timeout S] -- CMD ...``: N local processes.

    A usage error (no command, ``-n 0``, a negative timeout) prints the usage and exits 2,
    before any process starts.
    """
    parser = argparse.ArgumentParser(
        prog="efflax launch",
        usage="efflax launch -n N [--cpu-devices D] [--timeout S] -- CMD [ARGS ...]",
        description="Run CMD as N processes of one multi-process run on this machine "
        "(coordinator on 127.0.0.1; each process gets EFFLAX_PROCESS_ID etc.).",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True, metavar="N")
    parser.add_argument("--cpu-devices", type=int, default=None, metavar="D")
    parser.add_argument("--timeout", type=float, default=None, metavar="S")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run: efflax launch -n 2 -- python train.py")
    if args.num_processes < 1:
        parser.error(f"-n must be at least 1, got {args.num_processes}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        parser.error(f"--cpu-devices must be at least 1, got {args.cpu_devices}")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    from efflax._src.distributed import launch

    codes = launch(
        command,
        num_processes=args.num_processes,
        cpu_devices=args.cpu_devices,
        timeout=args.timeout,
    )
    failed = [c for c in codes if c != 0]
    if failed:
        print(f"efflax launch: exit codes {codes}", file=sys.stderr)
    return failed[0] if failed else 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:
        return _launch(argv[1:])
    parser = argparse.ArgumentParser(prog="efflax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered experiments")
    sub.add_parser("launch", help="run a command as N local processes (efflax launch -n N -- CMD)")
    rep = sub.add_parser("reproduce", help="run experiments and write REPORT.md")
    rep.add_argument("names", nargs="*", help="experiments to run (default: all)")
    rep.add_argument("--quick", action="store_true", help="CPU-minute sizes")
    rep.add_argument("--out", default="results", help="output directory (default: results)")
    rep.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="experiments run at once; only those whose verdicts do not depend on measured "
        "time share the machine, timing-sensitive ones always run alone (default: up to 2)",
    )
    _add_plan_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "plan":
        # Compile-only targets come from libtpu / the CUDA plugin; JAX itself runs on the CPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        return _plan(args)

    from efflax import experiment

    if args.command == "list":
        for name, exp in experiment.discover().items():
            print(f"{name:20s} {exp.description}")
        return 0
    try:
        results = experiment.run_experiments(
            args.names, out=args.out, quick=args.quick, jobs=args.jobs
        )
    except ValueError as e:
        print(f"efflax: {e}", file=sys.stderr)
        return 2
    print(f"\nwrote {os.path.join(args.out, 'REPORT.md')}")
    for r in results:
        print(f"{r.name:18s} {r.verdict.line() if r.verdict else 'ERROR ' + r.error}")
    return 1 if any(r.verdict is None for r in results) else 0


def _add_plan_parser(sub) -> None:
    from efflax._src.plan.lm import ATTENTION
    from efflax._src.plan.lm import BLOCKS
    from efflax._src.plan.lm import MLP
    from efflax._src.plan.lm import SIZES

    plan = sub.add_parser(
        "plan",
        help="compile a TransformerLM training step for a TPU slice or GPU host without one",
        description="Compiles one AdamW step of efflax's TransformerLM for TARGET (no such "
        "hardware needed) and reports memory per device (fits or not), collectives, FLOPs and, "
        "on TPU, XLA's estimated step time. Exit status: 0 fits, 1 does not fit, 2 error.",
    )
    plan.add_argument(
        "--target", help="h100x8, h100x16, a100x8, v5e-8/16/64/256, v5p-8/64/256, v6e-8/64/256"
    )
    plan.add_argument("--list-targets", action="store_true", help="list the targets and exit")
    plan.add_argument("--size", default="gpt2-small", choices=tuple(SIZES))
    plan.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    plan.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    plan.add_argument("--attention", default="xla", choices=ATTENTION)
    plan.add_argument("--mlp", default="dense", choices=MLP)
    plan.add_argument("--block", default="transformer", choices=BLOCKS)
    plan.add_argument("--data", type=int, default=None, help="data-parallel ways (default: rest)")
    plan.add_argument("--expert", type=int, default=1, help="expert-parallel ways")
    plan.add_argument("--model", type=int, default=1, help="tensor-parallel ways")
    plan.add_argument("--num-experts", type=int, default=8)
    plan.add_argument("--nblocks", type=int, default=4, help="Monarch blocks")
    plan.add_argument("--chunk-size", type=int, default=256, help="FLASH chunk")
    plan.add_argument(
        "--depths",
        type=int,
        nargs=2,
        default=None,
        metavar=("L1", "L2"),
        help="compile at L1 and L2 layers only and extrapolate linearly to the full depth "
        "(much faster; parameter bytes and FLOPs stay exact, the report says so)",
    )
    plan.add_argument("--json", default=None, help="also write the plan as JSON to this file")


def _plan(args) -> int:
    import json

    from efflax._src.plan import core
    from efflax._src.plan.lm import LMConfig
    from efflax._src.plan.lm import plan_lm

    if args.list_targets:
        for t in core.TARGETS.values():
            print(
                f"{t.name:8s} {t.chips:4d} x {t.chip:22s} {t.hbm_bytes / core.GiB:6.2f} GiB, "
                f"{t.peak_flops / 1e12:4.0f} TFLOP/s bf16, {t.topology}"
            )
        return 0
    if not args.target:
        print("efflax plan: --target is required (efflax plan --list-targets)", file=sys.stderr)
        return 2
    config = LMConfig(
        size=args.size,
        batch=args.batch,
        seq=args.seq,
        attention=args.attention,
        mlp=args.mlp,
        block=args.block,
        data=args.data,
        expert=args.expert,
        model=args.model,
        nblocks=args.nblocks,
        num_experts=args.num_experts,
        chunk_size=args.chunk_size,
    )
    try:
        plan = plan_lm(
            config, args.target, depths=None if args.depths is None else tuple(args.depths)
        )
    except core.PlanError as e:
        print(f"efflax plan: {e}", file=sys.stderr)
        return 2
    print(plan)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
