"""Multi-controller runs: one process per host on JAX's distributed runtime.

Every process runs the same program on its own devices; ``jax.devices()`` lists the devices of
all of them and a global mesh spans them. What efflax adds:

- :func:`initialize`: a thin wrapper over ``jax.distributed.initialize`` that is a no-op for one
  process, reads ``EFFLAX_*`` environment variables (set by :func:`launch`), and binds the
  coordinator only to the address it is given (JAX binds all interfaces by default).
- :func:`is_primary`: the process that logs and writes files (``jax.process_index() == 0``).
- :func:`process_local_rows`, :func:`put_global`, :func:`addressable_values`, :func:`to_host`:
  move data between hosts and global arrays without gathering whole arrays on every host.
- :func:`barrier` and :func:`agree`: a named synchronisation point and a check that every
  process computed the same small values (a loader's order, a state's fingerprint).
- :func:`launch`: runs N local processes on ``127.0.0.1`` (``efflax launch -n N -- CMD``), for
  trying multi-process code on one machine and for tests.

On CPU the collectives between processes use gloo (JAX's default since 0.4.3x).
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

ENV_COORDINATOR = "EFFLAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "EFFLAX_NUM_PROCESSES"
ENV_PROCESS_ID = "EFFLAX_PROCESS_ID"
ENV_CPU_DEVICES = "EFFLAX_CPU_DEVICES"
ENV_PROCESS_TIMEOUT = "EFFLAX_PROCESS_TIMEOUT"


def _int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    # The wording of pallas_kernels._checks.int_at_least. This module must not import
    # pallas_kernels: importing the kernels starts JAX's backend, after which
    # jax.distributed.initialize refuses to run.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return value


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


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} must be an int") from None


def _check_address(name: str, address: str) -> None:
    if not isinstance(address, str):
        raise ValueError(f"{name}={address!r} must be 'host:port', e.g. '10.0.0.1:1234'")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name}={address!r} must be 'host:port', e.g. '10.0.0.1:1234'")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_devices: int | None = None,
    coordinator_bind_address: str | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
    shutdown_timeout: int = 300,
) -> bool:
    """Joins the processes of a multi-host run (a no-op for one process).

    Call it first, before any other JAX call. Arguments left ``None`` are read from
    ``$EFFLAX_COORDINATOR_ADDRESS``, ``$EFFLAX_NUM_PROCESSES``, ``$EFFLAX_PROCESS_ID`` and
    ``$EFFLAX_CPU_DEVICES`` (what :func:`launch` sets); with neither, the run has one process
    and nothing happens. For SLURM, Open MPI or TPU pods, whose launchers JAX detects by
    itself, call ``jax.distributed.initialize()`` directly.

    Args:
      coordinator_address: ``'host:port'`` of process 0, the same in every process.
      num_processes: number of processes.
      process_id: this process, in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices (one GPU per process).
      cpu_devices: number of CPU devices of this process (``jax_num_cpu_devices``), for CPU runs.
      coordinator_bind_address: the address the coordinator listens on (process 0); default
        ``coordinator_address`` itself, never every interface.
      initialization_timeout / heartbeat_timeout / shutdown_timeout: seconds, passed to JAX
        (a process that does not answer for ``heartbeat_timeout`` ends the run).

    Returns:
      ``True`` if the distributed runtime was started (or already was), ``False`` for one
      process.

    Example (two hosts)::

        # host 0                                          # host 1
        efflax.distributed.initialize("10.0.0.1:1234", 2, 0)
                                                          efflax.distributed.initialize(
                                                              "10.0.0.1:1234", 2, 1)
    """
    if coordinator_address is not None:
        _check_address("coordinator_address", coordinator_address)
    if coordinator_bind_address is not None:
        _check_address("coordinator_bind_address", coordinator_bind_address)
    if local_device_ids is not None:
        ids = local_device_ids if isinstance(local_device_ids, Sequence) else [local_device_ids]
        if isinstance(local_device_ids, str | bytes) or not ids:
            ids = [local_device_ids]
        for device_id in ids:
            _int_at_least("local_device_ids", device_id, 0)
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    cpu_devices = cpu_devices if cpu_devices is not None else _env_int(ENV_CPU_DEVICES)
    timeout = _env_int(ENV_PROCESS_TIMEOUT)
    if timeout:
        # Launched with a time limit: end this process by itself (with a traceback) even if a
        # peer died and a collective waits forever.
        faulthandler.dump_traceback_later(timeout, exit=True)
    if cpu_devices is not None:
        cpu_devices = _int_at_least("cpu_devices", cpu_devices)
        with _started_too_late():
            jax.config.update("jax_num_cpu_devices", cpu_devices)
    if num_processes is None and coordinator_address is None and process_id is None:
        return False
    num_processes = _int_at_least("num_processes", num_processes)
    if num_processes == 1:
        return False
    if coordinator_address is None:
        raise ValueError(f"{num_processes=} needs coordinator_address='host:port' of process 0")
    _check_address("coordinator_address", coordinator_address)
    if process_id is None:
        raise ValueError(f"{num_processes=} needs process_id in [0, {num_processes})")
    process_id = _int_at_least("process_id", process_id, 0)
    if process_id >= num_processes:
        raise ValueError(f"{process_id=} must be in [0, {num_processes=})")
    bind = coordinator_bind_address or coordinator_address
    _check_address("coordinator_bind_address", bind)
    for name, value in (
        ("initialization_timeout", initialization_timeout),
        ("heartbeat_timeout", heartbeat_timeout),
        ("shutdown_timeout", shutdown_timeout),
    ):
        _int_at_least(name, value)
    if jax.distributed.is_initialized():
        if jax.process_count() != num_processes or jax.process_index() != process_id:
            raise ValueError(
                f"the distributed runtime already runs as process {jax.process_index()} of "
                f"{jax.process_count()}, not {process_id} of {num_processes}"
            )
        return True
    with _started_too_late():
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            coordinator_bind_address=bind,
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=shutdown_timeout,
        )
    return True


@contextlib.contextmanager
def _started_too_late():
    """JAX refuses to join a run (or resize the CPU platform) once its backend has started;
    say what to move."""
    try:
        yield
    except RuntimeError as e:
        if "initiali" not in str(e).lower():
            raise
        raise RuntimeError(
            "efflax.distributed.initialize() must run before JAX starts its backend: call it "
            "right after `import efflax`, before importing efflax.nn/optim/models/training or "
            "pallas_kernels (importing the kernels starts the backend) and before any JAX "
            f"computation or jax.devices(). JAX said: {e}"
        ) from e


def is_primary() -> bool:
    """Whether this is process 0, the one that logs, prints and writes metrics files."""
    return jax.process_index() == 0


def _check_what(what: Any) -> None:
    if not isinstance(what, str):
        raise ValueError(f"what={what!r} must be a string (it names the check in the error)")


def barrier(name: str) -> None:
    """Waits until every process reached ``barrier(name)`` (nothing to wait for in one process)."""
    if not isinstance(name, str):
        raise ValueError(f"name={name!r} must be a string")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _fingerprint(value: Any) -> int:
    if isinstance(value, np.ndarray):
        data = value.dtype.str.encode() + repr(value.shape).encode() + value.tobytes()
    else:
        data = repr(value).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little")


def agree(what: str, values: Mapping[str, Any]) -> None:
    """Checks that every process passed the same ``values`` (compared by a hash of each).

    A collective: every process must call it, in the same order. Free in one process.

    Raises:
      ValueError: naming the first entry some process disagrees on, and which processes.
    """
    _check_what(what)
    if not isinstance(values, Mapping):
        raise ValueError(f"values must be a dict of named values, got {type(values).__name__}")
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    names = list(values)
    mine = np.asarray([_fingerprint(values[n]) for n in names], np.uint32)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, len(names)]
    for column, name in enumerate(names):
        distinct = np.unique(everyone[:, column])
        if len(distinct) > 1:
            groups = [
                np.flatnonzero(everyone[:, column] == h).tolist() for h in distinct
            ]  # processes that agree with each other
            raise ValueError(
                f"{what}: the processes disagree on {name} (groups of processes that agree: "
                f"{groups}; this is process {jax.process_index()} with {name}="
                f"{_short(values[name])})"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def process_local_rows(sharding: jax.sharding.Sharding, global_shape: Sequence[int]) -> np.ndarray:
    """The rows (leading-axis indices) of a global array that this process's devices hold.

    Sorted and without repeats; they need not be contiguous (a mesh may interleave the
    devices of several processes).

    Example:
      >>> rows = process_local_rows(data_sharding(mesh), (batch_size,))
      >>> local = read_examples(order[rows])  # only this host's examples
    """
    if not isinstance(sharding, jax.sharding.Sharding):
        raise ValueError(f"sharding={sharding!r} must be a jax.sharding.Sharding")
    if not isinstance(global_shape, Sequence) or not all(
        isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 0 for n in global_shape
    ):
        raise ValueError(f"global_shape={global_shape!r} must be a tuple of sizes >= 0")
    global_shape = tuple(int(n) for n in global_shape)
    if not global_shape:
        raise ValueError("global_shape=() has no rows")
    n = global_shape[0]
    taken = np.zeros(n, bool)
    try:
        indices = sharding.addressable_devices_indices_map(global_shape)
    except ValueError as e:  # JAX: a dimension that does not divide over its mesh axes
        raise ValueError(f"global_shape={global_shape} cannot be split by {sharding}: {e}") from e
    for index in indices.values():
        taken[np.arange(n)[index[0] if index else slice(None)]] = True
    return np.flatnonzero(taken)


def _is_global(sharding: jax.sharding.Sharding) -> bool:
    return not sharding.is_fully_addressable


def _check_placement(name: str, path: Any, leaf: Any, sharding: jax.sharding.Sharding) -> None:
    """Raises naming the leaf if it is not an array (or number) that ``sharding`` can split."""
    where = f"{name}{jax.tree_util.keystr(path)}"
    if not hasattr(leaf, "dtype"):
        try:
            kind = np.asarray(leaf).dtype.kind
        except (TypeError, ValueError):
            kind = "O"
        if kind not in "biufc":
            raise ValueError(f"{where}={_short(leaf)} must be an array or a number")
    shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
    spec = getattr(sharding, "spec", None)
    if spec is not None and len(spec) > len(shape):
        raise ValueError(
            f"{where} has shape {shape}, fewer dimensions than its sharding's spec {spec}"
        )
    try:
        sharding.shard_shape(shape)
    except (ValueError, IndexError) as e:  # JAX: a dimension that does not divide over its axes
        raise ValueError(
            f"{where} of shape {shape} cannot be split by "
            f"{spec if spec is not None else sharding}: {e}"
        ) from None


def put_global(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works when the shardings span processes.

    Every process passes the whole (host-local) value; each copies only the shards its own
    devices hold (``jax.make_array_from_callback``), so no array is sent between hosts. One
    small all-gather of hashes checks that every process passed the same values. Values
    already placed as asked are returned as they are.

    Raises:
      ValueError: a sharding that is not a ``jax.sharding.Sharding`` or does not fit its leaf
        (rank, divisibility), a leaf that is not an array or number, or processes that passed
        different values (naming the first such leaf).
    """
    return _put_global(tree, shardings, "tree")


