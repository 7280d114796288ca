"""OTA manifest key rollover for devices: the statements from the key a device trusts to the current one.

Statements are made when a manifest key is rotated (``kms.service.lifecycle``) and stored with the version
they introduce; this use case only reads them. A distribution server asks with the key id its device trusts
(from the device's report, or the FKSP header of the last payload it accepted) and forwards the statements,
oldest first; the device checks each against the key it trusts at that step (``kmsctl.device.rollover``).
The product's scope is checked (``require_product``) before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from kms.domain import rollover
from kms.domain.errors import NotFound
from kms.domain.identity import Caller
from kms.domain.keys import Key, KeyPurpose, KeyVersion, validate_product
from kms.domain.policy import require_product
from kms.domain.ports import KeyRepository, RolloverRepository
from kms.domain.rollover import ManifestKeyRollover


@dataclass(frozen=True)
class RolloverChain:
    """The statements a device applies in order (``statements``) to trust ``current``, the product's
    manifest key version that signs payloads now, with ``current_key_id``."""

    key: Key
    statements: tuple[ManifestKeyRollover, ...]
    current: KeyVersion

    @property
    def current_key_id(self) -> bytes:
        return rollover.key_id(self.current.public_key_der)


class ManifestKeyRollovers:
    def __init__(self, keys: KeyRepository, rollovers: RolloverRepository) -> None:
        self._keys = keys
        self._rollovers = rollovers

    def chain(self, caller: Caller, product: str, trusted_key_id: bytes) -> RolloverChain:
        """The statements moving a device of ``product`` that trusts ``trusted_key_id`` to the current key.

        ``NotFound`` if the product has no manifest key or none of its versions has that key id;
        ``FailedPrecondition`` naming the gap when no chain leads there (``rollover.rollover_chain``).
        """
        validate_product(product)
        require_product(caller, product)
        key = next((k for k in self._keys.list_keys(product) if k.purpose is KeyPurpose.OTA_MANIFEST), None)
        if key is None:
            raise NotFound(f"product {product!r} has no {KeyPurpose.OTA_MANIFEST.value} key")
        statements = rollover.rollover_chain(key, self._rollovers.list_rollovers(key.key_id), trusted_key_id)
        return RolloverChain(key, tuple(statements), key.version())
