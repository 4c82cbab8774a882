"""Importing efflax must not initialise JAX's backends: users configure JAX after importing it."""

import subprocess
import sys

SCRIPT = """
import jax
from jax._src import xla_bridge

def refuse(*args, **kwargs):
    raise SystemExit("a JAX backend was initialised at import time")

xla_bridge.backends = refuse
import efflax
import pallas_kernels
jax.config.update("jax_num_cpu_devices", 2)  # possible only before any backend exists
print("ok")
"""


def test_import_does_not_initialise_backends():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-500:]
    assert out.stdout.strip().endswith("ok")
