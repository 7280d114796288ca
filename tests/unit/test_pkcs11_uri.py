"""PKCS#11 URI parsing: the RFC 7512 section 3 examples, the RFC's refusals, and our own restrictions."""

from __future__ import annotations

import dataclasses

import pytest

from kms.domain.errors import InvalidArgument
from kms.hsm.uri import ObjectType, Pkcs11Uri, parse_pkcs11_uri

# RFC 7512 section 3, each example with what it must parse to. (The RFC folds long examples over several
# lines for display; the URIs themselves have no whitespace.)
RFC_7512_EXAMPLES = [
    ("pkcs11:", Pkcs11Uri()),
    (
        "pkcs11:object=my-pubkey;type=public",
        Pkcs11Uri(object_label="my-pubkey", object_type=ObjectType.PUBLIC),
    ),
    (
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        Pkcs11Uri(object_label="my-key", object_type=ObjectType.PRIVATE, pin_source="file:/etc/token"),
    ),
    (
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;"
        "object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin",
        Pkcs11Uri(
            token_label="The Software PKCS#11 Softtoken",
            token_manufacturer="Snake Oil, Inc.",
            token_model="1.0",
            object_label="my-certificate",
            object_type=ObjectType.CERT,
            object_id=bytes([0x69, 0x95, 0x3E, 0x5C, 0xF4, 0xBD, 0xEC, 0x91]),
            token_serial="",
            pin_source="file:/etc/token_pin",
        ),
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        Pkcs11Uri(object_label="my-sign-key", object_type=ObjectType.PRIVATE, module_name="mypkcs11"),
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        Pkcs11Uri(
            object_label="my-sign-key", object_type=ObjectType.PRIVATE, module_path="/mnt/libmypkcs11.so.1"
        ),
    ),
    (
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin",
        Pkcs11Uri(
            token_label="Software PKCS#11 softtoken",
            token_manufacturer="Snake Oil, Inc.",
            pin_value="the-pin",
        ),
    ),
    ("pkcs11:slot-description=Sun%20Metaslot", Pkcs11Uri(slot_description="Sun Metaslot")),
    (
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;"
        "library-version=1.23",
        Pkcs11Uri(
            library_manufacturer="Snake Oil, Inc.",
            library_description="Soft Token Library",
            library_version=(1, 23),
        ),
    ),
    (
        "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
        Pkcs11Uri(
            token_label="My token% created by Joe",
            library_version=(3, 0),
            object_id=bytes([1, 2, 3, 0xBA, 0xDD, 0xCA, 0xFE, 4, 5, 6]),
        ),
    ),
    (
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        Pkcs11Uri(
            token_label="A name with a substring %;",
            object_label="my-certificate",
            object_type=ObjectType.CERT,
        ),
    ),
    (
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
        Pkcs11Uri(
            token_label="Name with a small A with acute: \u00e1",
            object_label="my-certificate",
            object_type=ObjectType.CERT,
        ),
    ),
]

# The last RFC example carries vendor-specific attributes. The RFC lets a parser accept them; this service
# refuses every attribute it does not understand rather than ignore it.
RFC_7512_VENDOR_EXAMPLE = (
    "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
    "?pin-source=file:/etc/token_pin&vendor-bbb=value-b"
)


@pytest.mark.parametrize(("text", "expected"), RFC_7512_EXAMPLES, ids=[t for t, _ in RFC_7512_EXAMPLES])
def test_rfc_7512_examples(text: str, expected: Pkcs11Uri) -> None:
    assert parse_pkcs11_uri(text) == expected


def test_rfc_7512_vendor_example_is_refused_naming_the_attribute() -> None:
    with pytest.raises(InvalidArgument, match="vendor-aaa"):
        parse_pkcs11_uri(RFC_7512_VENDOR_EXAMPLE)
    with pytest.raises(InvalidArgument, match="vendor-bbb"):
        parse_pkcs11_uri("pkcs11:token=my-token?pin-source=file:/etc/token_pin&vendor-bbb=value-b")


@pytest.mark.parametrize(("text", "expected"), RFC_7512_EXAMPLES, ids=[t for t, _ in RFC_7512_EXAMPLES])
def test_format_round_trips(text: str, expected: Pkcs11Uri) -> None:
    without_pin = dataclasses.replace(expected, pin_value=None)
    assert parse_pkcs11_uri(expected.format()) == without_pin


def test_format_encodes_what_the_component_does_not_admit() -> None:
    uri = Pkcs11Uri(token_label="a/b c#d?e;f", object_id=b"\x01\xfe", module_path="/opt/x y/m.so?&")
    assert uri.format() == "pkcs11:token=a%2Fb%20c%23d%3Fe%3Bf;id=%01%FE?module-path=/opt/x%20y/m.so?%26"


def test_pin_value_is_kept_out_of_repr_and_format() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t?pin-value=s3cret-pin")
    assert uri.pin_value == "s3cret-pin"
    assert "s3cret" not in repr(uri)
    assert "s3cret" not in uri.format()


