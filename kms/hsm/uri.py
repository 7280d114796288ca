"""PKCS#11 URIs (RFC 7512): parsing and formatting.

A PKCS#11 URI names a token (and optionally an object on it) and says how to reach it::

    pkcs11:token=kms-dev;serial=5143f6b72a09c3c7?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kms/hsm-pin

The *path* (before ``?``) holds ``;``-separated attributes that select a library, slot, token and object;
the *query* (after ``?``) holds ``&``-separated attributes that say which module to load and where the PIN
comes from. Values are percent-encoded UTF-8, except ``id``, which is raw bytes (``id=%01%02%FE``).

What this parser accepts:

- every attribute RFC 7512 defines: in the path ``token``, ``manufacturer``, ``serial``, ``model``,
  ``library-manufacturer``, ``library-description``, ``library-version`` (``M`` or ``M.N``),
  ``slot-description``, ``slot-manufacturer``, ``slot-id`` (decimal), ``object``, ``id``, ``type``
  (``public``, ``private``, ``cert``, ``secret-key``, ``data``); in the query ``module-name``,
  ``module-path`` (absolute), ``pin-source`` and ``pin-value``;
- characters a component admits unencoded (RFC 7512 section 2.3): ``&`` in the path, ``/ ? |`` in the
  query, ``: [ ] @ ! $ ' ( ) * + , =`` in both; anything else must be percent-encoded.

What it refuses, with ``InvalidArgument``: another scheme, a fragment, an attribute it does not know
(including vendor-specific ones: this service would silently ignore them otherwise), an attribute given
twice, both ``pin-source`` and ``pin-value``, malformed escapes or UTF-8, an empty attribute between
separators, a relative ``module-path``. Error messages name attributes and positions, never values, so a
PIN in ``pin-value`` cannot leak through them.

This module only parses. What the service does with a URI (which attributes select its token, which PIN
sources it accepts) is decided in ``kms.hsm.config``.
"""

from __future__ import annotations

import enum
import re
import string
from dataclasses import dataclass, field

from kms.domain.errors import InvalidArgument

SCHEME = "pkcs11:"

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_RES_AVAIL = frozenset(":[]@!$'()*+,=")
_PATH_CHARS = _UNRESERVED | _RES_AVAIL | {"&"}
_QUERY_CHARS = _UNRESERVED | _RES_AVAIL | {"/", "?", "|"}
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_VERSION = re.compile(r"([0-9]{1,3})(?:\.([0-9]{1,3}))?")
_HEX = frozenset(string.hexdigits)
_MAX_SLOT_ID = 2**64 - 1  # CK_SLOT_ID is a CK_ULONG


class ObjectType(enum.Enum):
    """The ``type`` path attribute: a PKCS#11 object class."""

    PUBLIC = "public"
    PRIVATE = "private"
    CERT = "cert"
    SECRET_KEY = "secret-key"  # noqa: S105 (an object class, not a secret)
    DATA = "data"


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed PKCS#11 URI. ``None`` means the attribute is absent (``""`` means present and empty).

    ``pin_value`` is kept out of ``repr()`` and out of ``format()``.
    """

    # Path: token
    token_label: str | None = None  # token
    token_manufacturer: str | None = None  # manufacturer
    token_serial: str | None = None  # serial
    token_model: str | None = None  # model
    # Path: library
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: tuple[int, int] | None = None
    # Path: slot
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    slot_id: int | None = None
    # Path: object
    object_label: str | None = None  # object
    object_id: bytes | None = None  # id
    object_type: ObjectType | None = None  # type
    # Query
    module_name: str | None = None
    module_path: str | None = None
    pin_source: str | None = None
    pin_value: str | None = field(default=None, repr=False)

    def format(self) -> str:
        """The URI as text, attributes in a fixed order; ``pin-value`` is never written out."""
        path = []
        for name, attr in _PATH_ATTRIBUTES.items():
            value = getattr(self, attr)
            if value is None:
                continue
            if isinstance(value, bytes):
                text = "".join(f"%{byte:02X}" for byte in value)
            elif isinstance(value, ObjectType):
                text = value.value
            elif isinstance(value, tuple):
                text = f"{value[0]}.{value[1]}"
            else:
                text = _encode(str(value), _PATH_CHARS)
            path.append(f"{name}={text}")
        query = [
            f"{name}={_encode(getattr(self, attr), _QUERY_CHARS)}"
            for name, attr in _QUERY_ATTRIBUTES.items()
            if attr != "pin_value" and getattr(self, attr) is not None
        ]
        return SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")


# URI attribute name -> Pkcs11Uri field name.
_PATH_ATTRIBUTES = {
    "token": "token_label",
    "manufacturer": "token_manufacturer",
    "serial": "token_serial",
    "model": "token_model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "library-version": "library_version",
    "slot-description": "slot_description",
    "slot-manufacturer": "slot_manufacturer",
    "slot-id": "slot_id",
    "object": "object_label",
    "id": "object_id",
    "type": "object_type",
}
_QUERY_ATTRIBUTES = {
    "module-name": "module_name",
    "module-path": "module_path",
    "pin-source": "pin_source",
    "pin-value": "pin_value",
}


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """Parse a PKCS#11 URI; raise ``InvalidArgument`` saying what is wrong and where."""
    if text[: len(SCHEME)].lower() != SCHEME:
        raise InvalidArgument("not a PKCS#11 URI: it must start with 'pkcs11:'")
    if "#" in text:
        raise InvalidArgument("a PKCS#11 URI has no fragment: '#' must be percent-encoded as %23")
    rest = text[len(SCHEME) :]
    path, has_query, query = rest.partition("?")
    values: dict[str, object] = {}
    offset = len(SCHEME)
    for name, raw in _attributes(path, ";", _PATH_CHARS, offset, "path"):
        _put(values, _PATH_ATTRIBUTES[name], name, _path_value(name, raw))
    if has_query:
        offset += len(path) + 1
        for name, raw in _attributes(query, "&", _QUERY_CHARS, offset, "query"):
            _put(values, _QUERY_ATTRIBUTES[name], name, _text(name, raw))
    uri = Pkcs11Uri(**values)  # type: ignore[arg-type]  # values are typed per attribute by _path_value
    _check_query(uri)
    return uri


