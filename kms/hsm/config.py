"""How the service reaches its HSM: which PKCS#11 module, which token, and where the PIN comes from.

An ``HsmConfig`` is usually built from one PKCS#11 URI (RFC 7512, see ``kms.hsm.uri``)::

    pkcs11:token=kms-dev?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/var/lib/kms/hsm-pin

or from explicit fields. The module is given by absolute path (``module-path``); ``module-name`` is
refused, so the library loaded is exactly the one configured and never one found on a search path. The
token is selected by ``token`` (label) and/or ``serial``, optionally narrowed by ``manufacturer``,
``model`` and ``slot-id``; exactly one initialized token must match. The URI names a token, not an
object: ``object``, ``id`` and ``type`` are refused, and so are the library and slot attributes.

Where the PIN comes from (``pin-source``):

- ``file:/absolute/path`` (also ``file:///absolute/path`` or a bare ``/absolute/path``): a regular file
  holding the PIN, one trailing newline ignored. It must be accessible by its owner only (mode 0600 or
  0400); a file the group or others may read or write is refused. The path is taken literally (no second
  percent-decoding). A relative path (``file:hsm-pin``) is accepted only when the caller says what it is
  relative to (``relative_to``, e.g. the configuration file's directory).
- ``env:VARIABLE``: an environment variable. This is our extension of RFC 7512, for platforms that hand
  secrets to containers as environment variables.
- ``pin-value=...`` in the URI itself: accepted only when the caller passes ``allow_pin_value=True``, and
  discouraged: the PIN then sits in configuration files, shell history and process listings.

There is no way to give the PIN as a command-line argument: every local user can read command lines.
The PIN is read by ``read_pin()`` when a session is opened (and again when it is reopened after an HSM
outage); ``HsmConfig`` holds where it comes from, never the PIN itself (except a ``pin-value``).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kms.domain.errors import InvalidArgument
from kms.hsm.uri import Pkcs11Uri, parse_pkcs11_uri

PIN_FILE_MAX_BYTES = 1024
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class PinFile:
    """The PIN is in this file (owner-only permissions required)."""

    path: Path


@dataclass(frozen=True)
class PinEnv:
    """The PIN is in this environment variable."""

    variable: str


@dataclass(frozen=True)
class PinValue:
    """The PIN itself, from a URI's ``pin-value`` (discouraged; see the module docstring)."""

    value: str = field(repr=False)


PinSource = PinFile | PinEnv | PinValue


def parse_pin_source(text: str, *, relative_to: Path | None = None) -> PinSource:
    """Parse a ``pin-source`` value: ``file:/path``, ``file:///path``, ``/path`` or ``env:NAME``.

    A relative file path (``file:hsm-pin``) is refused, unless ``relative_to`` (an absolute directory,
    such as the one holding the configuration file) is given to resolve it against.
    """
    if text.startswith("env:"):
        name = text[len("env:") :]
        if not _ENV_NAME.fullmatch(name):
            raise InvalidArgument("pin-source 'env:NAME' needs a valid environment variable name")
        return PinEnv(name)
    if text.startswith("|"):
        raise InvalidArgument("pin-source '|command' is not supported: give file:/path or env:NAME")
    path = text
    if path.startswith("file://"):
        path = path[len("file://") :]
        if not path.startswith("/"):
            raise InvalidArgument("pin-source file URI must be file:/path or file:///path (no host)")
    elif path.startswith("file:"):
        path = path[len("file:") :]
    if path.startswith("/"):
        return PinFile(Path(path))
    if relative_to is not None and relative_to.is_absolute() and path and ":" not in path.split("/")[0]:
        return PinFile(relative_to / path)
    raise InvalidArgument("pin-source must be file:/absolute/path or env:NAME")