def _put_global(tree: Any, shardings: Any, name: str) -> Any:
    """:func:`put_global`, naming the tree ``name`` in errors (``params``, ``batch``, ...)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    try:
        sharding_leaves = treedef.flatten_up_to(shardings)
    except ValueError as e:  # a pytree structure mismatch
        raise ValueError(
            f"shardings must have the structure of tree (one sharding per leaf, or a prefix): {e}"
        ) from None
    for (path, _), sharding in zip(leaves, sharding_leaves, strict=True):
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(
                f"shardings{jax.tree_util.keystr(path)}={_short(sharding)} must be a "
                f"jax.sharding.Sharding: one per leaf of {name}, or a prefix of its structure"
            )
    for (path, leaf), sharding in zip(leaves, sharding_leaves, strict=True):
        _check_placement(name, path, leaf, sharding)
    out, copied = [], {}
    for (path, leaf), sharding in zip(leaves, sharding_leaves, strict=True):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            out.append(leaf)
        elif not _is_global(sharding) or (
            isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        ):
            out.append(jax.device_put(leaf, sharding))  # one process, or resharding
        elif isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            out.append(jax.device_put(leaf, sharding))  # keys cannot go through numpy
        else:
            host = np.asarray(leaf)
            copied[jax.tree_util.keystr(path) or "the value"] = host
            out.append(
                jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index])
            )
    if copied:
        agree("put_global (every process must pass the same values)", copied)
    return jax.tree.unflatten(treedef, out)


def addressable_values(array: Any) -> list[np.ndarray]:
    """The distinct shards of ``array`` this process holds, as numpy (replicas once).

    For host-side checks on a global array, which cannot be fetched whole in a multi-process
    run ("spans non-addressable devices"): e.g. every example index of a batch is in range
    iff it is in every process's ``addressable_values``. A numpy array or a fully addressable
    ``jax.Array`` gives ``[np.asarray(array)]``.
    """
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return [_numeric("array", array)]
    seen: set[tuple] = set()
    values = []
    for shard in sorted(array.addressable_shards, key=lambda s: s.device.id):
        key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in shard.index)
        if key not in seen:
            seen.add(key)
            values.append(np.asarray(shard.data))
    return values


def _numeric(name: str, value: Any) -> np.ndarray:
    """``value`` as numpy, if it is an array or number (bool, integer, floating or complex)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype.kind not in "biufcV":
        raise ValueError(f"{name}={_short(value)} must be an array or a number")
    return array


