"""``KeyAdminClient``: the security officer's key administration calls (``KeyAdminService``, admin.proto).

It shares a ``KmsClient``'s connection, deadline and retry policy, so the officer's client certificate is
the one that ``KmsClient`` was opened with::

    with KmsClient.from_files(target, ca="ca.pem", cert="officer.pem", key="officer.key") as kms:
        admin = KeyAdminClient(kms)
        rotated = admin.rotate_key("keys/artifacts")
        admin.disable_key_version("keys/artifacts/versions/1")
        for event in admin.list_transitions("keys/artifacts"):
            print(event.time, event.key_version, event.event.value, event.actor)

Calls that only set a state (enable, disable, set primary, schedule or cancel a destruction, set a rotation
schedule) are idempotent on the server and are retried on UNAVAILABLE under the client's ``RetryPolicy``,
like every other call. ``create_key``, ``create_product_key_set`` and ``rotate_key`` are made once: a
repeated creation fails with ``AlreadyExistsError`` and a repeated rotation adds another version, so an
UNAVAILABLE from a connection lost after the server acted must reach the officer, who checks with
``KmsClient.list_keys`` before trying again.

The values returned are frozen dataclasses with no gRPC in them; purposes and algorithms are the names the
service spells them with (``"key-encryption"``, ``"aes256"``), since an officer manages keys of every kind.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal, TypeVar

import grpc

from kmsapi.v1 import admin_pb2, admin_pb2_grpc, common_pb2, keys_pb2
from kmsctl import _wire
from kmsctl._models import KeyVersionState
from kmsctl.errors import IntegrityError, InvalidArgumentError

if TYPE_CHECKING:
    from kmsctl._client import KmsClient

PurposeName = Literal[
    "secure-boot-v2",
    "digest-signing",
    "ota-manifest",
    "key-encryption",
    "registration-transport",
    "payload-seed",
    "audit-checkpoint",
]
PURPOSES: dict[PurposeName, common_pb2.KeyPurpose.ValueType] = {
    "secure-boot-v2": common_pb2.SECURE_BOOT_V2,
    "digest-signing": common_pb2.DIGEST_SIGNING,
    "ota-manifest": common_pb2.OTA_MANIFEST,
    "key-encryption": common_pb2.KEY_ENCRYPTION,
    "registration-transport": common_pb2.REGISTRATION_TRANSPORT,
    "payload-seed": common_pb2.PAYLOAD_SEED,
    "audit-checkpoint": common_pb2.AUDIT_CHECKPOINT,
}


class TransitionEvent(enum.Enum):
    """What a ``KeyTransitionInfo`` records; the values are the service's names for the events."""

    UNSPECIFIED = "unspecified"
    CREATED = "created"
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTROY_SCHEDULED = "destroy-scheduled"
    DESTROY_CANCELLED = "destroy-cancelled"
    DESTROYED = "destroyed"
    MADE_PRIMARY = "made-primary"


@dataclass(frozen=True)
class ManagedKeyVersion:
    """A key version; ``destroy_time`` is when a DESTROY_SCHEDULED version's destruction falls due."""

    name: str
    state: KeyVersionState
    create_time: datetime | None
    destroy_time: datetime | None = None


@dataclass(frozen=True)
class ManagedKey:
    """A key as the officer sees it. ``purpose`` and ``algorithm`` are the service's names
    (``"digest-signing"``, ``"ecdsa-p256"``); ``sbv2_slot`` is the signature-block slot (0-2) of a Secure
    Boot V2 key, else None; ``rotation_period`` is None for keys rotated on demand only."""

    name: str
    product: str
    purpose: str
    algorithm: str
    sbv2_slot: int | None
    primary_version: str
    versions: tuple[ManagedKeyVersion, ...]
    rotation_period: timedelta | None
    next_rotation_time: datetime | None

    def version(self, name: str) -> ManagedKeyVersion:
        """The version called ``name`` (``keys/ID/versions/N``); ``KeyError`` if the key has none."""
        for version in self.versions:
            if version.name == name:
                return version
        raise KeyError(name)


@dataclass(frozen=True)
class RotatedKey:
    """The result of ``rotate_key``: the new version's name and the key right after the rotation."""

    key_version: str
    key: ManagedKey


@dataclass(frozen=True)
class ProductKeySet:
    """The result of ``create_product_key_set``: the keys created, and the names of those that existed."""

    created: tuple[ManagedKey, ...]
    existing: tuple[str, ...]


@dataclass(frozen=True)
class KeyTransitionInfo:
    """One recorded lifecycle event: who (``actor``) did what to which version, when, from which state to
    which. ``from_state`` is None for ``CREATED``; ``destroy_time`` is set for ``DESTROY_SCHEDULED``."""

    key_version: str
    event: TransitionEvent
    from_state: KeyVersionState | None
    to_state: KeyVersionState
    actor: str
    time: datetime | None
    destroy_time: datetime | None


