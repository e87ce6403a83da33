"""A stand-in for ``python -m worker.trainer`` that follows its contract without Keras (fast tests).

Behaviour comes from the spec's ``fake`` key: ``epochs``, ``epoch_s`` (seconds per epoch),
``exit_code`` (exit with it after the first epoch, with a ``failed`` event), ``ignore_sigterm``,
``sigkill_after_epoch`` (SIGKILL itself after checkpointing that epoch, as the OOM killer would; only on a
fresh start), ``sigkill_every_attempt`` (after the first epoch of every attempt), ``rss_bytes`` (hold that
much host memory from the start).
SIGTERM: checkpoint, ``failed`` (cancelled), exit 6, unless ``ignore_sigterm``.

On a fake GPU (``GPUYARD_FAKE_GPUS``; the declarations live in ``GPUYARD_FAKE_GPU_DIR``):
``gpu_memory_bytes`` (declared at start, instead of the RSS), ``grow_to_bytes`` after ``grow_after_s``
seconds (to go over budget mid-run), ``leak_bytes`` (memory left held by no process at exit: a dirty GPU).
``--sleep S`` (or ``fake.sleep_s``) sleeps before the first epoch. The ``started`` event reports the
``CUDA_VISIBLE_DEVICES`` it inherited.

``--warm --backend B --gpu G`` follows the warm trainer's contract (worker/warm.py): wait for one JSON
line on stdin, then run the job it names, with stderr in its log; the ``started`` event then carries
``warm`` and the backend it was started for.
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
    for name in ("--spec", "--data", "--out", "--gpu", "--summary"):
        parser.add_argument(name, required=name in ("--spec", "--data", "--out"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=None)
    parser.add_argument("--backend")
    argv, warm_for = sys.argv[1:], None
    if argv[:1] == ["--warm"]:
        warm_for = argv[argv.index("--backend") + 1]
        line = sys.stdin.readline()
        if not line:
            return 0
        request = json.loads(line)
        argv = request["argv"]
        fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, 2)
        os.chdir(request["cwd"])
    args = parser.parse_args(argv)
    fake = json.loads(Path(args.spec).read_text()).get("fake", {})
    fake_dir = os.environ.get("GPUYARD_FAKE_GPU_DIR")
    on_fake_gpu = bool(os.environ.get("GPUYARD_FAKE_GPUS")) and fake_dir and (args.gpu or "cpu").startswith("GPU-")

    def declare(memory: int | None, pid: int | None = None, name: str | None = None) -> None:
        if on_fake_gpu:
            from worker.gpus import declare_fake_process

            declare_fake_process(Path(fake_dir), args.gpu, pid, memory, name=name)

    if "gpu_memory_bytes" in fake:
        declare(int(fake["gpu_memory_bytes"]), os.getpid())
    grow_at = time.monotonic() + float(fake.get("grow_after_s", 0)) if "grow_to_bytes" in fake else None
    out = Path(args.out)
    state_path = out / "checkpoint" / "state.json"
    stop = {"requested": False}
    if fake.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    first = json.loads(state_path.read_text())["epoch"] if args.resume and state_path.exists() else 0
    ballast = bytearray(int(fake.get("rss_bytes", 0)))  # touched: resident, not just reserved
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    epochs = int(fake.get("epochs", 2))
    emit(
        "started",
        epochs=epochs,
        resumed_from_epoch=first if args.resume else None,
        pid=os.getpid(),
        env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")},
        warm=warm_for,
    )
    time.sleep(args.sleep if args.sleep is not None else float(fake.get("sleep_s", 0)))
    print(f"fake trainer on {args.gpu}, data {args.data}", file=sys.stderr)
    for epoch in range(first + 1, epochs + 1):
        emit("epoch_start", epoch=epoch, epochs=epochs)
        deadline = time.monotonic() + float(fake.get("epoch_s", 0.05))
        while time.monotonic() < deadline and not stop["requested"]:
            if grow_at is not None and time.monotonic() >= grow_at:
                declare(int(fake["grow_to_bytes"]), os.getpid())
                emit("fake_grew", memory_bytes=int(fake["grow_to_bytes"]))
                grow_at = None
            time.sleep(0.01)
        if stop["requested"]:
            emit("failed", reason="cancelled", exit_code=6, detail="stopped by SIGTERM", problems=[])
            return 6
        emit("epoch_end", epoch=epoch, epochs=epochs, loss=1.0 / epoch, metrics={}, eta_s=0)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({"epoch": epoch}))
        emit("checkpoint", epoch=epoch)
        every = bool(fake.get("sigkill_every_attempt"))
        killed_here = epoch == first + 1 if every else epoch == fake.get("sigkill_after_epoch")
        if killed_here and (not args.resume or every):
            os.kill(os.getpid(), signal.SIGKILL)
        if "exit_code" in fake:
            code = int(fake["exit_code"])
            reason = REASONS.get(code, "internal_error")
            emit("failed", reason=reason, exit_code=code, detail="fake", problems=[])
            return code
    if "leak_bytes" in fake:
        declare(int(fake["leak_bytes"]), None, name=f"leak-{os.getpid()}")
    (out / "model.h5").write_bytes(b"fake")
    emit("finished", epochs_completed=epochs, metrics={}, artifacts=["model.h5"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
