"""FKRS v1 rollover statements: the vectors, the service's encoder and parser, the device-side verifier.

The vectors (tests/vectors/rollover) are checked with ``cryptography`` directly, reading the fields at the
offsets docs/manifest-key-rollover.md gives, so neither of our two implementations is its own oracle. Then
every byte of a statement is tampered with, statements are cut and extended, and chains are forged,
replayed and reordered against the device-side verifier: each must be refused with its verdict and leave
the device's trusted keys as they were.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from kms.domain import rollover
from kms.domain.errors import InvalidArgument
from kmsctl.device import (
    DeviceModel,
    PayloadRejected,
    PowerCut,
    RolloverRejected,
    RolloverVerdict,
    Verdict,
    decode_stream,
    split_statements,
    verify_chain,
)
from kmsctl.device.decoder import DeviceContext

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "rollover"
DOC: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text())
PRODUCT = b"thermostat"
P = len(PRODUCT)
MALFORMED = RolloverVerdict.MALFORMED
BAD_SIGNATURE = RolloverVerdict.BAD_SIGNATURE
UNTRUSTED = RolloverVerdict.UNTRUSTED_SIGNER


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fkrs_vector_generator", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def _private(name: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((VECTORS / f"key-{name}.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _spki(name: str) -> bytes:
    return bytes.fromhex(DOC["keys"][name]["spki"])


def _id(name: str) -> bytes:
    return bytes.fromhex(DOC["keys"][name]["key_id"])


def _public(name: str) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(_spki(name))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _valid(name: str) -> bytes:
    return bytes.fromhex(next(v["statement"] for v in DOC["valid"] if v["name"] == name))


def _trusting(*names: str) -> dict[bytes, ec.EllipticCurvePublicKey]:
    return {_id(name): _public(name) for name in names}


def _rejected(statements: list[bytes], trusted: dict[bytes, ec.EllipticCurvePublicKey]) -> RolloverRejected:
    before = dict(trusted)
    with pytest.raises(RolloverRejected) as caught:
        verify_chain(statements, PRODUCT, trusted)
    assert trusted == before, "the verifier never changes the set it was given"
    return caught.value


def _sign(name: str, signed: bytes) -> bytes:
    der = _private(name).sign(hashlib.sha256(signed).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# -- the vectors, with cryptography as the oracle ------------------------------------------------------


def test_the_vector_file_is_what_the_generator_makes() -> None:
    assert generate.main(["--check"]) == 0


def test_the_committed_keys_are_the_ones_the_vectors_name() -> None:
    for name, key in DOC["keys"].items():
        der = (
            _private(name)
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        assert der.hex() == key["spki"] and hashlib.sha256(der).hexdigest() == key["key_id"]
        assert len(der) == rollover.P256_SPKI_LEN


@pytest.mark.parametrize("vector", DOC["valid"], ids=lambda v: v["name"])
def test_valid_vectors_verify_with_cryptography_at_the_documented_offsets(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["statement"])
    product = vector["product"].encode()
    p = data[5]
    (k,) = struct.unpack_from("<H", data, 78 + p)
    assert data[:4] == b"FKRS" and data[4] == 1 and p == len(product) and data[6 : 6 + p] == product
    assert struct.unpack_from("<II", data, 6 + p) == (vector["from_version"], vector["to_version"])
    assert data[14 + p : 46 + p] == _id(vector["from_key"]) and data[46 + p : 78 + p] == _id(vector["to_key"])
    assert k == 91 and data[80 + p : 80 + p + k] == _spki(vector["to_key"])
    assert len(data) == 144 + p + k == 235 + p
    signed, signature = data[: 80 + p + k], data[80 + p + k :]
    assert hashlib.sha256(signed).hexdigest() == vector["signed_sha256"]
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    _public(vector["from_key"]).verify(der, signed, ec.ECDSA(hashes.SHA256()))  # raises if invalid
    rfc6979 = _private(vector["from_key"]).sign(signed, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    assert rfc6979 == der, "the stored signature is the RFC 6979 one: the vector is reproducible"


def test_statement_lengths() -> None:
    assert (rollover.MIN_LEN, rollover.MAX_LEN) == (236, 298)
    assert len(_valid("long-product-v7-to-v9")) == rollover.MAX_LEN


@pytest.mark.parametrize("vector", DOC["valid"], ids=lambda v: v["name"])
def test_the_service_encoder_and_parser_reproduce_the_vectors(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["statement"])
    body = rollover.RolloverBody(
        vector["product"],
        vector["from_version"],
        vector["to_version"],
        _id(vector["from_key"]),
        _id(vector["to_key"]),
        _spki(vector["to_key"]),
    )
    assert rollover.RolloverStatement(body, data[-64:]).to_bytes() == data
    parsed = rollover.RolloverStatement.parse(data)
    assert parsed.body == body and parsed.to_bytes() == data
    assert body.digest().hex() == vector["signed_sha256"]
    assert parsed.verify(_spki(vector["from_key"]))
    assert not parsed.verify(_spki("attacker")), "another key (with another id) does not verify"


def test_the_chain_vector_moves_a_device_from_v1_to_v3_only() -> None:
    chain = DOC["chain"]
    statements = [_valid(name) for name in chain["statements"]]
    after = verify_chain(statements, chain["product"].encode(), _trusting(chain["trusted"]))
    assert set(after) == {_id(chain["result"])}
    assert split_statements(b"".join(statements)) == statements


@pytest.mark.parametrize("vector", DOC["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_get_their_device_verdict(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["statement"])
    rejected = _rejected([data], _trusting("v1"))
    assert rejected.verdict.value == vector["device_verdict"]
    if rejected.verdict is MALFORMED:
        with pytest.raises(InvalidArgument):
            rollover.RolloverStatement.parse(data)
    elif rejected.verdict is BAD_SIGNATURE:
        assert not rollover.RolloverStatement.parse(data).verify(_spki("v1"))


# -- tampering, truncation, trailing bytes --------------------------------------------------------------


def _service_accepts(data: bytes, signer: str, product: str) -> bool:
    """What the service's own parser says: parses, names ``product`` and verifies under ``signer``."""
    try:
        statement = rollover.RolloverStatement.parse(data)
    except InvalidArgument:
        return False
    return statement.body.product == product and statement.verify(_spki(signer))


