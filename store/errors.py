"""The job store's refusals.

Hierarchy::

    GpuyardError (core.errors)
    └── JobDBError                 the job database refused
        ├── DatabaseUnavailable    the database cannot be reached (translated from SQLAlchemy)
        ├── SchemaError            the schema is newer than this code, or unversioned
        │   └── SchemaBehind       the schema is older than this code: run `gpuyard db upgrade`
        ├── UserExists             a user name is taken
        ├── UnknownDataset         a job names a data set that does not exist
        ├── DatasetInUse           a data set still has queued or running jobs
        └── ActiveJobLimit         a user already has the maximum of queued + running jobs

SQLAlchemy's errors are translated where they happen, ``raise ... from exc``; ``service/errors.py`` maps
each of these to an HTTP answer.
"""

from __future__ import annotations

from core.errors import GpuyardError


class JobDBError(GpuyardError):
    """Base of the job database's refusals."""

    code = "job_db_error"


class DatabaseUnavailable(JobDBError):
    code = "database_unavailable"


class SchemaError(JobDBError):
    code = "schema_error"


class SchemaBehind(SchemaError):
    code = "schema_behind"


class UserExists(JobDBError):
    code = "user_exists"


class UnknownDataset(JobDBError):
    code = "dataset_not_found"


class DatasetInUse(JobDBError):
    code = "dataset_in_use"


class ActiveJobLimit(JobDBError):
    code = "too_many_active_jobs"
