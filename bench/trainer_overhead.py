"""The trainer's overhead against a bare Keras script: same model, same data, one run (not in CI).

    python bench/trainer_overhead.py                       # mnist_cnn, 60000×28×28×1, 5 epochs, JAX
    python bench/trainer_overhead.py --rows 2000 --epochs 3 --backend tensorflow --gpu cpu   # CPU, ~1 min

Both sides build the model with ``models.build.build_model`` from the same spec and train on the same
synthetic HDF5 data with the same batch size: the trainer through ``python -m worker.trainer`` (events,
per-epoch diagnostics and checkpoints, data from the reader's PyDataset), the bare script with
``model.fit`` on NumPy arrays and no callbacks but an epoch timer. Prints samples/s of each (median over
the epochs after the first, which compiles), their ratio (goal ≥ 0.98), the trainer's effective rate
once its per-epoch diagnostics and checkpoint are counted, and the extra wall time per job.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

FAMILIES: dict[str, dict[str, Any]] = {
    # The course's mnist_cnn: Conv 32, Conv 64, max-pool, dropout, Dense 128, dropout.
    "cnn": {"family": "cnn", "filters": [32, 64], "kernel_size": 3, "dense_units": 128},
    "mlp": {"family": "mlp", "widths": [512, 512], "dropout": 0.2},
    "highway": {"family": "highway", "depth": 10, "width": 256},
}

BARE_SCRIPT = r"""
import json, sys, time
started = time.monotonic()
import h5py, keras, numpy as np
from models.build import build_model
from models.data.summary import DatasetSummary
from models.spec import parse_spec

spec_path, data_path, summary_path, result_path = sys.argv[1:5]
spec = parse_spec(json.loads(open(spec_path).read()))
summary = DatasetSummary.model_validate(json.loads(open(summary_path).read())["dataset"])
with h5py.File(data_path, "r") as f:
    x, y = f["X_train"][:], f["Y_train"][:]
keras.utils.set_random_seed(spec.training.seed)
model = build_model(spec, summary)

class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []
    def on_epoch_begin(self, epoch, logs=None):
        self.began = time.monotonic()
    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.monotonic() - self.began)

timer = EpochTimer()
model.fit(x, y, batch_size=spec.training.batch_size, epochs=spec.training.epochs, shuffle=True,
          verbose=0, callbacks=[timer])
with open(result_path, "w") as fh:
    json.dump({"epoch_seconds": timer.seconds, "rows": len(x), "backend": keras.backend.backend(),
               "in_process_s": time.monotonic() - started}, fh)
