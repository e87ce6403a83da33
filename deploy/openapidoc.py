"""Print the API's OpenAPI document, as GET /openapi.json serves it (the documentation site renders it).

    .venv/bin/python deploy/openapidoc.py > docs/api/openapi.json

``tests/test_docs.py`` fails when the committed copy differs from what the routes declare.
"""

from __future__ import annotations

import json
import sys

from flask import Flask

from service.api.openapi import openapi_document
from service.app import register_blueprints


def openapi_json() -> str:
    """The document as committed: the routes' declarations, without starting anything."""
    app = Flask("gpuyard")
    register_blueprints(app)  # the routes only: no database, no queue
    return json.dumps(openapi_document(app), indent=1) + "\n"


if __name__ == "__main__":
    sys.stdout.write(openapi_json())