def _field_of(offset: int) -> str:
    layout = [
        (4, "magic"),
        (5, "version"),
        (6, "product length"),
        (6 + P, "product"),
        (14 + P, "versions"),
        (46 + P, "from key id"),
        (78 + P, "to key id"),
        (80 + P, "key length"),
        (80 + P + 91, "key"),
        (144 + P + 91, "signature"),
    ]
    return next(name for end, name in layout if offset < end)


EXPECTED = {
    "magic": {MALFORMED},
    "version": {MALFORMED},
    "product length": {MALFORMED},
    "product": {RolloverVerdict.WRONG_PRODUCT},
    "versions": {MALFORMED, BAD_SIGNATURE},  # order broken, or a signed field changed
    "from key id": {UNTRUSTED},
    "to key id": {BAD_SIGNATURE},
    "key length": {MALFORMED},
    "key": {BAD_SIGNATURE},
    "signature": {BAD_SIGNATURE},
}


def test_every_bit_of_every_field_is_covered() -> None:
    good = _valid("v1-to-v2")
    seen: dict[str, set[RolloverVerdict]] = {}
    for offset in range(len(good)):
        for bit in (0, 7):
            tampered = bytearray(good)
            tampered[offset] ^= 1 << bit
            verdict = _rejected([bytes(tampered)], _trusting("v1")).verdict
            field = _field_of(offset)
            assert verdict in EXPECTED[field], (offset, field, verdict)
            seen.setdefault(field, set()).add(verdict)
            assert not _service_accepts(bytes(tampered), "v1", PRODUCT.decode())
    assert set(seen) == set(EXPECTED)


def test_every_truncation_and_any_trailing_byte_is_malformed() -> None:
    good = _valid("v1-to-v2")
    for length in range(len(good)):
        assert _rejected([good[:length]], _trusting("v1")).verdict is MALFORMED
        with pytest.raises(InvalidArgument):
            rollover.RolloverStatement.parse(good[:length])
    for extra in (b"\x00", b"\xff" * 64, good):
        assert _rejected([good + extra], _trusting("v1")).verdict is MALFORMED
        with pytest.raises(InvalidArgument, match="follow"):
            rollover.RolloverStatement.parse(good + extra)


