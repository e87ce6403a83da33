"""Every error is JSON with error/detail (and field where one is at fault): never HTML, never a traceback."""

from __future__ import annotations

from api_helpers import Tokens, assert_error_body, bearer

from core.settings import Settings
from service.app import create_app


def test_404_405_413_are_json(client, tokens: Tokens) -> None:  # type: ignore[no-untyped-def]
    assert_error_body(client.get("/nowhere"), 404, "not_found")
    response = client.put("/v1/health")
    assert_error_body(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]
    big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    response = client.post(
        "/v1/jobs", data=big, content_type="application/json", headers=bearer(tokens.alice)
    )
    assert_error_body(response, 413, "payload_too_large")


def test_an_unexpected_exception_is_a_json_500(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = create_app({"GPUYARD_SETTINGS": Settings(data_dir=tmp_path), "PROPAGATE_EXCEPTIONS": False})

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom")
    body = assert_error_body(response, 500, "internal_error")
    assert "secret internals" not in response.get_data(as_text=True)
    assert body["detail"]
    app.extensions["gpuyard"].db.dispose()
