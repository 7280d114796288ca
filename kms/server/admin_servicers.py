"""gRPC servicer of the security officer's key administration: ``KeyAdminService`` (kmsapi/v1/admin.proto).

Each method parses the request, calls a use case of ``KeyLifecycle`` (or ``KeyAdministration`` to create
keys) with the authenticated caller, and builds the response. The rules live in ``kms.domain.lifecycle``;
errors become status codes in ``translate_errors``; only security officers get here (``METHOD_ROLES`` in
``kms.server.auth``), and the use cases refuse keys of products outside the officer's scope (the product of
the key, or the product in the request for creation). ``add_key_admin`` registers the servicer on a server.

Audit: every method notes in the call's audit record (``note``) the product, the key acted on
(``resource``, ``keys/K``) and the key version (``key_version``: the version named, or the one a rotation or
creation made), the request's part before the use case runs, so that refused calls carry them too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain.errors import FailedPrecondition, InvalidArgument
from kms.domain.keys import Algorithm, KeyName, KeyVersion, KeyVersionState
from kms.domain.lifecycle import LifecycleEvent, ManagedKey, Transition
from kms.domain.ports import KeyRepository
from kms.server.audit_interceptor import note
from kms.server.auth import caller_of
from kms.server.errors import translate_errors
from kms.server.servicers import PURPOSES, STATES, key_pb
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import KeyLifecycle
from kmsapi.v1 import admin_pb2, admin_pb2_grpc, common_pb2, keys_pb2

_PURPOSES_OF_PB = {number: purpose for purpose, number in PURPOSES.items()}
_SETTABLE_STATES = {
    common_pb2.ENABLED: KeyVersionState.ENABLED,
    common_pb2.DISABLED: KeyVersionState.DISABLED,
}
_EVENTS = {
    LifecycleEvent.CREATED: admin_pb2.KEY_TRANSITION_CREATED,
    LifecycleEvent.ENABLED: admin_pb2.KEY_TRANSITION_ENABLED,
    LifecycleEvent.DISABLED: admin_pb2.KEY_TRANSITION_DISABLED,
    LifecycleEvent.DESTROY_SCHEDULED: admin_pb2.KEY_TRANSITION_DESTROY_SCHEDULED,
    LifecycleEvent.DESTROY_CANCELLED: admin_pb2.KEY_TRANSITION_DESTROY_CANCELLED,
    LifecycleEvent.DESTROYED: admin_pb2.KEY_TRANSITION_DESTROYED,
    LifecycleEvent.MADE_PRIMARY: admin_pb2.KEY_TRANSITION_MADE_PRIMARY,
}
# Longer than any period or delay the rules allow (those are checked by kms.domain.lifecycle), short enough
# for ``timedelta``: refused here so that a huge uint64 is INVALID_ARGUMENT, not an OverflowError.
_MAX_SECONDS = 10**10


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _seconds(value: int, field: str) -> timedelta:
    if value > _MAX_SECONDS:
        raise InvalidArgument(f"{field} of {value} seconds is out of range")
    return timedelta(seconds=value)


def _key_id(name: str) -> str:
    """The key id of ``keys/{key_id}``; a version name is refused (these methods act on a whole key)."""
    parsed = KeyName.parse(name)
    if parsed.version is not None:
        raise InvalidArgument(f"{name!r} names a key version; this method takes a key: 'keys/KEY_ID'")
    return parsed.key_id


def _new_primary(name: str, new_primary_version: str) -> int | None:
    """The version number ``new_primary_version`` names (None when empty); it must be of ``name``'s key."""
    if not new_primary_version:
        return None
    wanted = KeyName.parse(new_primary_version)
    if wanted.version is None or wanted.key_id != KeyName.parse(name).key_id:
        raise InvalidArgument(
            f"new_primary_version {new_primary_version!r} must name a version of the same key as {name!r}: "
            "'keys/KEY_ID/versions/N'"
        )
    return wanted.version


