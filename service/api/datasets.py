"""/v1/datasets: upload (streamed, hashed, validated in a sandbox), list, show, delete HDF5 data sets."""

from __future__ import annotations

from typing import IO

from flask import Blueprint, Response, request, url_for

from models.data.summary import DataKeys
from service.api import query_args, respond
from service.api.declare import HDF5, documented
from service.auth import authenticate, current_user, visible_owner_id
from service.errors import BadRequest, NotFound, UnsupportedMediaType
from service.extensions import services
from service.schemas import DatasetListOut, DatasetOut, DatasetUploadQuery, ErrorOut

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets")
bp.before_request(authenticate)

RAW_TYPES = ("application/x-hdf5", "application/octet-stream")
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file


@bp.post("")
@documented(
    "uploadDataset",
    summary="Upload an HDF5 data set (raw body or multipart field `file`); 200 when you already have it",
    query=DatasetUploadQuery,
    body_media={
        "application/x-hdf5": HDF5,
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "contentMediaType": "application/x-hdf5"}},
                "required": ["file"],
            }
        },
    },
    responses={201: (DatasetOut, "Stored"), 200: (DatasetOut, "Already yours")},
    errors=(400, 401, 413, 415, 422),
)
def upload() -> Response:
    """Upload an HDF5 file as the raw body or as multipart field ``file``.

    The body is streamed to a staging file in 1 MiB chunks while hashed, checked in the sandboxed
    validator, then moved to its content address. 201 when new, 200 when the caller already had
    these exact bytes, 413 past ``max_upload_bytes``, 422 listing every reason the file is refused.
    """
    svc = services()
    max_bytes = svc.settings.max_upload_bytes
    # Per request: the app-wide limit is small (JSON bodies); only this endpoint takes large bodies.
    request.max_content_length = max_bytes + MULTIPART_OVERHEAD_BYTES
    query = query_args(DatasetUploadQuery)
    keys = DataKeys.model_validate(query.model_dump(exclude={"name"}, exclude_none=True))

    if request.mimetype == "multipart/form-data":
        upload_file = request.files.get("file")
        if upload_file is None:
            raise BadRequest("expected the HDF5 file in the multipart field 'file'", field="file")
        stream: IO[bytes] = upload_file.stream
        name = query.name or upload_file.filename or None
    elif request.mimetype in RAW_TYPES:
        stream = request.stream
        name = query.name
    else:
        raise UnsupportedMediaType(
            "expected the HDF5 file as a raw body (Content-Type: application/x-hdf5) "
            f"or as multipart/form-data field 'file'. Received: {request.mimetype or 'no Content-Type'}"
        )

    user = current_user()
    staged = svc.storage.stage_stream(stream, max_bytes)
    if staged.size_bytes == 0:
        svc.storage.discard(staged)
        raise BadRequest("the upload is empty; expected an HDF5 file in the body", field="file")
    already = svc.db.find_dataset(user.id, staged.sha256)
    if already is not None:
        svc.storage.discard(staged)
        return respond(DatasetOut.of(already), 200)
    try:
        summary = svc.check_dataset(staged.path, keys, staged.sha256)  # hashed once, while streaming
        # The file is placed under the DB's lock on this content, after the row is written: a delete of
        # another user's row with the same bytes either ran first (the file is placed again) or sees ours.
        dataset, created = svc.db.add_dataset(
            user.id,
            staged.sha256,
            staged.size_bytes,
            summary.model_dump(mode="json"),
            svc.storage.dataset_key(staged.sha256),
            name=name,
            place_file=lambda: svc.storage.commit_dataset(staged),
        )
    finally:
        svc.storage.discard(staged)  # a no-op once committed (moved away)
    location = url_for("datasets.show", dataset_id=dataset.id)
    return respond(DatasetOut.of(dataset), 201 if created else 200, {"Location": location})


@bp.get("")
@documented("listDatasets", summary="Your data sets (an admin's: everyone's)", responses={200: DatasetListOut})
def index() -> Response:
    """The caller's data sets (an admin's: everyone's), newest first."""
    datasets = services().db.list_datasets(visible_owner_id())
    return respond(DatasetListOut(datasets=[DatasetOut.of(d) for d in datasets]))


@bp.get("/<dataset_id>")
@documented("getDataset", summary="One data set", responses={200: DatasetOut}, errors=(401, 404))
def show(dataset_id: str) -> Response:
    """One data set and its summary; 404 if it is not the caller's."""
    dataset = services().db.get_dataset(dataset_id, visible_owner_id())
    if dataset is None:
        raise NotFound(f"no data set {dataset_id!r}")
    return respond(DatasetOut.of(dataset))


@bp.delete("/<dataset_id>")
@documented(
    "deleteDataset",
    summary="Delete a data set (409 while a queued or running job uses it)",
    responses={204: {"description": "Deleted"}, 409: (ErrorOut, "In use")},
    errors=(401, 404),
)
def remove(dataset_id: str) -> Response:
    """Delete a data set (409 while a queued or running job uses it); the file goes with its last user."""
    delete_dataset(dataset_id, visible_owner_id())
    return Response(status=204)


def delete_dataset(dataset_id: str, owner_id: int | None) -> None:
    """Delete one of ``owner_id``'s data sets (None: anyone's) and its file unless another row shares it.

    Raises:
        NotFound: no such data set for this owner.
        DatasetInUse: a queued or running job uses it (409).
    """
    svc = services()
    # The DB removes the file under its lock on the content, only when no other row points at it.
    dataset = svc.db.delete_dataset(dataset_id, owner_id, remove_file=svc.storage.delete)
    if dataset is None:
        raise NotFound(f"no data set {dataset_id!r}")
