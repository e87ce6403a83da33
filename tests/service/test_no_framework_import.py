"""The API process never imports a deep-learning framework (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
from service.app import create_app
from core.settings import Settings

app = create_app({"TESTING": True, "GPUYARD_SETTINGS": Settings(data_dir=sys.argv[1])})
client = app.test_client()
_, token = app.extensions["gpuyard"].db.create_user("alice")
auth = {"Authorization": f"Bearer {token}"}
GOOD = {"architecture": {"family": "mlp", "widths": [4]}}
statuses = [
    client.get("/v1/health").status_code,
    client.get("/openapi.json").status_code,
    client.get("/v1/jobs", headers=auth).status_code,
    client.get("/v1/datasets", headers=auth).status_code,
    client.post("/v1/jobs", json={"dataset": "ds_x", "spec": GOOD}, headers=auth).status_code,
    client.post("/v1/jobs", json={"dataset": "ds_x", "spec": {"architecture": {}}}, headers=auth).status_code,
    client.post("/v1/datasets", data=b"junk", content_type="application/x-hdf5", headers=auth).status_code,
]
frameworks = ("tensorflow", "keras", "jax", "torch")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in frameworks)
print(json.dumps({"statuses": statuses, "loaded": loaded}))
"""


def test_the_api_never_imports_a_framework(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [200, 200, 200, 200, 404, 422, 422]
    assert result["loaded"] == []