"""


def write_data(path: Path, rows: int, family: str, seed: int = 0) -> None:
    """Synthetic MNIST-shaped data: uint8-like pixels in [0, 1], 10 classes tied to the pixels."""
    rng = np.random.default_rng(seed)
    shape = (28, 28, 1) if family == "cnn" else (784,)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("X_train", shape=(rows, *shape), dtype="f4")
        y = f.create_dataset("Y_train", shape=(rows,), dtype="i8")
        for start in range(0, rows, 10_000):
            stop = min(start + 10_000, rows)
            block = rng.integers(0, 256, size=(stop - start, *shape)).astype(np.float32) / 255.0
            x[start:stop] = block
            y[start:stop] = (block.reshape(stop - start, -1)[:, :10].argmax(axis=1)).astype(np.int64)


def after_first_median(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def run_trainer(spec: Path, data: Path, out: Path, backend: str, gpu: str, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "worker.trainer", "--spec", str(spec), "--data", str(data)]
    command += ["--out", str(out), "--backend", backend, "--gpu", gpu]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.monotonic() - started
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"trainer exited {result.returncode}")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    epoch_ends = [e for e in events if e["event"] == "epoch_end"]
    epoch_starts = [e["time"] for e in events if e["event"] == "epoch_start"]
    finished = next(e for e in events if e["event"] == "finished")
    checkpoints = [e["duration_s"] for e in events if e["event"] == "checkpoint"]
    rows = next(e for e in events if e["event"] == "started")["train_rows"]
    # Wall per epoch between two epoch_start events: training plus diagnostics and the checkpoint.
    cycle = [b - a for a, b in itertools.pairwise(epoch_starts)]
    return {
        "wall_s": wall,
        "rows": rows,
        "samples_per_s": [rows / e["duration_s"] for e in epoch_ends],
        "cycle_samples_per_s": [rows / c for c in cycle],
        "checkpoint_s": checkpoints,
        "finished_wall_s": finished["wall_s"],
    }


def run_bare(spec: Path, data: Path, summary: Path, backend: str, gpu: str, env: dict[str, str]) -> dict:
    env = {**env, "KERAS_BACKEND": backend}
    if gpu == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    elif gpu != "any":
        env.update(CUDA_VISIBLE_DEVICES=gpu, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        started = time.monotonic()
        command = [sys.executable, "-c", BARE_SCRIPT, str(spec), str(data), str(summary), result.name]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        wall = time.monotonic() - started
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"bare script exited {done.returncode}")
        report = json.loads(Path(result.name).read_text())
    return {
        "wall_s": wall,
        "samples_per_s": [report["rows"] / s for s in report["epoch_seconds"]],
        "backend": report["backend"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="cnn")
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"), default="jax")
    parser.add_argument("--gpu", default="any", help="GPU UUID, 'any' or 'cpu' (both sides)")
    parser.add_argument("--memory-fraction", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    # Keep a PYTHONPATH already set (wheels carried to a GPU machine), with the checkout first.
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": python_path, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("KERAS_BACKEND", None)
    with tempfile.TemporaryDirectory(prefix="gpuyard-bench-") as tmp:
        work = Path(tmp)
        data = work / "data.h5"
        write_data(data, args.rows, args.family)
        spec = {
            "name": f"bench-{args.family}",
            "architecture": FAMILIES[args.family],
            "training": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0, "shuffle": True},
            "resources": {"memory_fraction": args.memory_fraction},
        }
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        trainer = run_trainer(spec_path, data, work / "out", args.backend, args.gpu, env)
        bare = run_bare(spec_path, data, work / "out" / "summary.json", args.backend, args.gpu, env)

    trainer_rate = after_first_median(trainer["samples_per_s"])
    cycle_rate = after_first_median(trainer["cycle_samples_per_s"] or trainer["samples_per_s"])
    bare_rate = after_first_median(bare["samples_per_s"])
    result = {
        "family": args.family,
        "backend": bare["backend"],
        "gpu": args.gpu,
        "rows": trainer["rows"],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "bare_samples_per_s": round(bare_rate, 1),
        "trainer_samples_per_s": round(trainer_rate, 1),
        "ratio": round(trainer_rate / bare_rate, 4),
        "trainer_samples_per_s_with_diagnostics_and_checkpoint": round(cycle_rate, 1),
        "ratio_with_diagnostics_and_checkpoint": round(cycle_rate / bare_rate, 4),
        "checkpoint_s_median": round(statistics.median(trainer["checkpoint_s"]), 4),
        "bare_wall_s": round(bare["wall_s"], 2),
        "trainer_wall_s": round(trainer["wall_s"], 2),
        "extra_wall_s_per_job": round(trainer["wall_s"] - bare["wall_s"], 2),
        "bare_samples_per_s_by_epoch": [round(v, 1) for v in bare["samples_per_s"]],
        "trainer_samples_per_s_by_epoch": [round(v, 1) for v in trainer["samples_per_s"]],
    }
    for key, value in result.items():
        print(f"{key:>55}: {value}")
    verdict = "meets" if result["ratio"] >= 0.98 else "MISSES"
    print(f"{'':>55}  {verdict} the goal ratio ≥ 0.98")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
