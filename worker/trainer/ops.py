"""``python -m worker.trainer.ops --request REQUEST.json``: one model operation on a finished job, in its own process.

The worker (``worker/operations.py``) writes the request and starts this in its own process group, under
the same host-memory watchdog and parent-death signal as a trainer; TensorFlow is imported here only, never
in the Celery worker or the API. The request::

    {"kind": "evaluate", "model": ".../model.h5", "batch_size": 64, "in_memory_limit_bytes": ...,
     "data": ".../<sha256>.h5", "summary": {...}, "split": "test"}
    {"kind": "predict",  "model": ..., "batch_size": ..., "inputs": ".../input.npy | input.h5", "key": "X"}
    {"kind": "export",   "model": ..., "out": ".../jobs/<id>", "formats": ["onnx", "saved_model"]}

stdout carries one JSON line: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "reason", "detail",
"problems"}``; logs go to stderr. Always the TensorFlow backend on the CPU (a ``.h5`` loads on any backend,
and the exports need TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import GpuyardError
from models.data.summary import DatasetSummary
from worker.trainer import env
from worker.trainer.cli import claim_stdout, route_logs_to_stderr

KINDS = ("evaluate", "predict", "export")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.trainer.ops", description=__doc__.splitlines()[0])
    parser.add_argument("--request", required=True, type=Path, help="the operation, JSON")
    args = parser.parse_args(argv)
    out = claim_stdout()
    route_logs_to_stderr()
    try:
        reply: dict[str, Any] = {"ok": True, "result": run(json.loads(args.request.read_text()))}
    except GpuyardError as exc:
        reply = {"ok": False, "reason": exc.code, "detail": str(exc), "problems": [p.to_dict() for p in exc.problems]}
    except MemoryError as exc:
        reply = {"ok": False, "reason": "out_of_memory", "detail": f"MemoryError: {exc}"}
    except Exception as exc:  # a bug or a framework error: the worker records it, the traceback goes to the log
        traceback.print_exception(exc, file=sys.stderr)
        reply = {"ok": False, "reason": "internal_error", "detail": f"{type(exc).__name__}: {exc}"[:4000]}
    out.write(json.dumps(reply) + "\n")
    out.flush()
    return 0 if reply["ok"] else 1


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Carry out one request (see the module's docstring) and return its result."""
    kind = request.get("kind")
    if kind not in KINDS:
        raise ValueError(f"Expected kind among {KINDS}. Received: kind={kind!r}")
    plan = env.plan_environment(backend="tensorflow", device="cpu", memory_fraction=None, gpu_total_bytes=None)
    env.apply_environment(plan)
    from worker.trainer import modelops  # imports Keras: only now that the environment is set

    model = modelops.load_model(request["model"])
    if kind == "evaluate":
        return modelops.evaluate(
            model,
            request["data"],
            DatasetSummary.model_validate(request["summary"]),
            split=request["split"],
            batch_size=int(request["batch_size"]),
            in_memory_limit_bytes=int(request["in_memory_limit_bytes"]),
        )
    if kind == "predict":
        x = modelops.read_inputs(request["inputs"], request.get("key", "X"))
        return modelops.predict(model, x, batch_size=int(request["batch_size"]))
    written = modelops.export_model(model, request["out"], request["formats"])
    return {"artifacts": {fmt: Path(path).name for fmt, path in written.items()}}


if __name__ == "__main__":
    sys.exit(main())
