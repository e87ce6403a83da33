"""Studies for real: ``gpuyard up`` on two fake 16 GiB GPUs, the real trainer (Keras on the CPU).

A grid study of examples/specs/highway.json over depth × width on digits finishes with four succeeded
trials and ``gpuyard study best --download`` saves a model.h5 that plain Keras loads with test accuracy
>= 0.9; a random study of 12 learning rates in [1e-4, 10] with the median pruner runs at least five trials
at once, prunes at least one (its reason kept), and ends every trial once, each with exactly one job.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
from api_helpers import free_port
from stack_helpers import GPUYARD, REPO, RunningStack, clean_env, gpuyard_up

from core.settings import Settings
from service.client import Client
from store import Database

pytestmark = pytest.mark.slow
HIGHWAY = json.loads((REPO / "examples/specs/highway.json").read_text())
CHROMIUM = Path("/usr/bin/chromium")


@dataclass
class Lab:
    stack: RunningStack
    client: Client
    token: str
    dataset: str
    db: Database


@pytest.fixture
def lab(tmp_path: Path, digits_h5: Path) -> Iterator[Lab]:
    data_dir = tmp_path / "stack"
    env = {"GPUYARD_FAKE_GPUS": "2x16GiB", "GPUYARD_JANITOR_INTERVAL_S": "1"}
    with gpuyard_up(data_dir, free_port(), env=env) as stack:
        db = Database(Settings(data_dir=data_dir).database_url)
        _user, token = db.create_user("ada")
        with Client(stack.url, token, timeout_s=60) as client:
            dataset = client.upload_dataset(digits_h5, name="digits")["id"]
            try:
                yield Lab(stack, client, token, dataset, db)
            finally:
                db.dispose()


def _wait_until_ended(lab: Lab, study_id: str, timeout_s: float, on_poll: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = lab.client.study(study_id)
        if on_poll is not None:
            on_poll(found)
        if found["finished_at"] is not None:
            return found
        assert time.monotonic() < deadline, (found, lab.stack.output()[-4000:])
        time.sleep(1)


def test_a_grid_study_finishes_and_its_best_model_loads_in_plain_keras(
    lab: Lab, tmp_path: Path, digits_h5: Path
) -> None:
    study = lab.client.create_study(
        {
            "name": "highway depth x width",
            "dataset": lab.dataset,
            "spec": HIGHWAY,
            "space": {"architecture.depth": {"choice": [2, 4]}, "architecture.width": {"choice": [32, 64]}},
            "sampler": "grid",
            "max_parallel": 4,
        }
    )
    found = _wait_until_ended(lab, study["id"], 900)
    assert found["state"] == "finished"
    assert [t["state"] for t in found["trials"]] == ["succeeded"] * 4, found["trials"]
    points = {(t["params"]["architecture.depth"], t["params"]["architecture.width"]) for t in found["trials"]}
    assert points == {(2, 32), (2, 64), (4, 32), (4, 64)}

    out_dir = tmp_path / "best"
    cli = subprocess.run(
        [*GPUYARD, "study", "best", study["id"], "--download", str(out_dir)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=clean_env(GPUYARD_URL=lab.stack.url, GPUYARD_TOKEN=lab.token),
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    model = out_dir / "model.h5"
    assert model.is_file() and str(model) in cli.stdout
    evaluate = (
        "import sys, h5py, numpy as np, keras\n"
        "m = keras.models.load_model(sys.argv[1])\n"
        "with h5py.File(sys.argv[2]) as f: x, y = f['X_test'][:], f['Y_test'][:]\n"
        "print(float(np.mean(np.argmax(m.predict(x, verbose=0), axis=1) == y.ravel())))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", evaluate, str(model), str(digits_h5)],
        capture_output=True, text=True, timeout=300, env=clean_env(TF_CPP_MIN_LOG_LEVEL="2"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.strip().splitlines()[-1]) >= 0.9
    _study_page_in_chromium(lab, study["id"], tmp_path)


def _study_page_in_chromium(lab: Lab, study_id: str, tmp_path: Path) -> None:
    """/ui/studies/<id> in a real browser: the trials table, sortable, and the best-so-far chart drawn."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (make chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(lab.stack.url + "/ui/login")
            page.get_by_label("Token").fill(lab.token)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(lab.stack.url + "/ui/jobs")
            page.goto(f"{lab.stack.url}/ui/studies/{study_id}")
            sync_api.expect(page.locator("#trials-table tbody tr")).to_have_count(4)
            sync_api.expect(page.locator("#study-best canvas")).to_have_count(1)
            assert page.locator("#study-best").get_attribute("data-values") == "4"
            header = page.locator("#trials-table th[data-sort='number']").last  # the objective's column
            header.click()
            header.click()  # descending: the best trial first
            assert "★" in page.locator("#trials-table tbody tr").first.inner_text()
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
        finally:
            browser.close()


