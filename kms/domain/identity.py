"""Who is calling: the identity authenticated by the transport, its role, and the products it acts for."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.Enum):
    BUILD_SERVER = "build-server"
    DISTRIBUTION_SERVER = "distribution-server"
    FACTORY_REGISTRAR = "factory-registrar"
    SECURITY_OFFICER = "security-officer"
    AUDITOR = "auditor"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. ``identity`` is recorded with every key use (the certificate's URI SAN).

    ``products`` is the caller's product scope (``kms.domain.policy``): the products it may act for, or
    ``None`` for every product.
    """

    identity: str
    role: Role
    products: frozenset[str] | None = None

    def __str__(self) -> str:
        return self.identity