_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class KeyAdminClient:
    """Key administration over ``kms``'s connection (which must use a security officer's certificate;
    other roles get ``PermissionDeniedError``). Names are ``keys/ID`` for keys and ``keys/ID/versions/N``
    for key versions. Closing ``kms`` closes this client too."""

    def __init__(self, kms: KmsClient) -> None:
        self._kms = kms
        self._stub = admin_pb2_grpc.KeyAdminServiceStub(kms._channel)

    # -- creating keys ---------------------------------------------------------------------------------

    def create_key(
        self, product: str, key_id: str, purpose: PurposeName, algorithm: str, *, sbv2_slot: int | None = None
    ) -> ManagedKey:
        """Generate version 1 of a new key ``keys/{key_id}`` of ``product`` inside the HSM. ``sbv2_slot``
        (0-2) is required for ``secure-boot-v2`` keys and refused for others. Made once (not retried)."""
        wire_purpose = PURPOSES.get(purpose)
        if wire_purpose is None:
            raise InvalidArgumentError(f"unknown purpose {purpose!r}; expected one of: {', '.join(PURPOSES)}")
        request = admin_pb2.CreateKeyRequest(
            product=product, key_id=key_id, purpose=wire_purpose, algorithm=algorithm
        )
        if sbv2_slot is not None:
            request.sbv2_slot = sbv2_slot
        return managed_key(self._once(self._stub.CreateKey, request))

    def create_product_key_set(self, product: str) -> ProductKeySet:
        """Create the manifest, KEK, registration and payload-seed keys ``product`` lacks (see admin.proto).
        Made once (not retried); calling it again creates what a failed call left out."""
        response = self._once(
            self._stub.CreateProductKeySet, admin_pb2.CreateProductKeySetRequest(product=product)
        )
        return ProductKeySet(
            created=tuple(managed_key(key) for key in response.created), existing=tuple(response.existing)
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    def rotate_key(self, name: str) -> RotatedKey:
        """Generate the next version of key ``name`` and make it the primary. Made once (not retried)."""
        response = self._once(self._stub.RotateKey, admin_pb2.RotateKeyRequest(name=name))
        new_version = response.key_version.name
        if not new_version.startswith(f"{name}/versions/"):
            raise IntegrityError(f"asked to rotate {name}, the server answered with {new_version!r}")
        return RotatedKey(key_version=new_version, key=managed_key(response.key))

    def enable_key_version(self, name: str, *, new_primary: str | None = None) -> ManagedKey:
        """Enable version ``name``. ``new_primary`` (a version of the same key) is made primary too."""
        return self._set_state(name, common_pb2.ENABLED, new_primary)

    def disable_key_version(self, name: str, *, new_primary: str | None = None) -> ManagedKey:
        """Disable version ``name``: it stops signing, wrapping and unwrapping at once. To disable the
        primary while other versions are enabled, name one of them as ``new_primary``."""
        return self._set_state(name, common_pb2.DISABLED, new_primary)

    def set_primary_version(self, name: str) -> ManagedKey:
        """Make enabled version ``name`` its key's primary (the one that signs new work)."""
        return managed_key(
            self._kms._unary(self._stub.SetPrimaryVersion, admin_pb2.SetPrimaryVersionRequest(name=name))
        )

    def schedule_destruction(
        self, name: str, *, delay: timedelta | None = None, new_primary: str | None = None
    ) -> ManagedKey:
        """Schedule version ``name``'s destruction after ``delay`` (1 hour to 120 days, whole seconds;
        None: the server's default of 24 hours). The version stops being used at once."""
        request = admin_pb2.ScheduleKeyVersionDestructionRequest(
            name=name, new_primary_version=new_primary or ""
        )
        if delay is not None:
            request.delay_seconds = _whole_seconds(delay, "delay")
        return managed_key(self._kms._unary(self._stub.ScheduleKeyVersionDestruction, request))

    def cancel_destruction(self, name: str) -> ManagedKey:
        """Cancel version ``name``'s scheduled destruction; it becomes disabled."""
        request = admin_pb2.CancelKeyVersionDestructionRequest(name=name)
        return managed_key(self._kms._unary(self._stub.CancelKeyVersionDestruction, request))

    def set_rotation_schedule(
        self, name: str, period: timedelta | None, *, first_rotation: datetime | None = None
    ) -> ManagedKey:
        """Rotate key ``name`` every ``period`` (1 to 36,500 days, whole seconds), first at
        ``first_rotation`` (default: now + period); ``period`` None clears the schedule."""
        request = admin_pb2.SetRotationScheduleRequest(name=name)
        if period is not None:
            request.period_seconds = _whole_seconds(period, "period")
            if request.period_seconds == 0:
                raise InvalidArgumentError("a rotation period must be positive; pass None to clear it")
            if first_rotation is not None:
                if first_rotation.tzinfo is None:
                    raise InvalidArgumentError("first_rotation must carry a time zone")
                request.first_rotation_time.FromDatetime(first_rotation)
        elif first_rotation is not None:
            raise InvalidArgumentError("first_rotation needs a period")
        return managed_key(self._kms._unary(self._stub.SetRotationSchedule, request))

    def list_transitions(self, name: str) -> list[KeyTransitionInfo]:
        """The lifecycle events of key ``name`` (``keys/ID``) or of one version, oldest first."""
        response = self._kms._unary(
            self._stub.ListKeyTransitions, admin_pb2.ListKeyTransitionsRequest(name=name)
        )
        return [key_transition(message) for message in response.transitions]

    # -- plumbing --------------------------------------------------------------------------------------

    def _set_state(
        self, name: str, state: common_pb2.KeyVersionState.ValueType, new_primary: str | None
    ) -> ManagedKey:
        request = admin_pb2.UpdateKeyVersionStateRequest(
            name=name, state=state, new_primary_version=new_primary or ""
        )
        return managed_key(self._kms._unary(self._stub.UpdateKeyVersionState, request))

    def _once(self, rpc: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request) -> _Response:
        try:
            return rpc(request, timeout=self._kms._timeout)
        except grpc.RpcError as error:
            raise _wire.translate(error) from error


def _whole_seconds(value: timedelta, what: str) -> int:
    if value < timedelta(0) or value % timedelta(seconds=1):
        raise InvalidArgumentError(f"{what} must be a whole, non-negative number of seconds; got {value}")
    return int(value.total_seconds())


# -- wire conversions ------------------------------------------------------------------------------------

_PURPOSE_NAMES: dict[int, str] = {number: name for name, number in PURPOSES.items()}
_EVENTS: dict[int, TransitionEvent] = {
    admin_pb2.KEY_TRANSITION_CREATED: TransitionEvent.CREATED,
    admin_pb2.KEY_TRANSITION_ENABLED: TransitionEvent.ENABLED,
    admin_pb2.KEY_TRANSITION_DISABLED: TransitionEvent.DISABLED,
    admin_pb2.KEY_TRANSITION_DESTROY_SCHEDULED: TransitionEvent.DESTROY_SCHEDULED,
    admin_pb2.KEY_TRANSITION_DESTROY_CANCELLED: TransitionEvent.DESTROY_CANCELLED,
    admin_pb2.KEY_TRANSITION_DESTROYED: TransitionEvent.DESTROYED,
    admin_pb2.KEY_TRANSITION_MADE_PRIMARY: TransitionEvent.MADE_PRIMARY,
}


def _state(value: int) -> KeyVersionState:
    return _wire._STATES.get(value, KeyVersionState.UNSPECIFIED)


_time = _wire._timestamp


def managed_key(message: admin_pb2.ManagedKey) -> ManagedKey:
    key: keys_pb2.Key = message.key
    destroy_times = {
        entry.key_version: _time(entry, "destroy_time") for entry in message.scheduled_destructions
    }
    is_sbv2 = key.purpose == common_pb2.SECURE_BOOT_V2 and key.sbv2_slot >= 0
    return ManagedKey(
        name=key.name,
        product=key.product,
        purpose=_PURPOSE_NAMES.get(key.purpose, "unspecified"),
        algorithm=key.algorithm_name,
        sbv2_slot=key.sbv2_slot if is_sbv2 else None,
        primary_version=key.primary_version,
        versions=tuple(
            ManagedKeyVersion(
                name=version.name,
                state=_state(version.state),
                create_time=_time(version, "create_time"),
                destroy_time=destroy_times.get(version.name),
            )
            for version in key.versions
        ),
        rotation_period=(
            timedelta(seconds=message.rotation_period_seconds) if message.rotation_period_seconds else None
        ),
        next_rotation_time=_time(message, "next_rotation_time"),
    )


def key_transition(message: admin_pb2.KeyTransition) -> KeyTransitionInfo:
    return KeyTransitionInfo(
        key_version=message.key_version,
        event=_EVENTS.get(message.event, TransitionEvent.UNSPECIFIED),
        from_state=None
        if message.from_state == common_pb2.KEY_VERSION_STATE_UNSPECIFIED
        else _state(message.from_state),
        to_state=_state(message.to_state),
        actor=message.actor,
        time=_time(message, "time"),
        destroy_time=_time(message, "destroy_time"),
    )
