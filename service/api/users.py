"""/v1/users/me: the caller's notification defaults, webhook signing secret, priority and GPU-hour quota."""

from __future__ import annotations

from flask import Blueprint, Response

from service.api import json_body, respond
from service.api.declare import documented
from service.auth import authenticate, current_user
from service.errors import Unprocessable
from service.extensions import services
from service.schemas import NotifyIn, QuotaOut, UserOut, WebhookSecretOut
from store import User
from worker.notify import SIGNATURE_HEADER, url_problems

bp = Blueprint("users", __name__, url_prefix="/v1/users")
bp.before_request(authenticate)


def _out(user: User) -> UserOut:
    quota = services().db.quota_of(user)
    return UserOut(
        name=user.name,
        is_admin=user.is_admin,
        notify=list(user.notify or []),
        has_webhook_secret=bool(user.webhook_secret),
        max_priority=user.max_priority,
        may_pin=bool(user.may_pin),
        quota=QuotaOut(
            gpu_hours=quota.gpu_hours,
            period=quota.period,
            used_gpu_hours=round(quota.used_gpu_hours, 6),
            over_quota=quota.over,
        ),
    )


@bp.get("/me")
@documented(
    "getMe", summary="Your account: default notify URLs, whether a webhook secret exists", responses={200: UserOut}
)
def me() -> Response:
    """Your account: name, admin flag, default notify URLs, whether a webhook secret exists, priority, quota."""
    user = services().db.get_user(current_user().id) or current_user()
    return respond(_out(user))


@bp.put("/me/notify")
@documented(
    "setMyNotify",
    summary="Set the notify URLs of your jobs that name none ([] for none)",
    body=NotifyIn,
    responses={200: UserOut},
    errors=(400, 401, 422),
)
def set_notify() -> Response:
    """Set the notify URLs of your jobs that name none (``notify`` in POST /v1/jobs); [] for none."""
    svc = services()
    body = json_body(NotifyIn)
    problems = url_problems(body.notify, svc.settings)
    if problems:
        raise Unprocessable.from_problems("notify_invalid", problems)
    user = svc.db.set_user_notify(current_user().id, body.notify)
    return respond(_out(user or current_user()))


@bp.post("/me/webhook-secret")
@documented(
    "rotateWebhookSecret",
    summary="Create a new webhook signing secret, shown this once (the old one stops signing at once)",
    responses={201: (WebhookSecretOut, "Created")},
)
def rotate_webhook_secret() -> Response:
    """Create a new webhook signing secret and show it, this once; webhooks are signed with it from now on."""
    secret = services().db.rotate_webhook_secret(current_user().id)
    assert secret is not None  # the caller was just authenticated
    return respond(WebhookSecretOut(secret=secret, header=SIGNATURE_HEADER), 201)