def test_a_chain_file_that_does_not_split_exactly_is_refused() -> None:
    chain = _valid("v1-to-v2") + _valid("v2-to-v3")
    with pytest.raises(RolloverRejected) as caught:
        split_statements(chain[:5])
    assert caught.value.verdict is MALFORMED
    pieces = split_statements(chain[:-1])  # the last statement is one byte short
    assert _rejected(pieces, _trusting("v1")).index == 1


# -- forged, replayed and reordered chains ---------------------------------------------------------------


def test_a_new_key_signed_by_an_attacker_key_is_forged() -> None:
    signed = generate.signed_part("thermostat", 1, 2, "v1", "attacker")
    forged = signed + _sign("attacker", signed)
    assert _rejected([forged], _trusting("v1")).verdict is BAD_SIGNATURE
    # Honest about its signer, it names a key the device does not trust.
    honest = generate.statement("thermostat", 1, 2, "attacker", "v2")
    assert _rejected([honest], _trusting("v1")).verdict is UNTRUSTED


def test_order_replay_and_all_or_nothing() -> None:
    first, second = _valid("v1-to-v2"), _valid("v2-to-v3")
    assert _rejected([second, first], _trusting("v1")).verdict is UNTRUSTED, "out of order"
    moved = verify_chain([first], PRODUCT, _trusting("v1"))
    assert set(moved) == {_id("v2")}
    assert _rejected([first], moved).verdict is UNTRUSTED, "replayed after the device moved on"
    forged = bytearray(second)
    forged[-1] ^= 1
    rejected = _rejected([first, bytes(forged)], _trusting("v1"))
    assert (rejected.verdict, rejected.index) == (BAD_SIGNATURE, 1), "a bad second statement undoes the first"
    assert verify_chain([], PRODUCT, _trusting("v1")) == _trusting("v1")


def test_only_the_signing_key_is_dropped() -> None:
    after = verify_chain([_valid("v1-to-v2")], PRODUCT, _trusting("v1", "attacker"))
    assert set(after) == {_id("v2"), _id("attacker")}


def test_wrong_product() -> None:
    data = _valid("long-product-v7-to-v9")
    with pytest.raises(RolloverRejected) as caught:
        verify_chain([data], PRODUCT, _trusting("v1"))
    assert caught.value.verdict is RolloverVerdict.WRONG_PRODUCT
    assert set(verify_chain([data], generate.LONG_PRODUCT.encode(), _trusting("v1"))) == {_id("v3")}


def test_a_statement_is_not_a_payload_and_a_payload_is_not_a_statement() -> None:
    """Domain separation: the first four signed bytes differ, and each reader checks them first."""
    statement = _valid("v1-to-v2")
    context = DeviceContext(b"dev", 9, 0, _trusting("v1"), lambda message: bytes(32))

    class NoSink:
        def begin(self, manifest: object) -> None:
            raise AssertionError("nothing may be written")

        def write(self, offset: int, plaintext: bytes) -> None:
            raise AssertionError("nothing may be written")

    payload_like = statement + bytes(384)
    with pytest.raises(PayloadRejected) as caught:
        decode_stream(payload_like, context, NoSink())
    assert caught.value.verdict is Verdict.BAD_HEADER
    header_like = b"FKSP" + statement[4:]
    assert _rejected([header_like], _trusting("v1")).verdict is MALFORMED


# -- the service's parser: strict on what the device check does not reach -------------------------------


def _with_key(der: bytes, to_id: bytes | None = None) -> bytes:
    name = b"thermostat"
    signed = (
        b"FKRS\x01"
        + bytes([len(name)])
        + name
        + struct.pack("<II", 1, 2)
        + _id("v1")
        + (to_id if to_id is not None else hashlib.sha256(der).digest())
        + struct.pack("<H", len(der))
        + der
    )
    return signed + _sign("v1", signed)