def to_host(value: Any) -> np.ndarray:
    """The whole value of ``value`` as numpy, in every process.

    Fully replicated or local arrays are read locally; an array sharded over several
    processes is all-gathered (a collective: every process must call this together).
    """
    if not isinstance(value, jax.Array) or value.is_fully_addressable or value.is_fully_replicated:
        if isinstance(value, Mapping):
            raise ValueError(f"value={value!r} must be an array (use jax.tree.map for a pytree)")
        return _numeric("value", value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (for a local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except (OSError, TypeError) as e:  # unknown host name, an address of another machine
            raise ValueError(f"host={host!r} is not an address of this machine: {e}") from None
        return sock.getsockname()[1]


def launch(
    command: Sequence[str],
    *,
    num_processes: int,
    cpu_devices: int | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    output: Callable[[int], Any] | None = None,
) -> list[int]:
    """Runs ``command`` as ``num_processes`` processes of one run on this machine.

    Each process gets ``$EFFLAX_COORDINATOR_ADDRESS`` (``127.0.0.1`` and a free port),
    ``$EFFLAX_NUM_PROCESSES``, ``$EFFLAX_PROCESS_ID`` (and ``$EFFLAX_CPU_DEVICES``), which
    :func:`initialize` reads. If one process fails, the others are stopped; with ``timeout``,
    every process also ends by itself after ``timeout`` seconds (its stack is printed).

    Args:
      command: the program and its arguments, e.g. ``[sys.executable, 'train.py']``.
      num_processes: processes to start (>= 1).
      cpu_devices: CPU devices per process (for trying multi-host code on a CPU).
      timeout: seconds before every process is stopped.
      env: extra environment variables.
      output: ``output(process_id)`` gives the file object a process writes stdout and stderr
        to (default: this process's stdout/stderr).

    Returns:
      The exit code of every process (-signal when stopped, 124 on timeout).
    """
    _int_at_least("num_processes", num_processes)
    if cpu_devices is not None:
        _int_at_least("cpu_devices", cpu_devices)
    if timeout is not None and not (
        isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0
    ):
        raise ValueError(f"timeout={timeout!r} must be > 0")
    if (
        isinstance(command, str | bytes)
        or not isinstance(command, Sequence)
        or not command
        or not all(isinstance(part, str | os.PathLike) for part in command)
    ):
        raise ValueError(f"command={command!r} must be a non-empty list of strings")
    program = os.fspath(command[0])
    if shutil.which(program) is None:
        raise ValueError(
            f"command[0]={program!r} is not an executable program (not found on $PATH or not "
            "executable)"
        )
    if env is not None and not (
        isinstance(env, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise ValueError(f"env={env!r} must be a dict of strings (name -> value)")
    if output is not None and not callable(output):
        raise ValueError(f"output={output!r} must be callable (process id -> file) or None")
    address = f"127.0.0.1:{free_port()}"
    processes = []
    try:
        for process_id in range(num_processes):
            child_env = {**os.environ, **(env or {})}
            child_env.update(
                {
                    ENV_COORDINATOR: address,
                    ENV_NUM_PROCESSES: str(num_processes),
                    ENV_PROCESS_ID: str(process_id),
                }
            )
            if cpu_devices is not None:
                child_env[ENV_CPU_DEVICES] = str(cpu_devices)
            if timeout is not None:
                child_env[ENV_PROCESS_TIMEOUT] = str(max(int(timeout) - 1, 1))
            stream = output(process_id) if output is not None else None
            if stream is not None and not callable(getattr(stream, "fileno", None)):
                raise ValueError(
                    f"output({process_id}) returned {stream!r}; it must return an open file"
                )
            processes.append(
                subprocess.Popen(
                    list(command),
                    env=child_env,
                    stdout=stream,
                    stderr=subprocess.STDOUT if stream is not None else None,
                    start_new_session=True,
                )
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        codes: list[int | None] = [None] * num_processes
        while any(c is None for c in codes):
            for i, proc in enumerate(processes):
                if codes[i] is None:
                    codes[i] = proc.poll()
            if any(c not in (None, 0) for c in codes):
                break  # one failed: the others would wait for it in a collective
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.05)
        timed_out = any(c is None for c in codes) and not any(c not in (None, 0) for c in codes)
        _stop(processes)
        return [
            (124 if timed_out else proc.returncode) if codes[i] is None else codes[i]
            for i, proc in enumerate(processes)
        ]
    finally:
        _stop(processes)


def _stop(processes: Sequence[subprocess.Popen], grace: float = 3.0) -> None:
    """Stops the process groups that are still running: SIGTERM, then SIGKILL."""
    running = [p for p in processes if p.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    end = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(max(end - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """``efflax launch -n N [--cpu-devices D] [--timeout S] -- CMD ...``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="efflax launch", description="Run CMD as N processes of one run on this machine."
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
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
