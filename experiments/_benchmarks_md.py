"""Writes a generated section into BENCHMARKS.md (shared by gpu-check and the GPU benchmarks).

A section is the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; writing it again
replaces it, and a missing section is appended at the end of the file.
"""

from __future__ import annotations

import datetime
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine_description() -> str:
    """``efflax.experiment.machine_description`` (the one description), imported when called:
    gpu-check imports this module in a venv that has JAX but not all of efflax's dependencies."""
    from efflax.experiment import machine_description as describe

    return describe()


def today() -> str:
    return datetime.date.today().isoformat()


def write_section(name: str, body: str, *, path: pathlib.Path | str = BENCHMARKS) -> None:
    """Replaces (or appends) the section ``name`` of ``path`` with ``body``."""
    path = pathlib.Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