def test_keys_that_are_not_canonical_p256_are_refused_by_both() -> None:
    p256 = _public("v2")
    compressed = p256.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    compressed_spki = _spki("v2")[:26].replace(b"\x03\x42\x00", b"\x03\x22\x00") + compressed
    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for der in (compressed_spki, p384):
        data = _with_key(der)
        with pytest.raises(InvalidArgument, match="91-byte"):
            rollover.RolloverStatement.parse(data)
        assert _rejected([data], _trusting("v1")).verdict is MALFORMED
    garbage = b"\x30" + bytes(90)
    with pytest.raises(InvalidArgument, match="not a DER"):
        rollover.RolloverStatement.parse(_with_key(garbage))
    assert _rejected([_with_key(garbage)], _trusting("v1")).verdict is RolloverVerdict.BAD_KEY
    mismatch = _with_key(_spki("v2"), to_id=_id("v3"))
    with pytest.raises(InvalidArgument, match="to key id"):
        rollover.RolloverStatement.parse(mismatch)
    assert _rejected([mismatch], _trusting("v1")).verdict is RolloverVerdict.BAD_KEY


def test_body_rules() -> None:
    good = dict(
        product="thermostat",
        from_version=1,
        to_version=2,
        from_key_id=_id("v1"),
        to_key_id=_id("v2"),
        to_key_der=_spki("v2"),
    )
    rollover.RolloverBody(**good)  # type: ignore[arg-type]
    for change, message in (
        ({"product": "Thermostat"}, "malformed product"),
        ({"product": "x" * 64}, "malformed product"),
        ({"from_version": 0}, "from version"),
        ({"to_version": 1}, "to version"),
        ({"to_version": 1 << 32}, "to version"),
        ({"from_key_id": bytes(31)}, "32 bytes"),
        ({"from_key_id": _id("v2")}, "the key that signs it"),
        ({"to_key_id": _id("v3")}, "to key id"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            rollover.RolloverBody(**{**good, **change})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="64 bytes"):
        rollover.RolloverStatement(rollover.RolloverBody(**good), bytes(63))  # type: ignore[arg-type]
    non_ascii = bytearray(_valid("v1-to-v2"))
    non_ascii[6] = 0xE9
    with pytest.raises(InvalidArgument, match="ASCII"):
        rollover.RolloverStatement.parse(bytes(non_ascii))


# -- the device model --------------------------------------------------------------------------------------


def _model(*trusted: str, product: bytes = PRODUCT) -> DeviceModel:
    return DeviceModel(
        efuse_secret=bytes(32),
        device_id=b"dev-1",
        chip_id=9,
        manifest_keys_der=[_spki(name) for name in trusted],
        floor=0,
        product=product,
    )


def test_the_model_applies_a_chain_all_or_nothing() -> None:
    device = _model("v1")
    chain = [_valid("v1-to-v2"), _valid("v2-to-v3")]
    broken = [chain[0], chain[1][:-1] + bytes([chain[1][-1] ^ 1])]
    result = device.apply_key_rollover(broken)
    assert (result.verdict, result.index) == (BAD_SIGNATURE, 1)
    assert device.trusted_key_ids == result.trusted_key_ids == {_id("v1")}
    assert device.power.operations == 0, "nothing was written"
    result = device.apply_key_rollover(b"".join(chain))
    assert result.verdict is RolloverVerdict.OK and device.trusted_key_ids == {_id("v3")}
    assert device.power.log == ["write trusted manifest keys"], "one write for the whole chain"
    again = device.apply_key_rollover(chain)
    assert (again.verdict, again.index) == (UNTRUSTED, 0) and device.trusted_key_ids == {_id("v3")}


def test_a_power_cut_during_the_write_keeps_the_old_keys() -> None:
    device = _model("v1")
    device.power.cut_at = 0
    with pytest.raises(PowerCut):
        device.apply_key_rollover([_valid("v1-to-v2")])
    device.boot()
    assert device.trusted_key_ids == {_id("v1")}
    assert device.apply_key_rollover([_valid("v1-to-v2")]).verdict is RolloverVerdict.OK
    assert device.trusted_key_ids == {_id("v2")}


def test_a_model_without_a_product_refuses_rollovers() -> None:
    with pytest.raises(ValueError, match="product"):
        _model("v1", product=b"").apply_key_rollover([_valid("v1-to-v2")])
