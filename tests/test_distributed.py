"""Multi-controller runs: 2 real processes x 2 CPU devices on 127.0.0.1 against 1 process x 4.

The workloads live in ``_multiprocess_worker.py``: ``fit`` with checkpoint and resume (a state
sharded over the model axis, batches streamed per process), MoE with the expert axis spanning
both processes, and ProxSkip's sharded client step. This process runs the same workloads on 4
of its 8 devices and every number must agree to 1e-6; checkpoints written by 2 processes must
restore in 1 and the reverse.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efflax import distributed
from efflax.sharding import make_mesh
from efflax.training import open_checkpoints
from efflax.training import place_on_mesh
from efflax.training import read_metrics
from efflax.training import restore_latest

ROOT = pathlib.Path(__file__).parent.parent
WORKER_PATH = pathlib.Path(__file__).parent / "_multiprocess_worker.py"


def _worker_module():
    spec = importlib.util.spec_from_file_location("_multiprocess_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_numbers_close(actual, expected, what):
    assert sorted(actual) == sorted(expected), f"{what}: different entries"
    for key in expected:
        np.testing.assert_allclose(
            np.asarray(actual[key], np.float64),
            np.asarray(expected[key], np.float64),
            rtol=1e-6,
            atol=1e-6,
            err_msg=f"{what}: {key}",
        )


def test_two_processes_give_the_numbers_of_one(tmp_path, monkeypatch):
    worker = _worker_module()
    devices = jax.devices()[: worker.DEVICES]

    # The reference: 1 process, 4 devices, interrupted after INTERRUPT steps and resumed.
    monkeypatch.setenv("EFFLAX_DATA_DIR", str(tmp_path / "reference_data"))
    reference_dir = tmp_path / "reference_ckpt"
    _, first = worker.run_fit(devices, reference_dir, worker.INTERRUPT)
    written_by_one = tmp_path / "written_by_one"
    shutil.copytree(reference_dir, written_by_one)  # at step INTERRUPT, for the 2 processes
    state, second = worker.run_fit(devices, reference_dir, worker.FIT_STEPS)
    expected = {**worker.state_numbers(state, "fit"), **worker.state_numbers(state, "resumed")}
    expected.update(worker.history_numbers(first + second, "history"))
    expected.update(worker.loader_numbers(devices))
    expected.update(worker.moe_numbers(devices))
    expected.update(worker.proxskip_numbers(devices))

    # The same in 2 processes x 2 devices, on an empty data dir (process 0 prepares it).
    out = tmp_path / "out"
    out.mkdir()
    written_by_two = tmp_path / "written_by_two"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["EFFLAX_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    logs = [open(out / f"log{i}.txt", "w") for i in range(2)]  # noqa: SIM115
    try:
        codes = distributed.launch(
            [sys.executable, str(WORKER_PATH), str(out), str(written_by_two), str(written_by_one)],
            num_processes=2,
            cpu_devices=worker.DEVICES // 2,
            timeout=150,
            env=env,
            output=lambda i: logs[i],
        )
    finally:
        for log in logs:
            log.close()
    texts = [(out / f"log{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(t[-3000:] for t in texts)

    for i in range(2):
        with np.load(out / f"process{i}.npz") as numbers:
            _assert_numbers_close(dict(numbers), expected, f"process {i}")
    # Only process 0 prepared the data, showed progress and evaluations, wrote the metrics.
    assert "efflax: preparing mnist1d" in texts[0] and "preparing" not in texts[1]
    assert "test/accuracy=" in texts[0] and "test/accuracy=" not in texts[1]
    assert "train:" not in texts[1]
    info = [json.loads((out / f"process{i}.json").read_text()) for i in range(2)]
    assert [i["primary"] for i in info] == [True, False]
    assert len(read_metrics(out / "metrics.jsonl")) == info[0]["records"] == info[1]["records"]

    # A checkpoint written by 2 processes restores in 1.
    mesh = worker.fit_mesh(devices)
    with open_checkpoints(written_by_two) as manager:
        assert manager.latest_step() == worker.FIT_STEPS
        restored = restore_latest(manager, place_on_mesh(worker.fit_state(mesh), mesh))
    restored_numbers = worker.state_numbers(restored, "fit")
    _assert_numbers_close(
        restored_numbers, {k: v for k, v in expected.items() if k.startswith("fit")}, "restored"
    )


def test_distributed_helpers_in_one_process():
    assert distributed.initialize() is False  # no coordinator: one process, nothing to do
    assert distributed.is_primary()
    distributed.barrier("nothing to wait for")
    distributed.agree("one process", {"anything": 1})
    mesh = make_mesh(data=4, model=2)
    sharding = NamedSharding(mesh, P("data"))
    np.testing.assert_array_equal(distributed.process_local_rows(sharding, (8,)), np.arange(8))
    x = np.arange(16.0).reshape(8, 2)
    placed = distributed.put_global(x, sharding)
    assert placed.sharding == sharding
    np.testing.assert_array_equal(distributed.to_host(placed), x)
    (values,) = distributed.addressable_values(placed)
    np.testing.assert_array_equal(values, x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_processes=2), "coordinator_address"),
        (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator_address="10.0.0.1:1234", num_processes=2), "process_id"),
        (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), "process_id=2"),
        (dict(coordinator_address="10.0.0.1:1234", num_processes=0, process_id=0), "num_processes"),
    ],
)
def test_initialize_refuses_incomplete_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_launch_stops_the_others_when_one_fails(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, time\n"
        "if os.environ['EFFLAX_PROCESS_ID'] == '1':\n"
        "    raise SystemExit(3)\n"
        "time.sleep(60)\n"
    )
    codes = distributed.launch([sys.executable, str(script)], num_processes=2, timeout=30)
    assert codes[1] == 3 and codes[0] != 0  # process 0 did not wait out its sleep
    with pytest.raises(ValueError, match="num_processes"):
        distributed.launch([sys.executable, str(script)], num_processes=0)


def test_efflax_launch_command(tmp_path):
    from efflax.cli import main

    script = tmp_path / "who.py"
    script.write_text(
        "import os, pathlib\n"
        "pid = os.environ['EFFLAX_PROCESS_ID']\n"
        "assert os.environ['EFFLAX_NUM_PROCESSES'] == '3'\n"
        "assert os.environ['EFFLAX_COORDINATOR_ADDRESS'].startswith('127.0.0.1:')\n"
        f"pathlib.Path({str(tmp_path)!r}, 'p' + pid).write_text(os.environ['EFFLAX_CPU_DEVICES'])\n"
    )
    argv = ["launch", "-n", "3", "--cpu-devices", "2", "--timeout", "60", "--"]
    assert main([*argv, sys.executable, str(script)]) == 0
    assert sorted(p.name for p in tmp_path.glob("p*")) == ["p0", "p1", "p2"]
    assert (tmp_path / "p2").read_text() == "2"


# --- bad inputs: a ValueError naming the argument, before any process starts --------------------
_MESH = make_mesh(data=2, model=4)
_DATA = NamedSharding(_MESH, P("data"))

BAD_DISTRIBUTED = {
    "launch command str": (lambda: distributed.launch("python x.py", num_processes=1), r"command"),
    "launch command ints": (
        lambda: distributed.launch([sys.executable, 3], num_processes=1),
        r"command",
    ),
    "launch command missing": (
        lambda: distributed.launch(["no-such-program-efflax"], num_processes=1),
        r"command\[0\]",
    ),
    "launch command empty": (lambda: distributed.launch([], num_processes=1), r"command"),
    "launch processes 0": (
        lambda: distributed.launch([sys.executable], num_processes=0),
        r"num_processes",
    ),
    "launch processes float": (
        lambda: distributed.launch([sys.executable], num_processes=2.0),
        r"num_processes",
    ),
    "launch cpu_devices bool": (
        lambda: distributed.launch([sys.executable], num_processes=1, cpu_devices=True),
        r"cpu_devices",
    ),
    "launch timeout 0": (
        lambda: distributed.launch([sys.executable], num_processes=1, timeout=0),
        r"timeout",
    ),
    "launch env ints": (
        lambda: distributed.launch([sys.executable], num_processes=1, env={"A": 1}),
        r"env",
    ),
    "launch env list": (
        lambda: distributed.launch([sys.executable], num_processes=1, env=["A"]),
        r"env",
    ),
    "launch output": (
        lambda: distributed.launch([sys.executable], num_processes=1, output=3),
        r"output",
    ),
    "put_global str leaf": (
        lambda: distributed.put_global({"a": "abc"}, {"a": _DATA}),
        r"tree\['a'\]",
    ),
    "put_global indivisible": (
        lambda: distributed.put_global({"a": np.ones(3)}, {"a": _DATA}),
        r"tree\['a'\].*\(3,\)",
    ),
    "put_global rank": (
        lambda: distributed.put_global({"a": np.ones(())}, {"a": _DATA}),
        r"tree\['a'\]",
    ),
    "put_global structure": (
        lambda: distributed.put_global({"a": np.ones(2)}, {"b": _DATA}),
        r"shardings",
    ),
    "put_global not sharding": (
        lambda: distributed.put_global({"a": np.ones(2)}, {"a": "data"}),
        r"shardings\['a'\]",
    ),
    "initialize address int": (lambda: distributed.initialize(3, 2, 0), r"coordinator_address"),
    "initialize address no port": (
        lambda: distributed.initialize("localhost", 2, 0),
        r"coordinator_address",
    ),
    "initialize bind int": (
        lambda: distributed.initialize("localhost:1", 2, 0, coordinator_bind_address=1),
        r"coordinator_bind_address",
    ),
    "initialize device ids": (
        lambda: distributed.initialize("localhost:1", 2, 0, local_device_ids=["0"]),
        r"local_device_ids",
    ),
    "initialize process_id range": (
        lambda: distributed.initialize("localhost:1", 2, 2),
        r"process_id",
    ),
    "agree what": (lambda: distributed.agree(3, {}), r"what"),
    "agree values": (lambda: distributed.agree("x", [1]), r"values"),
    "barrier name": (lambda: distributed.barrier(3), r"name"),
    "process_local_rows sharding": (lambda: distributed.process_local_rows("s", (4,)), r"sharding"),
    "process_local_rows shape": (
        lambda: distributed.process_local_rows(_DATA, (4.0,)),
        r"global_shape",
    ),
    "process_local_rows indivisible": (
        lambda: distributed.process_local_rows(_DATA, (3,)),
        r"global_shape",
    ),
    "to_host object": (lambda: distributed.to_host(object()), r"value"),
    "addressable_values str": (lambda: distributed.addressable_values("abc"), r"array"),
    "to_host dict": (lambda: distributed.to_host({"a": 1}), r"value"),
    "free_port host": (lambda: distributed.free_port(3), r"host"),
}


@pytest.mark.parametrize("name", sorted(BAD_DISTRIBUTED))
def test_bad_call_is_refused_naming_the_argument(name):
    call, pattern = BAD_DISTRIBUTED[name]
    with pytest.raises(ValueError, match=pattern):
        call()
