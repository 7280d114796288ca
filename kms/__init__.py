"""Firmware KMS: the server.

Layers, each a folder:

- ``kms.domain``: plain Python (keys, images, signature formats, releases, the rules). No gRPC, SQLite or
  PKCS#11 import; I/O happens behind the small interfaces in ``kms.domain.ports``.
- ``kms.hsm``: the PKCS#11 adapter (python-pkcs11), every call serialized.
- ``kms.store``: SQLite (sqlite-utils) and the content-addressed release store on disk.
- ``kms.service``: use cases that combine the domain with the ports.
- ``kms.server``: gRPC servicers, authentication, configuration, the process entry point.

Nothing is loaded or opened at import time; ``kms.server.app`` composes everything in one place.
"""