def _attributes(
    component: str, separator: str, allowed: frozenset[str], offset: int, where: str
) -> list[tuple[str, str]]:
    """Split a component into (known name, still-encoded value) pairs, checking characters as we go."""
    if not component:
        return []
    pairs = []
    position = offset
    for item in component.split(separator):
        name, has_value, value = item.partition("=")
        if not has_value:
            what = "an empty attribute" if not item else "an attribute without '='"
            raise InvalidArgument(f"{what} at position {position} in the {where} of the PKCS#11 URI")
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"malformed attribute name at position {position} of the PKCS#11 URI")
        if name not in (_PATH_ATTRIBUTES if where == "path" else _QUERY_ATTRIBUTES):
            raise _unknown(name, where)
        value_start = position + len(name) + 1
        for index, char in enumerate(value):
            if char not in allowed and char != "%":
                raise InvalidArgument(
                    f"character at position {value_start + index} of the PKCS#11 URI (in {name!r}) "
                    "must be percent-encoded"
                )
        pairs.append((name, value))
        position += len(item) + 1
    return pairs


def _decode(name: str, raw: str) -> bytes:
    """Percent-decode a value to bytes (strictly: every '%' starts a two-hex-digit escape)."""
    out = bytearray()
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "%":
            escape = raw[index + 1 : index + 3]
            if len(escape) != 2 or not set(escape) <= _HEX:
                raise InvalidArgument(f"malformed percent-escape in PKCS#11 URI attribute {name!r}")
            out.append(int(escape, 16))
            index += 3
        else:
            out += char.encode("ascii")  # _attributes let only ASCII through
            index += 1
    return bytes(out)


def _text(name: str, raw: str) -> str:
    try:
        return _decode(name, raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"PKCS#11 URI attribute {name!r} is not valid UTF-8 once decoded") from e


def _path_value(name: str, raw: str) -> object:
    if name == "id":
        return _decode(name, raw)
    text = _text(name, raw)
    if name == "type":
        try:
            return ObjectType(text)
        except ValueError:
            choices = ", ".join(t.value for t in ObjectType)
            raise InvalidArgument(f"PKCS#11 URI attribute 'type' must be one of: {choices}") from None
    if name == "slot-id":
        if not text.isascii() or not text.isdigit() or int(text) > _MAX_SLOT_ID:
            raise InvalidArgument("PKCS#11 URI attribute 'slot-id' must be a decimal number")
        return int(text)
    if name == "library-version":
        match = _VERSION.fullmatch(text)
        if match is None or int(match[1]) > 255 or int(match[2] or 0) > 255:
            raise InvalidArgument("PKCS#11 URI attribute 'library-version' must be M or M.N (each 0-255)")
        return int(match[1]), int(match[2] or 0)
    return text


def _put(values: dict[str, object], key: str, name: str, value: object) -> None:
    if key in values:
        raise InvalidArgument(f"PKCS#11 URI attribute {name!r} appears more than once")
    values[key] = value


def _unknown(name: str, where: str) -> InvalidArgument:
    known, other = (
        (_PATH_ATTRIBUTES, _QUERY_ATTRIBUTES) if where == "path" else (_QUERY_ATTRIBUTES, _PATH_ATTRIBUTES)
    )
    if name in other:
        other_where = "query (after '?')" if where == "path" else "path (before '?')"
        return InvalidArgument(f"PKCS#11 URI attribute {name!r} belongs in the {other_where}")
    choices = ", ".join(known)
    return InvalidArgument(f"unsupported PKCS#11 URI {where} attribute {name!r}; supported: {choices}")


def _check_query(uri: Pkcs11Uri) -> None:
    if uri.pin_source is not None and uri.pin_value is not None:
        raise InvalidArgument("a PKCS#11 URI may give 'pin-source' or 'pin-value', not both")
    for name, value in (("module-name", uri.module_name), ("module-path", uri.module_path)):
        if value == "":
            raise InvalidArgument(f"PKCS#11 URI attribute {name!r} must not be empty")
    if uri.module_path is not None and not uri.module_path.startswith("/"):
        raise InvalidArgument("PKCS#11 URI attribute 'module-path' must be an absolute path")


def _encode(value: str, allowed: frozenset[str]) -> str:
    return "".join(
        char if char in allowed else "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
        for char in value
    )
