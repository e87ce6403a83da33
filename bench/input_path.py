"""The trainer's input paths against a bare ``fit(x, y)``, epoch by epoch in one process (not in CI).

    python bench/input_path.py                      # TensorFlow CPU, cnn, 2000 rows, 7 rounds (~3 min)
    python bench/input_path.py --family mlp --rounds 7

``bench/trainer_overhead.py`` compares whole trainer processes, minutes apart; on a shared box the load
changes between them by more than the input path costs. Here one model trains one epoch at a time
through each path in turn, in the same process, so a change of load hits every path of a round alike:

* ``bare``: ``model.fit(x, y, shuffle=True)`` on NumPy arrays, as a hand-written script does;
* ``tensors``: the trainer's in-memory path on TensorFlow (``worker.trainer.feed.tensor_batches``);
* ``pydataset``: the reader's ``EpochBatches`` over the same in-memory arrays (the path before);
* ``streamed``: ``EpochBatches`` reading each batch from the HDF5 file (data larger than memory).

Each path runs one untimed epoch first (tracing). Prints per path the median samples per wall second
and per CPU second of this process (all its threads: on a shared box the steadier measure of what the
path itself costs), each with the median over rounds of its ratio to that round's bare epoch, and the
load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from trainer_overhead import FAMILIES, write_data  # noqa: E402  (the same synthetic data and models)


def epoch_timer() -> Any:
    """A Keras callback holding the seconds (wall and CPU of this process) of the last epoch, from
    ``on_epoch_begin`` to ``on_epoch_end``: the steps and the input, not ``fit``'s own set-up (a bare
    script converts its arrays once per ``fit``, not per epoch)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        seconds = 0.0
        cpu_seconds = 0.0

        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            self.began = time.perf_counter()
            self.cpu_began = time.process_time()

        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            self.seconds = time.perf_counter() - self.began
            self.cpu_seconds = time.process_time() - self.cpu_began

    return EpochTimer()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="cnn")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import h5py
    import keras

    from models.build import build_model
    from models.data.reader import open_training_data
    from models.data.sandbox import check_file
    from models.spec import parse_spec
    from worker.trainer.feed import tensor_batches

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gpuyard-input-") as tmp:
        path = Path(tmp) / "data.h5"
        write_data(path, args.rows, args.family)
        summary = check_file(path)
        spec = parse_spec(
            {
                "name": "input-path",
                "architecture": FAMILIES[args.family],
                "training": {"epochs": 1, "batch_size": args.batch_size, "seed": 0},
            }
        )
        with h5py.File(path, "r") as f:
            x, y = f["X_train"][:], f["Y_train"][:]
        common = {"batch_size": args.batch_size, "seed": 0, "shuffle": True}
        memory = open_training_data(path, summary, in_memory_limit_bytes=2**34, **common)
        streamed = open_training_data(path, summary, in_memory_limit_bytes=1, **common)
        keras.utils.set_random_seed(0)
        model = build_model(spec, summary)
        tensors = tensor_batches(memory.train)
        timer = epoch_timer()
        fit = {"shuffle": False, "verbose": 0, "callbacks": [timer]}
        paths = {
            "bare": lambda: model.fit(x, y, batch_size=args.batch_size, verbose=0, callbacks=[timer]),
            "tensors": lambda: model.fit(tensors, **fit),
            "pydataset": lambda: model.fit(memory.train, **fit),
            "streamed": lambda: model.fit(streamed.train, **fit),
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        cpu_rates: dict[str, list[float]] = {name: [] for name in paths}
        for round_number in range(args.rounds + 1):
            for batches in (memory.train, streamed.train):
                batches.set_epoch(round_number)
            for name, run in paths.items():
                run()
                if round_number > 0:  # round 0 traces every path
                    rates[name].append(args.rows / timer.seconds)
                    cpu_rates[name].append(args.rows / timer.cpu_seconds)
            if round_number > 0:
                line = "  ".join(f"{n} {r[-1]:7.1f}/s ({cpu_rates[n][-1]:7.1f}/cpu-s)" for n, r in rates.items())
                print(f"round {round_number}: {line}", flush=True)
        streamed.close()

    print(f"\n{args.family}, {args.rows} rows, batch {args.batch_size}, {args.rounds} rounds, backend tensorflow CPU")
    print(f"load average before {', '.join(f'{v:.2f}' for v in load_before)}; after "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    for label, table in (("samples per wall second", rates), ("samples per CPU second of the process", cpu_rates)):
        print(f" {label}:")
        for name, values in table.items():
            ratios = [v / b for v, b in zip(values, table["bare"], strict=True)]
            print(
                f"  {name:>10}: {statistics.median(values):8.1f}  median ratio to bare "
                f"{statistics.median(ratios):.3f}  (rounds {', '.join(f'{r:.2f}' for r in ratios)})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
