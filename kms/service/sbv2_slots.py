"""``SecureBootSlots``: use cases of a product's Secure Boot V2 slots (rules in ``kms.domain.sbv2_slots``).

- ``list``: the three slots with their keys, digests and revocations (officers and auditors);
- ``check_revocable``: what an officer's revocation request is checked against before it is recorded;
- ``revoke``: the approved act, run once by ``DualControl.execute`` as the executing officer.

Every use case is bound to the product's scope (``require_product``) of the caller: the requesting officer
when a request is made, the executing officer when it is executed. Approvers vote through
``kms.service.approvals.DualControl``, which checks their scope too (``DualControl.approve`` and ``reject``
refuse an officer whose scope does not include the request's product), so every officer who requests,
approves or executes a revocation has the product in scope.

After a revocation the ``changed`` callback (``SigningService.slots_changed``) drops the signing path's cached
view of the product's slots, so the next signing call in this process already leaves the slot out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from kms.domain import sbv2_slots
from kms.domain.errors import FailedPrecondition, NotFound
from kms.domain.identity import Caller
from kms.domain.keys import Key, validate_product
from kms.domain.policy import require_product
from kms.domain.ports import KeyRepository
from kms.domain.sbv2_slots import SecureBootSlot, SlotRevocation, SlotRevocationRepository


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _nothing_changed(product: str) -> None:
    """The default ``changed`` callback: nothing caches slots."""


class SecureBootSlots:
    def __init__(
        self,
        keys: KeyRepository,
        revocations: SlotRevocationRepository,
        *,
        changed: Callable[[str], None] = _nothing_changed,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._keys = keys
        self._revocations = revocations
        self._changed = changed
        self._clock = clock

    def _product_keys(self, caller: Caller, product: str) -> list[Key]:
        validate_product(product)
        require_product(caller, product)
        keys = self._keys.list_keys(product)
        if not keys:
            raise NotFound(f"product {product!r} has no keys")
        return keys

    def list(self, caller: Caller, product: str) -> tuple[SecureBootSlot, ...]:
        """The product's three slots, slot 0 first. ``NotFound`` for a product without any key."""
        keys = self._product_keys(caller, product)
        return sbv2_slots.product_slots(product, keys, self._revocations.list(product))

    def check_revocable(self, caller: Caller, product: str, slot: int) -> SecureBootSlot:
        """The slot, if the rules allow its revocation now (checked again at execution)."""
        validate_product(product)
        sbv2_slots.check_slot(slot)
        return sbv2_slots.check_revocable(self.list(caller, product), slot)

    def revoke(
        self, caller: Caller, product: str, slot: int, approval_id: str, approved_key: str | None = None
    ) -> SecureBootSlot:
        """Revoke ``slot`` for good as ``caller``, under the approval request ``approval_id``.

        ``approved_key`` (``keys/K``), when given, is the key the approvers saw in the slot; the act is
        refused if the slot holds another key now.
        """
        validate_product(product)
        sbv2_slots.check_slot(slot)
        keys = self._product_keys(caller, product)
        current = sbv2_slots.product_slots(product, keys, ())[slot].key
        if approved_key is not None and (current is None or current.name != approved_key):
            holds = "no key" if current is None else f"key {current.name}"
            raise FailedPrecondition(
                f"Secure Boot V2 slot {slot} of product {product!r} holds {holds}, not {approved_key} as "
                "when the revocation was approved; request it again"
            )
        now = self._clock()

        def decide(revocations: Sequence[SlotRevocation]) -> SlotRevocation:
            slots = sbv2_slots.product_slots(product, keys, revocations)
            return sbv2_slots.revoke(slots, slot, caller.identity, approval_id, now)

        revocation = self._revocations.revoke(product, decide)
        self._changed(product)
        return SecureBootSlot(product, slot, current, revocation)
