"""Who may do what: the one set of authorization rules (the HTTP API and the web UI never re-implement them).

Roles: ``user`` sees and acts on its own instances only (another user's instance does not exist for it:
:class:`InstanceNotFound`, so existence does not leak); ``platform`` creates for any user and manages any
instance, but gets no admin actions and no gateway traffic to others' instances; ``admin`` may do everything.
:class:`sandkeep.engine.instances.InstanceService` calls these before it touches anything; the HTTP layers
only map the exceptions to status codes.
"""

from __future__ import annotations

import re

from sandkeep.engine.service import Actor, Forbidden, InstanceNotFound, InvalidUserId, valid_user_id
from sandkeep.store.records import InstanceRecord

INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What an instance id can look like; anything else is not found without a store look-up."""


def shown_id(instance_id: str) -> str:
    """An instance id safe to echo in a message (a long one is cut)."""
    return instance_id if len(instance_id) <= 64 else instance_id[:64] + "..."


def not_found(instance_id: str) -> InstanceNotFound:
    return InstanceNotFound(f"instance {shown_id(instance_id)!r} not found")


def check_instance_id(instance_id: str) -> None:
    if not isinstance(instance_id, str) or not INSTANCE_ID_RE.match(instance_id):
        raise not_found(str(instance_id))


def can_see(actor: Actor, record: InstanceRecord) -> bool:
    """Users see their own instances; admins and platform see every instance."""
    return actor.role in ("admin", "platform") or record.user_id == actor.user_id


def check_visible(actor: Actor, record: InstanceRecord) -> None:
    if not can_see(actor, record):
        raise not_found(record.id)


def require_admin(actor: Actor) -> None:
    if not actor.is_admin:
        raise Forbidden("this action needs an admin token")


def check_create_for(actor: Actor, user_id: object) -> str:
    """The owner a create may name: a valid user id, and only the caller's own unless admin or platform."""
    if not valid_user_id(user_id):
        raise InvalidUserId(f"invalid user_id {str(user_id)[:64]!r}: 1-128 letters, digits or ._@:+- starting "
                            "with a letter or digit")
    assert isinstance(user_id, str)
    if user_id != actor.user_id and actor.role not in ("admin", "platform"):
        raise Forbidden("a user token can only create instances for its own user")
    return user_id


def list_scope(actor: Actor, user_id: str | None) -> str | None:
    """The owner filter a listing may use: users list their own instances only."""
    if actor.role == "user":
        if user_id is not None and user_id != actor.user_id:
            raise Forbidden("a user token can only list its own instances")
        return actor.user_id
    return user_id


def check_gateway(actor: Actor, record: InstanceRecord) -> None:
    """Gateway traffic is for the instance's owner or an admin (platform tokens manage, they do not read data)."""
    check_visible(actor, record)
    if actor.role == "platform" and record.user_id != actor.user_id:
        raise Forbidden("gateway traffic is for the instance's owner or an admin")

