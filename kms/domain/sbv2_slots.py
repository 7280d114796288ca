"""Secure Boot V2 key slots of a product: which key sits in which slot, and revoking a slot for good.

The device side
---------------
An ESP chip with Secure Boot V2 holds up to three key digests in eFuse (``SECURE_BOOT_DIGEST0..2``); each is
the SHA-256 of the public-key part of a signature block (``kms.domain.sbv2.key_digest``). The bootloader,
and an app checking an OTA image, accept an image if one of its signature blocks carries a key whose digest
is burned in a slot that is not revoked, and a valid signature: any block may match any trusted slot, so the
blocks of a sector need not sit at their slot's position. Burning ``KEY_REVOKEn`` (one eFuse bit, which can
never be cleared) makes the device distrust slot ``n`` for the rest of its life. A device must therefore run
an app that no longer depends on slot ``n`` before it burns the bit; ESP-IDF's "conservative" revocation
does exactly that once such an app has booted (``esp_ota_revoke_secure_boot_public_key``).

The service side
----------------
Each slot of a product holds at most one key of purpose ``secure-boot-v2`` (``Key.sbv2_slot``; a key keeps
its slot for its life, and keys are never deleted). The key's primary version is the one that signs, and
the one whose digest devices must hold. A slot is

- ``EMPTY``: no key in it;
- ``ACTIVE``: a key, not revoked: every release carries a signature block by its primary version;
- ``REVOKED``: nothing is signed with the slot's key any more, by any of its versions, present or future.

Revoking a slot (an act under dual control: ``kms.domain.approvals``, ``Action.REVOKE_SBV2_SLOT``) records
who executed it, when, and under which approval request. From then on ``SignImage`` signs with the remaining
ACTIVE slots only, so the next release (the one devices need in order to burn ``KEY_REVOKEn``) carries no
block of the revoked key, and ``SignDigest`` with that key is refused. Exactly:

- releases: no release committed after the revocation carries a block of the revoked slot's key. The check
  runs in the transaction that commits the release (``check_release_keys``), so it holds whatever any
  signing process had read before;
- ``SignDigest``: in the process that executed the revocation, every call that starts after the revocation
  returned is refused; in other processes, every call that starts more than 1 s after it committed (the
  TTL of their cache of revoked slots, ``kms.service.signing.RevokedSlotCache``). A call already past the
  check when the revocation commits may still finish, with its key use recorded as any other.

Revocation is permanent, like the eFuse bit
-------------------------------------------
There is no "unrevoke". The service cannot know which devices have burned ``KEY_REVOKEn``; signing with the
slot again would produce releases those devices refuse, and would put back into service a key that
officers retired on purpose (often because it is suspected compromised). Rotating or re-enabling a version
of the revoked key does not bring the slot back either: revocation is of the slot, whatever version its key
has. A new key cannot take the slot (the revoked key keeps it), which matches the devices: they could not
trust a new digest in that slot either.

The rules (``check_revocable``, ``revoke``):

- the slot number is 0, 1 or 2 (``InvalidArgument``);
- an EMPTY slot has nothing to revoke, and a REVOKED slot is revoked already (``FailedPrecondition``);
- the last ACTIVE slot cannot be revoked (``FailedPrecondition``): devices that burned its revocation would
  trust no key at all, and the service could sign nothing they boot.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from kms.domain import sbv2
from kms.domain.errors import FailedPrecondition, InvalidArgument
from kms.domain.keys import Key, KeyName, KeyPurpose, KeyVersion, KeyVersionState, validate_product

SLOTS = (0, 1, 2)
"""The slot numbers, as the eFuse names them (``SECURE_BOOT_DIGEST0..2``, ``KEY_REVOKE0..2``)."""

_TARGET = re.compile(r"products/(?P<product>[^/]+)/sbv2-slots/(?P<slot>[0-9])")


class SlotState(enum.Enum):
    EMPTY = "empty"
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass(frozen=True)
class SlotRevocation:
    """The record of a revoked slot: its key at the time, and who executed which approved request, when."""

    product: str
    slot: int
    key_id: str
    revoked_at: datetime
    revoked_by: str
    approval_id: str


@dataclass(frozen=True)
class SecureBootSlot:
    """One slot of a product, with the key in it (if any) and its revocation (if revoked)."""

    product: str
    slot: int
    key: Key | None
    revocation: SlotRevocation | None = None

    @property
    def state(self) -> SlotState:
        if self.revocation is not None:
            return SlotState.REVOKED
        return SlotState.EMPTY if self.key is None else SlotState.ACTIVE

    @property
    def target(self) -> str:
        """The slot's name in approval requests: ``products/P/sbv2-slots/N``."""
        return slot_target(self.product, self.slot)

    @property
    def primary(self) -> KeyVersion | None:
        """The key's primary version: the one that signs (while ACTIVE) and whose digest devices hold."""
        return None if self.key is None else self.key.version()

    @property
    def versions(self) -> tuple[KeyVersion, ...]:
        """The key's versions that are not destroyed, oldest first."""
        if self.key is None:
            return ()
        return tuple(v for v in self.key.versions if v.state is not KeyVersionState.DESTROYED)

    @property
    def efuse_digest(self) -> bytes:
        """The primary version's digest, to burn into ``SECURE_BOOT_DIGEST{slot}`` (empty: empty slot)."""
        primary = self.primary
        return b"" if primary is None else efuse_digest(primary)


def efuse_digest(version: KeyVersion) -> bytes:
    """The 32-byte eFuse key digest of a key version (``espsecure digest-sbv2-public-key`` byte for byte)."""
    return sbv2.key_digest(version.algorithm, version.public_key_der)