def version_pb(version: KeyVersion) -> keys_pb2.KeyVersion:
    return keys_pb2.KeyVersion(
        name=version.name, state=STATES[version.state], create_time=_timestamp(version.created_at)
    )


def managed_key_pb(managed: ManagedKey) -> admin_pb2.ManagedKey:
    key_id = managed.key.key_id
    message = admin_pb2.ManagedKey(
        key=key_pb(managed.key),
        scheduled_destructions=[
            admin_pb2.ScheduledDestruction(
                key_version=str(KeyName(key_id, number)), destroy_time=_timestamp(at)
            )
            for number, at in sorted(managed.destroy_after.items())
        ],
    )
    if managed.rotation is not None:
        message.rotation_period_seconds = int(managed.rotation.period.total_seconds())
        message.next_rotation_time.CopyFrom(_timestamp(managed.rotation.next_rotation_at))
    return message


def transition_pb(transition: Transition) -> admin_pb2.KeyTransition:
    message = admin_pb2.KeyTransition(
        key_version=transition.name,
        event=_EVENTS[transition.event],
        from_state=(
            common_pb2.KEY_VERSION_STATE_UNSPECIFIED
            if transition.from_state is None
            else STATES[transition.from_state]
        ),
        to_state=STATES[transition.to_state],
        actor=transition.actor,
        time=_timestamp(transition.at),
    )
    if transition.destroy_after is not None:
        message.destroy_time.CopyFrom(_timestamp(transition.destroy_after))
    return message


