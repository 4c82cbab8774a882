"""Multi-controller runs (one process per host): initialize, the primary process, host-side helpers."""

from efflax._src.distributed import addressable_values
from efflax._src.distributed import agree
from efflax._src.distributed import barrier
from efflax._src.distributed import free_port
from efflax._src.distributed import initialize
from efflax._src.distributed import is_primary
from efflax._src.distributed import launch
from efflax._src.distributed import process_local_rows
from efflax._src.distributed import put_global
from efflax._src.distributed import to_host

__all__ = [
    "addressable_values",
    "agree",
    "barrier",
    "free_port",
    "initialize",
    "is_primary",
    "launch",
    "process_local_rows",
    "put_global",
    "to_host",
]