@dataclass(frozen=True)
class HsmConfig:
    """A PKCS#11 module, a token on it, and where the user PIN comes from."""

    module_path: Path
    pin_source: PinSource
    token_label: str | None = None
    token_serial: str | None = None
    token_manufacturer: str | None = None
    token_model: str | None = None
    slot_id: int | None = None

    def __post_init__(self) -> None:
        if not self.module_path.is_absolute():
            raise InvalidArgument("the PKCS#11 module path must be absolute")
        if self.token_label is None and self.token_serial is None:
            raise InvalidArgument("the HSM configuration must name the token by label ('token') or 'serial'")

    @classmethod
    def from_uri(
        cls, uri: str | Pkcs11Uri, *, allow_pin_value: bool = False, relative_to: Path | None = None
    ) -> HsmConfig:
        """Build from a PKCS#11 URI.

        ``allow_pin_value`` lets ``pin-value`` through (discouraged); ``relative_to`` is the absolute
        directory a relative ``pin-source=file:...`` is resolved against (refused without it).
        """
        parsed = parse_pkcs11_uri(uri) if isinstance(uri, str) else uri
        _refuse_unsupported(parsed)
        if parsed.module_path is None:
            if parsed.module_name is not None:
                raise InvalidArgument(
                    "PKCS#11 URI attribute 'module-name' is not supported: give 'module-path' (absolute), "
                    "so that exactly the configured library is loaded"
                )
            raise InvalidArgument(
                "the PKCS#11 URI must name the module: add 'module-path=/path/to/module.so'"
            )
        pin_source: PinSource
        if parsed.pin_source is not None:
            pin_source = parse_pin_source(parsed.pin_source, relative_to=relative_to)
        elif parsed.pin_value is not None:
            if not allow_pin_value:
                raise InvalidArgument(
                    "PKCS#11 URI attribute 'pin-value' is refused: keep the PIN out of the configuration "
                    "with pin-source=file:/path (mode 0600) or pin-source=env:NAME"
                )
            pin_source = PinValue(parsed.pin_value)
        else:
            raise InvalidArgument(
                "the PKCS#11 URI must say where the PIN is: add pin-source=file:/path or pin-source=env:NAME"
            )
        return cls(
            module_path=Path(parsed.module_path),
            pin_source=pin_source,
            token_label=parsed.token_label,
            token_serial=parsed.token_serial,
            token_manufacturer=parsed.token_manufacturer,
            token_model=parsed.token_model,
            slot_id=parsed.slot_id,
        )

    def read_pin(self) -> str:
        """The user PIN, read now from its source (see ``read_pin``)."""
        return read_pin(self.pin_source)


def read_pin(source: PinSource) -> str:
    """Read the PIN from its source.

    Raises ``InvalidArgument`` if a PIN file is missing, is not a regular file, may be read or written by
    its group or others, is larger than ``PIN_FILE_MAX_BYTES``, is empty or spans several lines; or if
    the environment variable is unset or empty. Messages never contain the PIN or the file's path.
    """
    if isinstance(source, PinValue):
        pin = source.value
    elif isinstance(source, PinEnv):
        pin = os.environ.get(source.variable, "")
        if not pin:
            raise InvalidArgument(f"the PIN environment variable {source.variable} is not set or is empty")
    else:
        pin = _read_pin_file(source.path)
    if not pin:
        raise InvalidArgument("the HSM PIN is empty")
    return pin


def _read_pin_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise InvalidArgument("cannot open the PIN file named by pin-source") from e
    try:
        # Checked on the open descriptor, so the file checked is the file read.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument("the PIN file named by pin-source is not a regular file")
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise InvalidArgument(
                f"the PIN file named by pin-source has mode {mode:04o}, so its group or others may access "
                "it; restrict it to its owner (chmod 600)"
            )
        data = b""
        while len(data) <= PIN_FILE_MAX_BYTES:
            chunk = os.read(fd, PIN_FILE_MAX_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise InvalidArgument("cannot read the PIN file named by pin-source") from e
    finally:
        os.close(fd)
    if len(data) > PIN_FILE_MAX_BYTES:
        raise InvalidArgument(f"the PIN file named by pin-source is larger than {PIN_FILE_MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument("the PIN file named by pin-source is not UTF-8 text") from e
    text = text.removesuffix("\n").removesuffix("\r")
    if "\n" in text or "\r" in text:
        raise InvalidArgument("the PIN file named by pin-source must hold the PIN on a single line")
    return text


def _refuse_unsupported(uri: Pkcs11Uri) -> None:
    objects = {"object": uri.object_label, "id": uri.object_id, "type": uri.object_type}
    for name, value in objects.items():
        if value is not None:
            raise InvalidArgument(
                f"the HSM URI must name a token, not an object: remove {name!r} (the service manages keys)"
            )
    selectors = {
        "library-manufacturer": uri.library_manufacturer,
        "library-description": uri.library_description,
        "library-version": uri.library_version,
        "slot-description": uri.slot_description,
        "slot-manufacturer": uri.slot_manufacturer,
    }
    for name, selector in selectors.items():
        if selector is not None:
            raise InvalidArgument(
                f"PKCS#11 URI attribute {name!r} is not supported to select the token; "
                "use token, serial, manufacturer, model or slot-id"
            )
