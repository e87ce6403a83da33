"""A stand-in for ``python -m worker.trainer`` that follows its contract without Keras (fast tests).

Behaviour comes from the spec's ``fake`` key: ``epochs``, ``epoch_s`` (seconds per epoch),
``exit_code`` (exit with it after the first epoch, with a ``failed`` event), ``ignore_sigterm``.
SIGTERM: checkpoint, ``failed`` (cancelled), exit 6, unless ``ignore_sigterm``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

REASONS = {1: "internal_error", 3: "spec_invalid", 4: "dataset_invalid", 5: "out_of_memory", 7: "time_limit"}


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--spec", "--data", "--out", "--gpu"):
        parser.add_argument(name, required=name != "--gpu")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    fake = json.loads(Path(args.spec).read_text()).get("fake", {})
    out = Path(args.out)
    state_path = out / "checkpoint" / "state.json"
    stop = {"requested": False}
    if fake.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    first = json.loads(state_path.read_text())["epoch"] if args.resume and state_path.exists() else 0
    epochs = int(fake.get("epochs", 2))
    emit("started", epochs=epochs, resumed_from_epoch=first if args.resume else None, pid=os.getpid())
    print(f"fake trainer on {args.gpu}, data {args.data}", file=sys.stderr)
    for epoch in range(first + 1, epochs + 1):
        emit("epoch_start", epoch=epoch, epochs=epochs)
        deadline = time.monotonic() + float(fake.get("epoch_s", 0.05))
        while time.monotonic() < deadline and not stop["requested"]:
            time.sleep(0.01)
        if stop["requested"]:
            emit("failed", reason="cancelled", exit_code=6, detail="stopped by SIGTERM", problems=[])
            return 6
        emit("epoch_end", epoch=epoch, epochs=epochs, loss=1.0 / epoch, metrics={}, eta_s=0)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({"epoch": epoch}))
        emit("checkpoint", epoch=epoch)
        if "exit_code" in fake:
            code = int(fake["exit_code"])
            reason = REASONS.get(code, "internal_error")
            emit("failed", reason=reason, exit_code=code, detail="fake", problems=[])
            return code
    (out / "model.h5").write_bytes(b"fake")
    emit("finished", epochs_completed=epochs, metrics={}, artifacts=["model.h5"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
