"""The ``efflax`` console script: ``efflax list``, ``efflax reproduce`` and ``efflax launch``."""

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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
