"""``RollbackFloors``: reading a product's anti-rollback floor, and lowering it once officers approved.

The floor rises by itself when a release is signed (``kms.store.releases``); the only way down is an approval
request (``ApprovalService.RequestFloorLowering``) that M other officers approve and one executes. The rules
are in ``kms.domain.releases``: ``check_lowering`` when the request is made (the product has a floor and the
new one is below it), and ``check_floor_unmoved`` again at execution, inside the store's transaction, against
the floor the request saw. Every call is scoped to the product (``require_product``).

A product the service has no key for is unknown: reading its floor is ``NotFound`` (as listing its Secure
Boot V2 slots is), not an empty floor that would read as "nothing signed yet" for a misspelt name.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from kms.domain.errors import NotFound
from kms.domain.identity import Caller
from kms.domain.keys import validate_product
from kms.domain.policy import require_product
from kms.domain.ports import KeyRepository
from kms.domain.releases import FloorLowering, FloorRepository, RollbackFloor, check_lowering


class RollbackFloors:
    def __init__(
        self,
        floors: FloorRepository,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        *,
        keys: KeyRepository | None = None,
    ) -> None:
        """``keys`` tells known products from unknown ones (the server passes its key repository); without
        it, every well-formed product name has a floor, empty until a release is signed."""
        self._floors = floors
        self._clock = clock
        self._keys = keys

    def get(self, caller: Caller, product: str) -> RollbackFloor:
        """The product's floor; ``NotFound`` if the product has no key at all."""
        validate_product(product)
        require_product(caller, product)
        if self._keys is not None and not self._keys.list_keys(product):
            raise NotFound(f"product {product!r} has no keys")
        return self._floors.rollback_floor(product)

    def check_lowering(self, caller: Caller, product: str, secure_version: int) -> int:
        """The current floor, if an officer may request lowering it to ``secure_version`` now."""
        floor = self.get(caller, product)
        return check_lowering(product, floor.secure_version, secure_version)

    def lower(
        self, caller: Caller, product: str, expected: int, secure_version: int, request_id: str
    ) -> RollbackFloor:
        """Lower the floor from ``expected`` (the floor the approved request saw) to ``secure_version``."""
        validate_product(product)
        require_product(caller, product)
        return self._floors.lower_floor(
            FloorLowering(product, expected, secure_version, caller.identity, request_id, self._clock())
        )
