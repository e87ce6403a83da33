"""Every error gpuyard raises on purpose maps to an API error (as httpx tests its exception mapping)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import cli
import core
import models
import service
import worker
from core.errors import GpuyardError
from service.errors import ApiError, to_api_error

# Errors an API request never meets (the command line, the local stack, a schema newer than the code):
# they may map to a plain 500 with their own message. The HTTP client's ClientError is raised on the
# other side of the wire and is not walked.
NOT_ON_THE_API = {"SchemaError", "SchemaBehind", "StackError", "UserExists", "JobDBError", "StorageError"}
# Mapped to another code on purpose: a malformed storage key is simply "not found" to a client.
RENAMED = {"InvalidKey": "not_found"}
# Answered with a fixed sentence on purpose: the driver's message names hosts and users.
FIXED_DETAIL = {"DatabaseUnavailable"}


def _all_error_types() -> list[type[GpuyardError]]:
    for package in (core, models, worker, service, cli):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            keras_modules = ("models.build", "models.dryrun", "models.heads", "models.blocks", "worker.trainer.run")
            if info.name.startswith(keras_modules) or info.name.endswith(("callbacks", "diagnostics")):
                continue  # these import Keras; the errors they raise are SpecError and DataError
            importlib.import_module(info.name)
    found: list[type[GpuyardError]] = []
    pending = [GpuyardError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return [cls for cls in found if not issubclass(cls, ApiError) and cls.__name__ != "ClientError"]


@pytest.mark.parametrize("error_type", _all_error_types(), ids=lambda cls: cls.__name__)
def test_every_error_type_maps_to_an_api_error(error_type: type[GpuyardError]) -> None:
    exc = error_type("what went wrong, and what was expected")
    api_error = to_api_error(exc)
    assert isinstance(api_error, ApiError)
    body = api_error.to_dict()
    assert body["error"] == RENAMED.get(error_type.__name__, exc.code)  # the machine-readable reason survives
    if error_type.__name__ not in FIXED_DETAIL:
        assert "what went wrong" in body["detail"]
    if error_type.__name__ not in NOT_ON_THE_API and error_type is not GpuyardError:
        assert 400 <= api_error.status_code < 500 or api_error.status_code == 503, (
            f"{error_type.__name__} reaches the API as a {api_error.status_code}; map it in service/errors.py"
        )
