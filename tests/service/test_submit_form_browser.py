"""The submit page's spec form, generated from the spec's JSON Schema, in Chromium: a job is built and
submitted without touching the JSON text area; the JSON view follows the form and the form follows the
JSON; the dry run reruns as fields change; and the job the form built equals the same spec typed as JSON.

The app is served in process with a fake dry run (no Keras); the whole stack's dashboard test is
test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from api_helpers import FakeDryRun, Tokens, bearer, upload
from flask import Flask

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():  # `make test` installs it (make chromium); CI must not silently skip
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: `make chromium` installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is not installed (make chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

# What the form is filled with below, as a user would type it in JSON.
TYPED = {
    "architecture": {"family": "highway", "depth": 3, "width": 48, "activation": "tanh"},
    "training": {"epochs": 4, "optimizer": {"name": "adam", "learning_rate": 0.002}, "early_stopping": {"patience": 2}},
    "output": {"export": ["onnx"]},
    "resources": {"memory_fraction": 0.25},
}


def test_a_job_built_in_the_form_equals_the_same_spec_typed_as_json(
    app: Flask, server_url: str, tokens: Tokens, dry_run: FakeDryRun, digits_h5: Path
) -> None:
    client = app.test_client()
    dataset = upload(client, tokens.alice, digits_h5).get_json()["id"]
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda exc: errors.append(f"uncaught {exc}"))
            # A dry run of a half-built spec answers 422 (Chromium logs it); nothing else may be an error.
            page.on("console", lambda msg: _console(msg, errors))
            form_job = _build_and_submit(page, server_url, tokens.alice, dataset, dry_run)
        finally:
            browser.close()
    assert errors == []
    built = client.get(f"/v1/jobs/{form_job}", headers=bearer(tokens.alice)).get_json()
    typed = client.post("/v1/jobs", json={"dataset": dataset, "spec": TYPED}, headers=bearer(tokens.alice))
    assert typed.status_code == 201, typed.get_json()
    assert built["spec"] == typed.get_json()["spec"]
    assert built["spec"]["architecture"]["depth"] == 3 and built["spec"]["training"]["optimizer"]["name"] == "adam"


def _console(message: Any, errors: list[str]) -> None:
    if message.type == "error" and "status of 422" not in message.text:
        errors.append(message.text)


def _build_and_submit(page: Any, url: str, token: str, dataset: str, dry_run: FakeDryRun) -> str:
    expect = sync_api.expect
    expect.set_options(timeout=30_000)
    page.goto(url + "/ui/login")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/ui/jobs")
    page.goto(url + "/ui/submit")
    page.get_by_label("Data set").select_option(dataset)
    expect(page.locator("#spec-json")).to_be_hidden()  # the form is the default view

    form = page.locator("#spec-form")
    form.get_by_label("Family *").select_option(label="highway")
    depth = form.get_by_label("Depth *")
    expect(depth).to_have_attribute("min", "1")
    expect(form.locator("[data-field=depth] .hint")).to_contain_text("Number of highway blocks")
    depth.fill("3")
    form.get_by_label("Width *").fill("48")
    form.locator("[data-field=architecture]").get_by_label("Activation", exact=True).select_option("tanh")
    form.get_by_label("Epochs").fill("4")
    form.get_by_label("Optimizer *").select_option(label="adam")
    form.get_by_label("Learning rate").fill("0.002")
    form.get_by_label("use early stopping").check()
    form.get_by_label("Patience").fill("2")
    form.locator("[data-field=export]").get_by_label("onnx").check()
    form.get_by_label("Memory fraction").fill("0.25")

    # The dry run reran on its own, for this very spec; Submit is enabled.
    expect(page.locator("#submit-button")).to_be_enabled()
    expect(page.locator("#dry-run-report")).to_contain_text("Parameters")
    assert dry_run.calls and dry_run.calls[-1][0]["architecture"]["depth"] == 3

    # The JSON view, one click away, holds what the form built; an edit there comes back to the form.
    page.get_by_role("button", name="JSON").click()
    assert json.loads(page.get_by_label("Spec (JSON)").input_value()) == TYPED
    edited = json.loads(page.get_by_label("Spec (JSON)").input_value())
    edited["training"]["epochs"] = 5
    page.get_by_label("Spec (JSON)").fill(json.dumps(edited))
    page.get_by_role("button", name="Form").click()
    expect(form.get_by_label("Epochs")).to_have_value("5")
    form.get_by_label("Epochs").fill("4")  # and back, in the form
    page.get_by_role("button", name="JSON").click()
    assert json.loads(page.get_by_label("Spec (JSON)").input_value()) == TYPED
    page.get_by_role("button", name="Form").click()

    expect(page.locator("#submit-button")).to_be_enabled()
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(url + "/ui/jobs/job_*")
    return str(page.url.rsplit("/", 1)[1])
