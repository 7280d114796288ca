"""Key administration: create keys (rotation and states are ``kms.service.lifecycle``'s).

``PRODUCT_KEY_SET`` is what a product needs for the factory and distribution paths besides its Secure Boot
V2 keys: an OTA manifest key, a KEK, a registration transport key and a payload-seed key.

``create_key_for`` and ``create_product_set_for`` are what an officer's RPC calls: they refuse a product
outside the caller's scope (``require_product``) before anything is generated. ``create_key`` and
``create_product_set`` are unscoped, for the operator's local ``kms keys`` commands (which hold the HSM PIN
and the database, not a client certificate) and for the service's own keys (the audit key).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from kms.domain.errors import AlreadyExists, InvalidArgument, NotFound
from kms.domain.identity import Caller
from kms.domain.keys import (
    KEY_ID_PATTERN,
    Algorithm,
    Key,
    KeyPurpose,
    KeyVersion,
    KeyVersionState,
    validate_product,
)
from kms.domain.policy import require_product
from kms.domain.ports import Hsm, KeyRepository

SBV2_SLOTS = (0, 1, 2)
SECRET_KEY_ALGORITHMS = frozenset({Algorithm.AES_256, Algorithm.HMAC_SHA256})
SINGLE_KEY_PURPOSES = frozenset(
    {
        KeyPurpose.OTA_MANIFEST,
        KeyPurpose.KEY_ENCRYPTION,
        KeyPurpose.REGISTRATION_TRANSPORT,
        KeyPurpose.PAYLOAD_SEED,
        KeyPurpose.AUDIT_CHECKPOINT,
    }
)
"""Purposes with one key per product (new material comes as new versions of it)."""


PRODUCT_KEY_SET = (
    ("manifest", KeyPurpose.OTA_MANIFEST, Algorithm.ECDSA_P256_SHA256),
    ("kek", KeyPurpose.KEY_ENCRYPTION, Algorithm.AES_256),
    ("registration", KeyPurpose.REGISTRATION_TRANSPORT, Algorithm.RSA_3072_OAEP_SHA256),
    ("payload-seed", KeyPurpose.PAYLOAD_SEED, Algorithm.HMAC_SHA256),
)
"""(key id suffix, purpose, algorithm) of the keys a product needs for the factory and distribution paths."""


class KeyAdministration:
    def __init__(
        self, hsm: Hsm, keys: KeyRepository, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ):
        self._hsm = hsm
        self._keys = keys
        self._clock = clock

    def create_key(
        self, key_id: str, product: str, purpose: KeyPurpose, algorithm: Algorithm, sbv2_slot: int | None
    ) -> Key:
        """Generate version 1 inside the HSM and record the key. Nothing is left behind on failure."""
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise InvalidArgument(
                f"malformed key id {key_id!r}: use 1-63 lowercase letters, digits and dashes"
            )
        validate_product(product)
        if purpose is KeyPurpose.SECURE_BOOT_V2:
            if sbv2_slot not in SBV2_SLOTS:
                raise InvalidArgument("a Secure Boot V2 key needs a signature-block slot: 0, 1 or 2")
            taken = {k.sbv2_slot for k in self._keys.sbv2_keys(product)}
            if sbv2_slot in taken:
                raise AlreadyExists(
                    f"product {product!r} already has a Secure Boot V2 key in slot {sbv2_slot}"
                )
        elif sbv2_slot is not None:
            raise InvalidArgument("only Secure Boot V2 keys have a slot")
        if algorithm not in purpose.algorithms:
            allowed = ", ".join(sorted(a.value for a in purpose.algorithms))
            raise InvalidArgument(f"a {purpose.value} key must be one of: {allowed}; got {algorithm.value}")
        if purpose in SINGLE_KEY_PURPOSES and any(
            k.purpose is purpose for k in self._keys.list_keys(product)
        ):
            raise AlreadyExists(
                f"product {product!r} already has a {purpose.value} key; rotate it (new version) instead"
            )
        try:
            self._keys.get_key(key_id)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"key keys/{key_id} already exists")

        label = f"{key_id}/1"
        if algorithm in SECRET_KEY_ALGORITHMS:
            hsm_id, public_der = self._hsm.generate_secret_key(algorithm, label), b""
        else:
            pair = self._hsm.generate_key_pair(algorithm, label)
            hsm_id, public_der = pair.hsm_id, pair.public_key_der
        now = self._clock()
        version = KeyVersion(key_id, 1, algorithm, KeyVersionState.ENABLED, hsm_id, public_der, now)
        key = Key(key_id, product, purpose, algorithm, sbv2_slot, 1, (version,), now)
        try:
            self._keys.add_key(key)
        except BaseException:
            self._hsm.destroy_key_pair(hsm_id)
            raise
        return key

    def create_key_for(
        self,
        caller: Caller,
        key_id: str,
        product: str,
        purpose: KeyPurpose,
        algorithm: Algorithm,
        sbv2_slot: int | None,
    ) -> Key:
        """``create_key``, if ``product`` is in ``caller``'s scope."""
        require_product(caller, validate_product(product))
        return self.create_key(key_id, product, purpose, algorithm, sbv2_slot)

    def create_product_set_for(self, caller: Caller, product: str) -> tuple[list[Key], list[Key]]:
        """``create_product_set``, if ``product`` is in ``caller``'s scope."""
        require_product(caller, validate_product(product))
        return self.create_product_set(product)

    def create_product_set(self, product: str) -> tuple[list[Key], list[Key]]:
        """Create the ``PRODUCT_KEY_SET`` keys ``product`` lacks; return (created, already there).

        A failure part-way leaves the keys created before it; calling again creates the rest.
        """
        validate_product(product)
        have = {key.purpose: key for key in self._keys.list_keys(product)}
        created = [
            self.create_key(f"{product}-{suffix}", product, purpose, algorithm, None)
            for suffix, purpose, algorithm in PRODUCT_KEY_SET
            if purpose not in have
        ]
        existing = [have[purpose] for _suffix, purpose, _algorithm in PRODUCT_KEY_SET if purpose in have]
        return created, existing
