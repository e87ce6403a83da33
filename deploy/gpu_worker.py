"""A GPU container's worker: find the one GPU compose gave it, then run ``gpuyard worker --gpu <its UUID>``.

Compose pins a device by index or UUID on the host (``device_ids``); inside, that GPU is NVML's index 0
and the only one visible. Its UUID is what the job records and what CUDA_VISIBLE_DEVICES gets, so the
worker is started with the UUID, never with an index that means something else on the host. The worker
consumes the queue the API sends to (GPUYARD_TRAIN_QUEUE): every GPU takes the next job.

Extra arguments go to ``gpuyard worker`` (``python deploy/gpu_worker.py -c 2``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

import pynvml

from worker.settings import get_settings


class NoGpu(RuntimeError):
    """This container sees no GPU, or more than one, or NVML (the driver) is missing."""


def visible_gpu_uuids() -> list[str]:
    """UUIDs of the GPUs NVML sees in this container, in NVML order.

    Raises:
        NoGpu: NVML could not be loaded or initialised (no driver or no device passed to the container).
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NoGpu(
            f"no NVIDIA driver reachable from this container (NVML: {exc}); is the NVIDIA container toolkit "
            "installed on the host, and does the service reserve a device (deploy.resources.reservations)?"
        ) from exc
    try:
        uuids = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
            uuids.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
        return uuids
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def the_one_gpu(uuids: Sequence[str]) -> str:
    """The UUID of the single visible GPU.

    Raises:
        NoGpu: none or several are visible (one worker per GPU: reserve exactly one device_id).
    """
    if len(uuids) != 1:
        raise NoGpu(
            "Expected exactly one GPU in this container (one worker per GPU: one device_ids entry). "
            f"Received: {len(uuids)} visible {list(uuids)}"
        )
    return uuids[0]


def worker_argv(gpu_uuid: str, train_queue: str, extra: Sequence[str] = ()) -> list[str]:
    """The ``gpuyard worker`` command for this GPU, on the queue the API sends to."""
    return ["gpuyard", "worker", "--gpu", gpu_uuid, "--queue", train_queue, *extra]


def main(argv: Sequence[str] | None = None) -> None:
    extra = sys.argv[1:] if argv is None else list(argv)
    try:
        gpu_uuid = the_one_gpu(visible_gpu_uuids())
    except NoGpu as exc:
        print(f"gpu_worker: {exc}", file=sys.stderr)
        sys.exit(2)
    command = worker_argv(gpu_uuid, get_settings().train_queue, extra)
    print(f"gpu_worker: {' '.join(command)}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
