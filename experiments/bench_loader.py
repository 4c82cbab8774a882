"""Benchmark: the loader's cost per global batch in 1 and 2 processes, beside a training step.

A multi-process run (``efflax.distributed``) must not pay for its global batches: each process
reads only the examples its own devices hold and assembles the global array with
``jax.make_array_from_callback``. Measured on 4 CPU devices as 1 process x 4 devices and as 2
processes x 2 devices (launched locally with ``efflax.distributed.launch``, gloo collectives):

- ``stream``: ``Loader.batch_at`` on MNIST-1D read from its ``array_record`` files (TFDS data
  source, nothing held in memory), batch 512.
- ``memory``: ``Loader.batch_at`` on in-memory images (32x32x3 float32), batch 1024.
- ``device_put``: the same image batch built whole in every process and ``jax.device_put`` onto
  the global sharding (what the loader did before: in several processes it checks that every
  process passed the same array).
- ``train step``: one ``make_train_step`` step of the MNIST-1D CNN on the streamed batch.

Before timing, every global batch is checked against the single-process in-memory batch. Times
are medians over rounds that interleave the variants, per process; the multi-process number is
the slower process.

    python -m experiments.bench_loader           # 40 rounds
    python -m experiments.bench_loader --quick   # 10 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile

DEVICES = 4
STREAM_BATCH = 512
IMAGE_BATCH = 1024
IMAGES = 4096


def _worker(out: pathlib.Path, rounds: int) -> None:
    import efflax

    efflax.distributed.initialize(initialization_timeout=60, heartbeat_timeout=30)

    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    from efflax import data
    from efflax import training
    from efflax.distributed import to_host

    assert jax.device_count() == DEVICES, jax.devices()
    mesh = efflax.sharding.make_mesh(data=DEVICES)
    stream = data.load("mnist1d", "train", STREAM_BATCH, seed=0, epochs=None, mesh=mesh,
                       in_memory=False)  # fmt: skip
    images = {
        "x": np.random.default_rng(0).normal(size=(IMAGES, 32, 32, 3)).astype(np.float32),
        "y": np.arange(IMAGES, dtype=np.int32) % 10,
    }
    memory = data.Loader(images, IMAGE_BATCH, seed=0, epochs=None, mesh=mesh)
    reference_stream = data.Loader(data.load_arrays("mnist1d", "train"), STREAM_BATCH, seed=0,
                                   epochs=None)  # fmt: skip
    reference_memory = data.Loader(images, IMAGE_BATCH, seed=0, epochs=None)
    for step in (0, 3):  # the global batches are the single-process, in-memory ones
        for loader, reference in ((stream, reference_stream), (memory, reference_memory)):
            got, want = loader.batch_at(step), reference.batch_at(step)
            for key in want:
                np.testing.assert_array_equal(to_host(got[key]), want[key])

    sharding = {k: NamedSharding(memory.mesh, PartitionSpec("data", *[None] * (v.ndim - 1)))
                for k, v in images.items()}  # fmt: skip

    def device_put_batch(step):
        batch = reference_memory.batch_at(step)  # the whole global batch, in every process
        return {k: jax.device_put(v, sharding[k]) for k, v in batch.items()}

    example = np.zeros((1, 40), np.float32)
    state = training.seed_state(efflax.models.CNN1D(), optax.adam(1e-3), seed=0, example=example)
    state = training.place_on_mesh(state, mesh)
    train_step = training.make_train_step(training.cross_entropy_loss_fn(), donate=False)
    train_batch = stream.batch_at(0)
    counter = iter(range(10**9))
    times = efflax.curves.interleaved_times(
        {
            "stream": (lambda: stream.batch_at(next(counter)), ()),
            "memory": (lambda: memory.batch_at(next(counter)), ()),
            "device_put": (lambda: device_put_batch(next(counter)), ()),
            "train step": (lambda: train_step(state, train_batch)[1], ()),
        },
        rounds=rounds,
    )
    medians = {name: t.median() for name, t in times.items()}
    result = {"process": jax.process_index(), "processes": jax.process_count(), **medians}
    (out / f"times{jax.process_index()}.json").write_text(json.dumps(result))


def _run(num_processes: int, rounds: int, directory: pathlib.Path) -> list[dict]:
    from efflax.distributed import launch

    out = directory / f"p{num_processes}"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(pathlib.Path(__file__).parent.parent), env.get("PYTHONPATH", "")]
    )
    codes = launch(
        [sys.executable, "-m", "experiments.bench_loader", "--worker", str(out),
         "--rounds", str(rounds)],
        num_processes=num_processes,
        cpu_devices=DEVICES // num_processes,
        timeout=900,
        env=env,
    )  # fmt: skip
    if codes != [0] * num_processes:
        raise SystemExit(f"{num_processes}-process run failed: exit codes {codes}")
    return [json.loads((out / f"times{i}.json").read_text()) for i in range(num_processes)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (10 if args.quick else 40)
    if args.worker:
        _worker(pathlib.Path(args.worker), rounds)
        return

    # Prepare MNIST-1D once, before the processes start (they would also do it themselves).
    import efflax

    efflax.data.data_source("mnist1d", "train")
    print(f"bench_loader: {DEVICES} CPU devices, {rounds} rounds, {platform.processor() or 'cpu'}"
          f", {os.cpu_count()} cores")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: _run(n, rounds, pathlib.Path(tmp)) for n in (1, 2)}
    labels = {
        "stream": f"loader, MNIST-1D from array_record, batch {STREAM_BATCH}",
        "memory": f"loader, in-memory 32x32x3 images, batch {IMAGE_BATCH}",
        "device_put": f"whole batch + jax.device_put (old), batch {IMAGE_BATCH}",
        "train step": f"train step, CNN on MNIST-1D, batch {STREAM_BATCH}",
    }
    worst = {n: {k: max(r[k] for r in results[n]) for k in labels} for n in results}
    header = ["per global batch", "1 process x 4 devices", "2 processes x 2 devices", "ratio"]
    rows = [
        (labels[k], worst[1][k] * 1e3, worst[2][k] * 1e3, worst[2][k] / worst[1][k]) for k in labels
    ]
    formats = [None, "{:.2f} ms", "{:.2f} ms", "{:.2f}x"]
    print("\n" + efflax.curves.markdown_table(header, rows, formats))
    ratio = max(worst[2][k] / worst[1][k] for k in ("stream", "memory"))
    share = worst[2]["stream"] / worst[2]["train step"]
    verdict = "PASS" if ratio <= 1.5 else "FAIL"
    print(
        f"\nclaim: the multi-process loader costs at most 1.5x the single-process one per batch; "
        f"measured: {ratio:.2f}x (worst of stream/memory), the streamed batch is {share:.2f}x "
        f"of a training step in 2 processes -> {verdict}"
    )


if __name__ == "__main__":
    main()
