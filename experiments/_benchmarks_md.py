"""Writes a generated section into BENCHMARKS.md (shared by gpu-check and the GPU benchmarks).

A section is the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; writing it again
replaces it, and a missing section is appended at the end of the file.
"""

from __future__ import annotations

import datetime
import pathlib
import platform

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine_description() -> str:
    """The host and, when JAX sees one, the accelerator (for the 'machine' line of a table)."""
    host = f"{platform.node() or 'host'} ({platform.machine()}, {platform.processor() or 'cpu'})"
    try:
        import jax

        devices = jax.devices()
        kind = devices[0].device_kind if devices else "none"
        return f"{len(devices)} x {kind} ({jax.default_backend()}), jax {jax.__version__}, {host}"
    # What a missing or broken JAX raises (no jax; a backend that cannot start): the table
    # still gets a machine line. Anything else is a bug and propagates.
    except (ImportError, RuntimeError) as e:  # pragma: no cover
        return f"{host} (jax unavailable: {e})"


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
