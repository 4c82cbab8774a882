"""The ``efflax`` console script: ``efflax list`` and ``efflax reproduce``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = argparse.ArgumentParser(prog="efflax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered experiments")
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