def test_scheme_is_case_insensitive() -> None:
    assert parse_pkcs11_uri("PKCS11:token=A").token_label == "A"


def test_characters_each_component_admits_unencoded() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=a:b[c]d@e!f$g'h(i)j*k+l,m=n&o?module-path=/a?b|c/d")
    assert uri.token_label == "a:b[c]d@e!f$g'h(i)j*k+l,m=n&o"
    assert uri.module_path == "/a?b|c/d"


def test_percent_escapes_are_case_insensitive_and_decode_to_utf8() -> None:
    assert parse_pkcs11_uri("pkcs11:id=%fe%FE").object_id == b"\xfe\xfe"
    assert parse_pkcs11_uri("pkcs11:token=%C3%A9").token_label == "\u00e9"


def test_numbers() -> None:
    assert parse_pkcs11_uri("pkcs11:slot-id=0").slot_id == 0
    assert parse_pkcs11_uri("pkcs11:slot-id=705283015").slot_id == 705283015
    assert parse_pkcs11_uri("pkcs11:library-version=2.40").library_version == (2, 40)


def test_empty_query_is_allowed() -> None:
    assert parse_pkcs11_uri("pkcs11:token=A?") == Pkcs11Uri(token_label="A")


def test_every_field_is_reachable_from_an_attribute() -> None:
    parsed = parse_pkcs11_uri(
        "pkcs11:token=t;manufacturer=m;serial=s;model=o;library-manufacturer=lm;library-description=ld;"
        "library-version=1.2;slot-description=sd;slot-manufacturer=sm;slot-id=3;object=ob;id=%00;type=data"
        "?module-name=mn&module-path=/mp&pin-source=env:P"
    )
    unset = [f.name for f in dataclasses.fields(Pkcs11Uri) if getattr(parsed, f.name) is None]
    assert unset == ["pin_value"]  # the one left out, as pin-source and pin-value exclude each other


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pkcs12:token=A", "must start with 'pkcs11:'"),
        ("token=A", "must start with 'pkcs11:'"),
        ("pkcs11:token=A#frag", "fragment"),
        ("pkcs11:token=A;token=B", "'token' appears more than once"),
        ("pkcs11:?module-path=/a&module-path=/b", "'module-path' appears more than once"),
        ("pkcs11:?pin-source=file:/p&pin-value=1234", "not both"),
        ("pkcs11:?module-path=lib/m.so", "absolute"),
        ("pkcs11:?module-path=", "must not be empty"),
        ("pkcs11:?module-name=", "must not be empty"),
        ("pkcs11:type=keypair", "'type' must be one of"),
        ("pkcs11:slot-id=1a", "'slot-id' must be a decimal"),
        ("pkcs11:slot-id=-1", "'slot-id' must be a decimal"),
        ("pkcs11:slot-id=99999999999999999999999", "'slot-id' must be a decimal"),
        ("pkcs11:library-version=.5", "'library-version' must be"),
        ("pkcs11:library-version=2.x", "'library-version' must be"),
        ("pkcs11:library-version=256", "'library-version' must be"),
        ("pkcs11:token=%4", "malformed percent-escape"),
        ("pkcs11:token=%zz", "malformed percent-escape"),
        ("pkcs11:token=%FF%FF", "not valid UTF-8"),
        ("pkcs11:token=a/b", "must be percent-encoded"),
        ("pkcs11:token=a b", "must be percent-encoded"),
        ("pkcs11:token=\u00e9", "must be percent-encoded"),
        ("pkcs11:?pin-source=a&b", "without '='"),
        ("pkcs11:token", "without '='"),
        ("pkcs11:token=A;;type=private", "empty attribute"),
        ("pkcs11:token=A;", "empty attribute"),
        ("pkcs11:;", "empty attribute"),
        ("pkcs11:?&", "empty attribute"),
        ("pkcs11:tok%65n=A", "malformed attribute name"),
        ("pkcs11:Token=A", "unsupported PKCS#11 URI path attribute 'Token'"),
        ("pkcs11:module-path=/m.so", "'module-path' belongs in the query"),
        ("pkcs11:?token=A", "'token' belongs in the path"),
    ],
)
def test_refusals(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_pkcs11_uri(text)


def test_error_positions_point_at_the_offending_character() -> None:
    with pytest.raises(InvalidArgument, match="position 15"):
        parse_pkcs11_uri("pkcs11:token=ab cd")


def test_errors_never_repeat_the_pin() -> None:
    for text in (
        "pkcs11:?pin-value=hunter2%zz",
        "pkcs11:?pin-value=hunter2 x",
        "pkcs11:?pin-value=hunter2%FF",
        "pkcs11:?pin-value=hunter2&pin-source=file:/p",
    ):
        with pytest.raises(InvalidArgument) as caught:
            parse_pkcs11_uri(text)
        assert "hunter2" not in str(caught.value)
