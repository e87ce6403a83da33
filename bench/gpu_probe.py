"""Run a command on a GPU and report its peak GPU memory as NVML sees it (a bench helper, not in CI).

    python bench/gpu_probe.py --out peak.json -- python -m worker.trainer ...

Samples every 0.1 s: the memory NVML lists for the command's processes (pid match), and the device's
used memory minus the baseline taken before the command started (for containers where NVML's pids are
host pids and do not match ours).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

import psutil
import pynvml


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--index", type=int, default=0, help="NVML index of the GPU to watch")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(args.index)
    total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    baseline = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    started = time.monotonic()
    proc = subprocess.Popen(command)
    peak_pid_bytes = 0
    peak_used_delta = 0
    while proc.poll() is None:
        pids = {proc.pid}
        with contextlib.suppress(psutil.Error):
            pids |= {child.pid for child in psutil.Process(proc.pid).children(recursive=True)}
        try:
            running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except pynvml.NVMLError:
            running = []
        mine = sum((p.usedGpuMemory or 0) for p in running if p.pid in pids)
        peak_pid_bytes = max(peak_pid_bytes, mine)
        peak_used_delta = max(peak_used_delta, pynvml.nvmlDeviceGetMemoryInfo(handle).used - baseline)
        time.sleep(0.1)
    time.sleep(1.0)
    after = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    record = {
        "command": command,
        "exit_code": proc.returncode,
        "wall_s": round(time.monotonic() - started, 2),
        "gpu_total_bytes": total,
        "baseline_used_bytes": baseline,
        "peak_process_bytes": peak_pid_bytes,
        "peak_used_delta_bytes": peak_used_delta,
        "after_used_bytes": after,
    }
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=2)
    print(json.dumps(record))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
