"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright, against `gpuyard up`.

The issue's scenario: sign in with the admin token, upload digits through the form (and see a refused
file's reasons), submit the highway example through the form after its dry run, watch the curve gain
points while it trains, open the gradient-flow view, compare it with a job submitted through the API,
see the fake GPUs and drain one, check that another user gets a 404 page and that a form posted without
its CSRF token is refused. Every page is screenshotted into docs/screenshots/ (the README shows them).
The test fails on any console error and on any request to a host other than the stack's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from api_helpers import free_port
from stack_helpers import GPUYARD, REPO, clean_env, gpuyard_up

from core.states import SUCCEEDED

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = REPO / "docs" / "screenshots"
TRAIN_TIMEOUT_MS = 300_000

if not CHROMIUM.exists():  # `make test` installs it (make chromium); CI must not silently skip
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: `make chromium` installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is not installed (make chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


class Watch:
    """Console errors, uncaught page errors and requests leaving the stack, of every page in a context."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.errors: list[str] = []
        self.offsite: list[str] = []

    def attach(self, context: Any) -> None:
        context.on("page", self._page)
        context.on("request", self._request)

    def _page(self, page: Any) -> None:
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"{page.url}: {msg.text}"))
        page.on("pageerror", lambda exc: self.errors.append(f"{page.url}: uncaught {exc}"))

    def _request(self, request: Any) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("data", "blob"):
            return
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.offsite.append(request.url)


def _shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def _create_user(data_dir: Path, name: str) -> str:
    result = subprocess.run(
        [*GPUYARD, "users", "create", name],
        capture_output=True, text=True, env=clean_env(GPUYARD_DATA_DIR=str(data_dir)), cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_dashboard_in_chromium(tmp_path: Path) -> None:
    from models.data.digits import write_digits_h5

    digits = write_digits_h5(tmp_path / "digits.h5")
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("this is not an HDF5 file\n")
    data_dir = tmp_path / "stack"
    with gpuyard_up(data_dir, free_port(), env={"GPUYARD_FAKE_GPUS": "1x16GiB"}) as stack:
        admin_token = (data_dir / "admin-token").read_text().strip()
        bob_token = _create_user(data_dir, "bob")
        watch = Watch(stack.url)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                _scenario(browser, stack.url, watch, admin_token, bob_token, digits, not_hdf5)
            finally:
                browser.close()
    assert watch.offsite == [], watch.offsite
    # Chromium logs every 4xx answer as a console error: the refused upload's 422 is the one we caused.
    refused = [e for e in watch.errors if "/ui/datasets: Failed to load resource" in e and "status of 422" in e]
    assert len(refused) == 1 and [e for e in watch.errors if e not in refused] == [], watch.errors


def _scenario(
    browser: Any, url: str, watch: Watch, admin_token: str, bob_token: str, digits: Path, not_hdf5: Path
) -> None:
    expect.set_options(timeout=30_000)  # a shared 2-core machine can be slow; a real failure still fails
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    watch.attach(context)
    page = context.new_page()
    _sign_in(page, url, admin_token)
    dataset_id = _upload(page, url, digits, not_hdf5)
    api_job = _submit_through_api(url, admin_token, dataset_id)
    form_job = _submit_through_form(page, url, dataset_id)
    final_points = _watch_training(context, page, url, form_job)
    _api_job_page(page, url, api_job)
    _select_for_compare(page, url, form_job, api_job)
    _compare(page, final_points)
    _drain_and_undrain(page, url)
    _csrf_refused(context, url, form_job)
    _phone_screen(browser, context, watch, url, form_job)
    _another_user(browser, url, bob_token, form_job)
    context.close()


def _sign_in(page: Any, url: str, admin_token: str) -> None:
    """Sign in with the admin token."""
    page.goto(url + "/")
    assert "/ui/login" in page.url
    _shot(page, "login.png")
    page.get_by_label("Token").fill(admin_token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/ui/jobs")


def _upload(page: Any, url: str, digits: Path, not_hdf5: Path) -> str:
    """Upload: a refused file shows the API's reasons; digits goes through with a progress bar."""
    page.goto(url + "/ui/datasets")
    page.set_input_files("#upload-file", str(not_hdf5))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-result .flash.error")).to_be_visible(timeout=120_000)
    assert page.locator("#upload-percent").inner_text() == "refused"
    page.set_input_files("#upload-file", str(digits))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#dataset-table")).to_contain_text("digits.h5", timeout=120_000)
    dataset_id = str(page.locator("#dataset-table tbody tr small").first.inner_text())
    _shot(page, "datasets.png")
    return dataset_id


def _submit_through_api(url: str, admin_token: str, dataset_id: str) -> str:
    """A second job through the API (bearer token), to compare with and to follow live."""
    snn = json.loads((REPO / "examples" / "specs" / "snn.json").read_text())
    snn["training"]["epochs"] = 6
    response = requests.post(
        url + "/v1/jobs",
        json={"dataset": dataset_id, "spec": snn},
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _submit_through_form(page: Any, url: str, dataset_id: str) -> str:
    """Submit the highway example through the form, after its dry run."""
    page.goto(url + "/ui/submit")
    page.get_by_label("Data set").select_option(dataset_id)
    page.get_by_label("Start from an example").select_option("highway.json")
    assert '"highway"' in page.get_by_label("Spec (JSON)").input_value()
    expect(page.locator("#submit-button")).to_be_disabled()
    page.get_by_role("button", name="Dry run").click()
    expect(page.locator("#layer-table tbody tr").first).to_be_visible(timeout=TRAIN_TIMEOUT_MS)
    expect(page.locator("#submit-button")).to_be_enabled()
    expect(page.locator("#dry-run-report")).to_contain_text("per training step at batch size 32")
    expect(page.locator("#dry-run-report")).to_contain_text("17,290")
    _shot(page, "submit.png")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(url + "/ui/jobs/job_*")
    return str(page.url.rsplit("/", 1)[1])


def _watch_training(context: Any, page: Any, url: str, form_job: str) -> int:
    """The curve gains points while the job trains, then the page reads "succeeded"."""
    page.wait_for_function(
        "() => +(document.getElementById('curves').dataset.points || 0) >= 1", timeout=TRAIN_TIMEOUT_MS
    )
    first_points = int(page.locator("#curves").get_attribute("data-points") or 0)
    expect(page.locator("#loss-chart canvas")).to_have_count(1)
    # The gradient flow is drawn from the trainer's per-epoch diagnostics events, while it trains.
    page.wait_for_function(
        "() => +(document.getElementById('gradient-heatmap').dataset.cells || 0) > 0", timeout=60_000
    )
    board = context.new_page()  # the GPU board while the job runs on the fake GPU
    board.goto(url + "/ui/gpus")
    expect(board.locator(".gpu-card").first).to_contain_text("Fake GPU 16 GiB")
    _shot(board, "gpus.png")
    board.goto(url + "/ui/jobs")  # the list with the job's live progress bar (if it still trains)
    expect(board.locator("#job-tables")).to_contain_text(form_job)
    _shot(board, "jobs-live.png")
    board.close()
    page.wait_for_function(
        f"() => +(document.getElementById('curves').dataset.points || 0) > {first_points}"
        " || document.getElementById('curves').dataset.ended",
        timeout=TRAIN_TIMEOUT_MS,
    )
    expect(page.locator("#job-state")).to_have_text(SUCCEEDED, timeout=TRAIN_TIMEOUT_MS)
    final_points = int(page.locator("#curves").get_attribute("data-points") or 0)
    assert final_points > first_points, (first_points, final_points)
    # The gradient-flow view: the heatmap and the ratio, every epoch and epoch 0 (before training).
    expect(page.locator("#gradient-flow")).to_have_attribute("data-loaded", "events")
    expect(page.locator("#ratio-chart canvas")).to_have_count(1)
    expect(page.locator("#activation-std-chart canvas")).to_have_count(1)
    expect(page.locator("#job-status")).to_contain_text("model.h5")
    expect(page.locator("#job-status").get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.locator("#ratio-chart .u-legend .u-series")).to_have_count(1)
    assert int(page.locator("#ratio-chart").get_attribute("data-values") or 0) == final_points + 1  # + epoch 0
    _shot(page, "job.png")

    # A reload continues from where the curves were (the stream replays the stored events).
    page.reload()
    page.wait_for_function(
        f"() => +(document.getElementById('curves').dataset.points || 0) >= {final_points}", timeout=60_000
    )
    return final_points


def _api_job_page(page: Any, url: str, api_job: str) -> None:
    """The API-submitted job: its page shows a chart and reads "succeeded" at the end."""
    page.goto(f"{url}/ui/jobs/{api_job}")
    expect(page.locator("#job-state")).to_have_text(SUCCEEDED, timeout=TRAIN_TIMEOUT_MS)
    expect(page.locator("#loss-chart canvas")).to_have_count(1)


def _select_for_compare(page: Any, url: str, form_job: str, api_job: str) -> None:
    """The jobs list: tick both jobs (the ticks survive the list's live refresh), then compare them."""
    page.goto(url + "/ui/jobs")
    expect(page.locator("#job-tables")).to_contain_text(form_job)
    page.get_by_label(f"Compare {form_job}").check()
    page.get_by_label(f"Compare {api_job}").check()
    with page.expect_response(lambda r: "/ui/jobs/rows" in r.url):  # one refresh of the tables
        pass
    expect(page.get_by_label(f"Compare {form_job}")).to_be_checked()
    _shot(page, "jobs.png")
    page.get_by_role("button", name="Compare selected").click()
    page.wait_for_url(url + "/ui/compare?*")
    assert form_job in page.url and api_job in page.url


def _compare(page: Any, final_points: int) -> None:
    """Compare: three charts, each with both jobs; the specs' differences."""
    expect(page.locator("#compare-data")).to_have_attribute("data-drawn", "2")
    for chart in ("compare-loss", "compare-metric", "compare-ratio"):
        expect(page.locator(f"#{chart} canvas")).to_have_count(1)
        expect(page.locator(f"#{chart} .u-legend .u-series")).to_have_count(2)  # one per job
        assert int(page.locator(f"#{chart}").get_attribute("data-values") or 0) > final_points, chart
    expect(page.locator("body")).to_contain_text("architecture.family")
    _shot(page, "compare.png")


def _drain_and_undrain(page: Any, url: str) -> None:
    """The fake GPU, drained and undrained by the admin."""
    page.goto(url + "/ui/gpus")
    expect(page.locator(".gpu-card")).to_have_count(1)
    expect(page.locator(".gpu-card").first).to_contain_text("Fake GPU 16 GiB")
    page.get_by_role("button", name="Drain GPU 0").click()
    expect(page.locator(".gpu-card .state")).to_have_text("draining")
    page.get_by_role("button", name="Undrain GPU 0").click()
    expect(page.locator(".gpu-card .state")).not_to_have_text("draining")


def _csrf_refused(context: Any, url: str, form_job: str) -> None:
    """A form posted without its CSRF token is refused (the browser's own cookie goes with it)."""
    refused = context.request.post(f"{url}/ui/jobs/{form_job}/cancel", form={"back": "list"})
    assert refused.status == 400, refused.status
    refused = context.request.post(f"{url}/v1/jobs/{form_job}/cancel")
    assert refused.status == 400 and refused.json()["error"] == "csrf_failed"


def _phone_screen(browser: Any, context: Any, watch: Watch, url: str, form_job: str) -> None:
    """A phone-sized screen."""
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True)
    watch.attach(phone)
    phone.add_cookies(context.cookies())
    small = phone.new_page()
    small.goto(f"{url}/ui/jobs/{form_job}")
    expect(small.locator("#job-state")).to_have_text(SUCCEEDED)
    assert small.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # no sideways scrolling
    _shot(small, "job-390px.png")
    phone.close()


def _another_user(browser: Any, url: str, bob_token: str, form_job: str) -> None:
    """Another user: signed in, the admin's job is a 404 page, and not in their list."""
    other = browser.new_context(viewport={"width": 1280, "height": 900})
    other_watch = Watch(url)
    other_watch.attach(other)
    bob = other.new_page()
    bob.goto(url + "/ui/login")
    bob.get_by_label("Token").fill(bob_token)
    bob.get_by_role("button", name="Sign in").click()
    bob.wait_for_url(url + "/ui/jobs")
    assert form_job not in bob.content()
    response = bob.goto(f"{url}/ui/jobs/{form_job}")
    assert response is not None and response.status == 404
    expect(bob.locator("h1")).to_contain_text("404")
    other.close()
    assert other_watch.offsite == []
    # The 404 navigation itself is the only error the browser may report there.
    assert all("404" in error for error in other_watch.errors), other_watch.errors
