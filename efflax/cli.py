"""The ``efflax`` console script: ``efflax list``, ``efflax reproduce`` and ``efflax launch``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:
        # `efflax launch -n N -- CMD ...`: N local processes of one multi-process run.
        from efflax._src.distributed import main as launch_main

        return launch_main(argv[1:])
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
