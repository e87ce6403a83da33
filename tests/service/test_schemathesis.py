"""A bounded schemathesis run against /openapi.json (a standing test): whatever the generated requests,
the API answers no 5xx and every answer matches the schema it publishes (status, content type, body)."""

from __future__ import annotations

import pytest
import schemathesis
from api_helpers import Tokens
from flask import Flask
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from core.settings import Settings

EXAMPLES_PER_OPERATION = 20


@pytest.fixture
def settings(settings: Settings, redis_url: str) -> Settings:
    """The service tests' settings with the private Redis, so /v1/ready is honestly ready (200, not 503)."""
    return settings.model_copy(update={"redis_url": redis_url})
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.slow
def test_no_5xx_and_every_answer_matches_the_schema(app: Flask, tokens: Tokens) -> None:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    calls = {"n": 0}
    for operation in operations:

        @hypothesis_settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            calls["n"] += 1
            case.call_and_validate(headers={"Authorization": f"Bearer {tokens.alice}"}, checks=CHECKS)

        run()
    print(f"\nschemathesis: {len(operations)} operations, {calls['n']} requests, 0 failures")
