"""The PKCS#11 adapter: private and secret keys in an HSM, reached through python-pkcs11.

- ``kms.hsm.uri``: PKCS#11 URIs (RFC 7512), parsed and formatted.
- ``kms.hsm.config``: ``HsmConfig`` (module, token, PIN source) and ``read_pin()``.
- ``kms.hsm.pkcs11_hsm``: ``Pkcs11Hsm``, the ``kms.domain.ports.Hsm`` port.
- ``kms.hsm._connection``: the one connection to the module: every PKCS#11 call in the process goes through
  one lock (its docstring says why), one login, reconnection after outages, the key-handle cache.
- ``kms.hsm._keys`` (templates, mechanisms, public key encoding), ``kms.hsm._objects`` (reading key
  objects), ``kms.hsm.secret_keys`` (KEKs, device secrets, HMAC keys).

Importing this package loads no PKCS#11 library; ``Pkcs11Hsm.open()`` does.
"""

from kms.hsm.config import HsmConfig, PinEnv, PinFile, PinSource, PinValue, parse_pin_source, read_pin
from kms.hsm.pkcs11_hsm import KeyProtection, Pkcs11Hsm
from kms.hsm.uri import ObjectType, Pkcs11Uri, parse_pkcs11_uri

__all__ = [
    "HsmConfig",
    "KeyProtection",
    "ObjectType",
    "PinEnv",
    "PinFile",
    "PinSource",
    "PinValue",
    "Pkcs11Hsm",
    "Pkcs11Uri",
    "parse_pin_source",
    "parse_pkcs11_uri",
    "read_pin",
]