def check_slot(slot: int) -> int:
    """``slot`` if it is 0, 1 or 2; ``InvalidArgument`` otherwise."""
    if slot not in SLOTS:
        raise InvalidArgument(f"Secure Boot V2 slot {slot} does not exist: slots are 0, 1 and 2")
    return slot


def slot_target(product: str, slot: int) -> str:
    """The name of a slot in approval requests and audit records: ``products/P/sbv2-slots/N``."""
    return f"products/{validate_product(product)}/sbv2-slots/{check_slot(slot)}"


def parse_slot_target(target: str) -> tuple[str, int]:
    """The (product, slot) a ``products/P/sbv2-slots/N`` name designates; ``InvalidArgument`` if malformed."""
    match = _TARGET.fullmatch(target)
    if match is None:
        raise InvalidArgument(f"malformed slot name {target!r}: expected 'products/PRODUCT/sbv2-slots/N'")
    return validate_product(match["product"]), check_slot(int(match["slot"]))


def product_slots(
    product: str, keys: Sequence[Key], revocations: Sequence[SlotRevocation]
) -> tuple[SecureBootSlot, ...]:
    """The product's three slots, slot 0 first, from its keys (others are ignored) and its revocations."""
    by_slot: dict[int, Key] = {}
    for key in keys:
        if key.product == product and key.purpose is KeyPurpose.SECURE_BOOT_V2 and key.sbv2_slot is not None:
            by_slot[key.sbv2_slot] = key
    revoked = {r.slot: r for r in revocations if r.product == product}
    return tuple(SecureBootSlot(product, n, by_slot.get(n), revoked.get(n)) for n in SLOTS)


def check_revocable(slots: Sequence[SecureBootSlot], slot: int) -> SecureBootSlot:
    """The slot to revoke, if the rules allow it (see the module docstring); raises otherwise."""
    check_slot(slot)
    wanted = slots[slot]
    if wanted.state is SlotState.EMPTY:
        raise FailedPrecondition(
            f"Secure Boot V2 slot {slot} of product {wanted.product!r} is empty: there is no key to revoke"
        )
    if wanted.revocation is not None:
        done = wanted.revocation
        raise FailedPrecondition(
            f"Secure Boot V2 slot {slot} of product {wanted.product!r} was revoked already, at "
            f"{done.revoked_at.isoformat()} by {done.revoked_by} (approvals/{done.approval_id}); "
            "a revocation is permanent"
        )
    others = [s.slot for s in slots if s.state is SlotState.ACTIVE and s.slot != slot]
    if not others:
        raise FailedPrecondition(
            f"Secure Boot V2 slot {slot} is the last active slot of product {wanted.product!r}: devices that "
            "burn its revocation would trust no key and boot nothing; create a key in another slot first, "
            "release firmware signed with it, then revoke this slot"
        )
    return wanted


def revoke(
    slots: Sequence[SecureBootSlot], slot: int, officer: str, approval_id: str, at: datetime
) -> SlotRevocation:
    """The record of revoking ``slot`` (``check_revocable`` first) by ``officer`` under ``approval_id``."""
    wanted = check_revocable(slots, slot)
    assert wanted.key is not None  # an ACTIVE slot has a key
    if not approval_id:
        raise InvalidArgument("a slot revocation is executed under an approval request; its id is missing")
    return SlotRevocation(wanted.product, slot, wanted.key.key_id, at, officer, approval_id)


def signing_keys(keys: Sequence[Key], revoked: Collection[int]) -> list[Key]:
    """The Secure Boot V2 keys that sign a product's releases: those of ACTIVE slots, in slot order."""
    return sorted(
        (k for k in keys if k.sbv2_slot is not None and k.sbv2_slot not in revoked),
        key=lambda k: k.sbv2_slot or 0,
    )


def check_not_revoked(key: Key, revoked: Collection[int]) -> None:
    """Refuse (``FailedPrecondition``) any use of a Secure Boot V2 key whose slot is revoked."""
    if key.purpose is KeyPurpose.SECURE_BOOT_V2 and key.sbv2_slot in revoked:
        raise FailedPrecondition(
            f"key {key.name} sits in Secure Boot V2 slot {key.sbv2_slot} of product {key.product!r}, which "
            "is revoked: nothing is signed with a revoked slot's key, by any of its versions"
        )


def check_release_keys(key_versions: Collection[str], revoked_key_ids: Collection[str]) -> None:
    """Refuse (``FailedPrecondition``) a release signed by a version of a revoked slot's key.

    The last guard, run inside the transaction that records a release: a signing call that read the slots
    before a revocation committed (the cache, or a race) cannot record a release carrying the revoked block.
    The signatures the HSM made for the refused release are still recorded as key uses, through the
    signature log (``kms.service.signing``).
    """
    for name in key_versions:
        key_id = KeyName.parse(name).key_id
        if key_id in revoked_key_ids:
            raise FailedPrecondition(
                f"the Secure Boot V2 slot of key {key_id} was revoked while this image was being signed; "
                "no release was recorded: sign the image again (it will carry the remaining slots only)"
            )


class SlotRevocationRepository(Protocol):
    """Where slot revocations live (``kms.store.sbv2_slots``)."""

    def revoked_slots(self, product: str) -> frozenset[int]:
        """The product's revoked slot numbers (one cheap read: the signing path asks for it)."""
        ...

    def list(self, product: str) -> list[SlotRevocation]:
        """The product's revocations, slot 0 first."""
        ...

    def revoke(
        self, product: str, decide: Callable[[Sequence[SlotRevocation]], SlotRevocation]
    ) -> SlotRevocation:
        """In ONE transaction: read the product's revocations, call ``decide`` with them (a rule of this
        module, which raises to refuse), and store the revocation it returns. Concurrent revocations of one
        product are serialized, so two of them cannot together revoke the last active slot."""
        ...