def test_a_random_study_runs_trials_side_by_side_and_prunes(lab: Lab) -> None:
    spec = json.loads(json.dumps(HIGHWAY))
    spec["training"].update(epochs=6, early_stopping=None)
    study = lab.client.create_study(
        {
            "name": "learning rates",
            "dataset": lab.dataset,
            "spec": spec,
            "space": {"training.optimizer.learning_rate": {"float": [1e-4, 10], "log": True}},
            "sampler": "random",
            "trials": 12,
            "max_parallel": 8,
            "pruner": "median",
            "seed": 3,
        }
    )
    most_running = 0

    def watch(found: dict[str, Any]) -> None:
        nonlocal most_running
        most_running = max(most_running, sum(1 for t in found["trials"] if t["state"] == "running"))

    found = _wait_until_ended(lab, study["id"], 1500, watch)
    states = [t["state"] for t in found["trials"]]
    assert len(states) == 12 and all(s in ("succeeded", "pruned", "failed") for s in states), found["trials"]
    pruned = [t for t in found["trials"] if t["state"] == "pruned"]
    assert pruned and all(t["reason"] and t["detail"] for t in pruned), found["trials"]
    assert most_running >= 5, most_running
    # No job orphaned or duplicated: one job per trial number, every one ended, Optuna agreeing.
    jobs = lab.db.study_jobs(study["id"])
    assert sorted(j.trial_number for j in jobs) == list(range(12))
    assert all(j.is_terminal for j in jobs)
    storage = optuna.storages.RDBStorage(lab.db.url)
    trials = optuna.load_study(study_name=study["id"], storage=storage).get_trials(deepcopy=False)
    expected = {"succeeded": "COMPLETE", "pruned": "PRUNED"}
    assert {t.number: t.state.name for t in trials} == {j.trial_number: expected.get(j.state, "FAIL") for j in jobs}


def test_kill_9_of_every_process_mid_study_loses_no_trial_and_runs_none_twice(tmp_path: Path, digits_h5: Path) -> None:
    data_dir = tmp_path / "stack"
    env = {"GPUYARD_FAKE_GPUS": "1x16GiB", "GPUYARD_JANITOR_INTERVAL_S": "1", "GPUYARD_LEASE_SECONDS": "6"}
    spec = json.loads(json.dumps(HIGHWAY))
    spec["training"].update(epochs=12, early_stopping=None)
    with gpuyard_up(data_dir, free_port(), env=env) as stack:
        db = Database(Settings(data_dir=data_dir).database_url)
        _user, token = db.create_user("ada")
        try:
            with Client(stack.url, token, timeout_s=60) as client:
                dataset = client.upload_dataset(digits_h5, name="digits")["id"]
                study = client.create_study(
                    {
                        "name": "survives kill -9",
                        "dataset": dataset,
                        "spec": spec,
                        "space": {"training.optimizer.learning_rate": {"float": [1e-4, 1e-2], "log": True}},
                        "sampler": "tpe",
                        "trials": 5,
                        "max_parallel": 3,
                        "pruner": "none",
                    }
                )
                deadline = time.monotonic() + 600
                while sum(1 for j in db.study_jobs(study["id"]) if (j.last_progress or {}).get("epoch")) < 2:
                    assert time.monotonic() < deadline, stack.output()[-4000:]
                    time.sleep(0.5)
                victims = [
                    p
                    for p in stack.descendants()
                    if any(
                        word in " ".join(p.cmdline())
                        for word in (" worker", "worker.trainer", " janitor", "gunicorn", "redis-server")
                    )
                ]
                assert len(victims) >= 5
                for proc in victims:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
                deadline = time.monotonic() + 1200
                while True:  # `gpuyard up` restarts its children; the janitor requeues the trials, they resume
                    row = db.get_study(study["id"])
                    if row is not None and row.finished_at is not None:
                        break
                    assert time.monotonic() < deadline, stack.output()[-4000:]
                    time.sleep(1)
            jobs = db.study_jobs(study["id"])
            storage = optuna.storages.RDBStorage(db.url)
            trials = optuna.load_study(study_name=study["id"], storage=storage).get_trials(deepcopy=False)
        finally:
            db.dispose()
    assert sorted(j.trial_number for j in jobs) == list(range(5))  # one job per trial, none lost
    assert [j.state for j in jobs] == ["succeeded"] * 5, [(j.state, j.error_reason, j.error_detail) for j in jobs]
    assert any(j.attempts > 1 for j in jobs)  # the killed ones resumed (a new attempt of the same job)
    assert {t.number: t.state.name for t in trials} == {n: "COMPLETE" for n in range(5)}