class KeyAdminServicer(admin_pb2_grpc.KeyAdminServiceServicer):
    def __init__(
        self,
        lifecycle: KeyLifecycle,
        admin: KeyAdministration,
        keys: KeyRepository,
        *,
        require_dual_control: bool = False,
    ) -> None:
        """With ``require_dual_control``, ScheduleKeyVersionDestruction is refused: destruction goes through
        ``ApprovalService`` (``kms.server.approval_servicers``), approved by other officers."""
        self._lifecycle = lifecycle
        self._admin = admin
        self._keys = keys
        self._require_dual_control = require_dual_control

    def _noted(self, name: str) -> str:
        """``name`` (``keys/K`` or ``keys/K/versions/N``), noted in the audit record with the key's product
        (read here, before the use case checks the caller's scope; an unknown key is NOT_FOUND, as there)."""
        note(resource=name)
        parsed = KeyName.parse(name)
        note(resource=str(KeyName(parsed.key_id)))
        if parsed.version is not None:
            note(key_version=str(parsed))
        note(product=self._lifecycle.get(parsed.key_id).key.product)
        return name

    @translate_errors
    def CreateKey(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CreateKeyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ManagedKey:
        caller = caller_of(context)
        purpose = _PURPOSES_OF_PB.get(request.purpose)
        if purpose is None:
            choices = ", ".join(common_pb2.KeyPurpose.Name(number) for number in _PURPOSES_OF_PB)
            raise InvalidArgument(f"purpose is required: one of {choices}")
        slot = request.sbv2_slot if request.HasField("sbv2_slot") else None
        note(product=request.product, resource=f"keys/{request.key_id}")
        key = self._admin.create_key_for(
            caller, request.key_id, request.product, purpose, Algorithm.parse(request.algorithm), slot
        )
        note(resource=key.name, key_version=key.version().name)
        self._lifecycle.record_creation(caller, key)
        return managed_key_pb(ManagedKey(key))

    @translate_errors
    def CreateProductKeySet(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CreateProductKeySetRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CreateProductKeySetResponse:
        caller = caller_of(context)
        note(product=request.product, resource=f"products/{request.product}")
        created, existing = self._admin.create_product_set_for(caller, request.product)
        if created:
            note(
                resource=",".join(key.name for key in created),
                key_version=",".join(key.version().name for key in created),
            )
        for key in created:
            self._lifecycle.record_creation(caller, key)
        return admin_pb2.CreateProductKeySetResponse(
            created=[managed_key_pb(ManagedKey(key)) for key in created],
            existing=[key.name for key in existing],
        )

    @translate_errors
    def RotateKey(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.RotateKeyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RotateKeyResponse:
        key_id = _key_id(self._noted(request.name))
        version = self._lifecycle.rotate(caller_of(context), key_id)
        note(key_version=version.name)
        return admin_pb2.RotateKeyResponse(
            key_version=version_pb(version), key=managed_key_pb(self._lifecycle.get(key_id))
        )

    @translate_errors
    def UpdateKeyVersionState(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.UpdateKeyVersionStateRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ManagedKey:
        target = _SETTABLE_STATES.get(request.state)
        if target is None:
            raise InvalidArgument(
                "state must be ENABLED or DISABLED; destruction is ScheduleKeyVersionDestruction's"
            )
        managed = self._lifecycle.set_state(
            caller_of(context),
            self._noted(request.name),
            target,
            new_primary=_new_primary(request.name, request.new_primary_version),
        )
        return managed_key_pb(managed)

    @translate_errors
    def SetPrimaryVersion(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.SetPrimaryVersionRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ManagedKey:
        return managed_key_pb(self._lifecycle.set_primary(caller_of(context), self._noted(request.name)))

    @translate_errors
    def ScheduleKeyVersionDestruction(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.ScheduleKeyVersionDestructionRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ManagedKey:
        self._noted(request.name)
        if self._require_dual_control:
            self._lifecycle.get_for(caller_of(context), request.name)  # out of scope: PERMISSION_DENIED first
            raise FailedPrecondition(
                "destroying a key version needs dual control: request it with "
                "ApprovalService.RequestKeyVersionDestruction ('kmsctl approvals request-destroy VERSION'); "
                "other officers approve it, then one executes it"
            )
        delay = (
            _seconds(request.delay_seconds, "delay_seconds") if request.HasField("delay_seconds") else None
        )
        managed = self._lifecycle.schedule_destroy(
            caller_of(context),
            request.name,
            delay=delay,
            new_primary=_new_primary(request.name, request.new_primary_version),
        )
        return managed_key_pb(managed)

    @translate_errors
    def CancelKeyVersionDestruction(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.CancelKeyVersionDestructionRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ManagedKey:
        return managed_key_pb(self._lifecycle.cancel_destroy(caller_of(context), self._noted(request.name)))

    @translate_errors
    def SetRotationSchedule(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.SetRotationScheduleRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ManagedKey:
        key_id = _key_id(self._noted(request.name))
        period = _seconds(request.period_seconds, "period_seconds") if request.period_seconds else None
        first = (
            request.first_rotation_time.ToDatetime(tzinfo=UTC)
            if period is not None and request.HasField("first_rotation_time")
            else None
        )
        managed = self._lifecycle.set_rotation_schedule(caller_of(context), key_id, period, first)
        return managed_key_pb(managed)

    @translate_errors
    def ListKeyTransitions(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.ListKeyTransitionsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListKeyTransitionsResponse:
        transitions = self._lifecycle.transitions_for(caller_of(context), self._noted(request.name))
        return admin_pb2.ListKeyTransitionsResponse(transitions=[transition_pb(t) for t in transitions])


def add_key_admin(
    server: grpc.Server,
    lifecycle: KeyLifecycle,
    admin: KeyAdministration,
    keys: KeyRepository,
    *,
    require_dual_control: bool = False,
) -> None:
    """Serve ``KeyAdminService`` on ``server``: lifecycle changes through ``lifecycle`` (construct it with
    ``changed=SigningService.key_changed`` so refusals take effect at once), key creation through ``admin``,
    and ``keys`` to read a product's existing keys for ``CreateProductKeySet``; ``require_dual_control``
    refuses ScheduleKeyVersionDestruction in favour of ``ApprovalService``."""
    servicer = KeyAdminServicer(lifecycle, admin, keys, require_dual_control=require_dual_control)
    admin_pb2_grpc.add_KeyAdminServiceServicer_to_server(servicer, server)
