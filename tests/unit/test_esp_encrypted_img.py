"""esp_encrypted_img ECIES-P256 payloads: the service's encoder against vectors and a separate device model.

The decoder (``kmsctl.device.esp_encrypted_img``) shares no code with the encoder and starts from the
device's eFuse secret, as the device does. ``test_espressif_tool_semantics`` decrypts a third way, step by
step as Espressif's ``esp_enc_img_gen.py decrypt`` does (rewritten here, not copied).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.domain import esp_encrypted_img as eei
from kms.domain.errors import InvalidArgument, OutOfRange
from kmsctl.device import esp_encrypted_img as device
from kmsctl.device.esp_encrypted_img import ImageRejected, Reason

VECTORS = json.loads(
    (Path(__file__).parents[1] / "vectors" / "esp_encrypted_img" / "ecies_p256.json").read_text()
)["vectors"]
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SECRET = hashlib.sha256(b"unit test device").digest()
OTHER_SECRET = hashlib.sha256(b"another unit test device").digest()
SEED = hashlib.sha256(b"unit test seed").digest()


@functools.cache
def _public(secret: bytes) -> bytes:
    return eei.device_public_key_from_secret(secret)


@functools.cache
def _hmac(secret: bytes) -> device.EfuseHmac:
    """The device's HMAC, memoized: the PBKDF2 chain is the same every time, so tamper tests stay fast."""
    return functools.cache(device.efuse_hmac_from_secret(secret))


def _image(size: int, label: bytes = b"image") -> bytes:
    blocks = (hashlib.sha256(label + i.to_bytes(4, "big")).digest() for i in range(-(-size // 32)))
    return b"".join(blocks)[:size]


def _payload(image: bytes, secret: bytes = SECRET, seed: bytes = SEED) -> bytes:
    return b"".join(eei.EspEncryptedImage.for_device(image, _public(secret), seed).iter_bytes())


def _vec(v: dict[str, Any], name: str) -> bytes:
    value = v[name]
    assert isinstance(value, str)
    return bytes.fromhex(value)


# --- vectors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_device_key(v: dict[str, Any]) -> None:
    secret, public = _vec(v, "device_secret"), _vec(v, "device_public_key")
    assert eei.device_public_key_from_secret(secret) == public
    assert device.device_public_key_der(_hmac(secret)) == _vec(v, "device_public_key_der")
    assert eei.normalize_device_public_key(_vec(v, "device_public_key_der")) == public


@pytest.mark.parametrize("v", [v for v in VECTORS if v["seed"]], ids=lambda v: v["name"])
def test_vector_derivation(v: dict[str, Any]) -> None:
    inputs = eei.derive_encryption_inputs(
        _vec(v, "seed"), _vec(v, "device_public_key"), _vec(v, "image_sha256"), v["image_size"]
    )
    assert inputs.ephemeral_private_scalar.hex() == v["ephemeral_private_scalar"]
    assert inputs.hkdf_salt.hex() == v["hkdf_salt"]
    assert inputs.iv.hex() == v["iv"]


@pytest.mark.parametrize("v", [v for v in VECTORS if v["payload"]], ids=lambda v: v["name"])
def test_vector_payload(v: dict[str, Any]) -> None:
    image, public, payload = _vec(v, "image"), _vec(v, "device_public_key"), _vec(v, "payload")
    built = eei.encrypt_for_device(
        image, public, _vec(v, "ephemeral_private_scalar"), _vec(v, "hkdf_salt"), _vec(v, "iv")
    )
    assert built == payload
    assert payload[4:68] == _vec(v, "ephemeral_public_key_xy")
    if v["seed"]:
        streamed = eei.EspEncryptedImage.for_device(image, public, _vec(v, "seed"))
        assert b"".join(streamed.iter_bytes(0, chunk=7)) == payload
    assert device.decrypt(payload, _hmac(_vec(v, "device_secret")), strict=True) == image


def test_vectors_cover_an_iv_retry() -> None:
    assert any(v["iv_candidate"] and v["iv_candidate"] > 0 for v in VECTORS)


# --- layout --------------------------------------------------------------------------------------------


def test_header_layout() -> None:
    image = _image(1000)
    payload = eei.EspEncryptedImage.for_device(image, _public(SECRET), SEED)
    header = payload.header()
    inputs = payload.inputs
    assert len(header) == eei.HEADER_SIZE == 512
    assert header[0:4] == bytes.fromhex("cfb68807")
    ephemeral = ec.derive_private_key(int.from_bytes(inputs.ephemeral_private_scalar, "big"), ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert header[4:68] == point[1:]
    assert header[68:100] == inputs.hkdf_salt
    assert header[100:388] == bytes(288)
    assert header[388:404] == inputs.iv
    assert header[404:408] == (1000).to_bytes(4, "little")
    assert header[408:424] == payload.tag()
    assert header[424:512] == bytes(88)
    assert payload.total_size() == eei.total_size(1000) == 1512
    assert payload.image_sha256() == hashlib.sha256(image).digest()
    assert "scalar" not in repr(inputs)


def test_espressif_tool_semantics() -> None:
    """Decrypt as esp_enc_img_gen.py's decrypt does: PEM-free, but the same fields and primitives."""
    image = _image(333)
    payload = _payload(image)
    raw = hashlib.pbkdf2_hmac("sha256", SECRET, eei.PBKDF2_SALT, 2048)
    private = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    assert int.from_bytes(payload[0:4], "little") == 0x0788B6CF
    server = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + payload[4:68])
    shared = private.exchange(ec.ECDH(), server)
    key = HKDF(hashes.SHA256(), 32, payload[68:100], b"_esp_enc_img_ecc").derive(shared)
    iv, size, tag = payload[388:404], int.from_bytes(payload[404:408], "little"), payload[408:424]
    assert AESGCM(key).decrypt(iv, payload[512 : 512 + size] + tag, None) == image


# --- round trips, determinism, resume -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 5000), seed=st.binary(min_size=32, max_size=32), data=st.data())
def test_round_trip_streamed_in_random_pieces(size: int, seed: bytes, data: st.DataObject) -> None:
    image = _image(size, seed)
    payload = _payload(image, seed=seed)
    decryptor = device.Decryptor(_hmac(SECRET), strict=True)
    out, position = [], 0
    while position < len(payload):
        step = data.draw(st.integers(1, 700))
        out.append(decryptor.update(payload[position : position + step]))
        position += step
    decryptor.finish()
    assert b"".join(out) == image


def test_one_byte_at_a_time() -> None:
    image = _image(40)
    decryptor = device.Decryptor(_hmac(SECRET))
    payload = _payload(image)
    out = b"".join(decryptor.update(payload[i : i + 1]) for i in range(len(payload)))
    decryptor.finish()
    assert out == image


def test_device_exported_key_is_enough() -> None:
    """The service needs only what the device exports (DER), never the eFuse secret."""
    der = device.device_public_key_der(_hmac(OTHER_SECRET))
    image = _image(100)
    payload = b"".join(
        eei.EspEncryptedImage.for_device(image, eei.normalize_device_public_key(der), SEED).iter_bytes()
    )
    assert device.decrypt(payload, _hmac(OTHER_SECRET)) == image


def test_wrong_device_fails_the_tag() -> None:
    payload = _payload(_image(500))
    with pytest.raises(ImageRejected) as caught:
        device.decrypt(payload, _hmac(OTHER_SECRET))
    assert caught.value.reason is Reason.BAD_TAG


def test_deterministic_and_bound_to_image_and_device() -> None:
    image = _image(2000)
    first = eei.EspEncryptedImage.for_device(image, _public(SECRET), SEED)
    again = eei.EspEncryptedImage.for_device(bytes(image), _public(SECRET), SEED)
    assert b"".join(first.iter_bytes()) == b"".join(again.iter_bytes())
    other_image = eei.EspEncryptedImage.for_device(image[:-1] + b"\x00", _public(SECRET), SEED)
    other_device = eei.EspEncryptedImage.for_device(image, _public(OTHER_SECRET), SEED)
    for other in (other_image, other_device):
        assert other.inputs.ephemeral_private_scalar != first.inputs.ephemeral_private_scalar
        assert other.inputs.hkdf_salt != first.inputs.hkdf_salt
        assert other.inputs.iv != first.inputs.iv


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 3000), data=st.data())
def test_resume_from_any_offset_is_the_suffix(size: int, data: st.DataObject) -> None:
    image = _image(size)
    payload = eei.EspEncryptedImage.for_device(image, _public(SECRET), SEED)
    whole = b"".join(payload.iter_bytes())
    offset = data.draw(st.integers(0, len(whole)))
    chunk = data.draw(st.integers(1, 1100))
    fresh = eei.EspEncryptedImage.for_device(image, _public(SECRET), SEED)  # no cached tag
    pieces = list(fresh.iter_bytes(offset, chunk))
    assert b"".join(pieces) == whole[offset:]
    assert all(len(piece) == chunk for piece in pieces[:-1])
    # a download cut at ``offset`` and resumed there decodes like an uncut one
    assert device.decrypt(whole[:offset] + b"".join(pieces), _hmac(SECRET)) == image


def test_resume_past_the_tag_skips_the_tag_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    image = _image(5000)
    whole = _payload(image)

    def no_tag_pass(self: eei.EspEncryptedImage) -> bytes:
        raise AssertionError("tag pass")

    monkeypatch.setattr(eei.EspEncryptedImage, "_compute_tag", no_tag_pass)
    payload = eei.EspEncryptedImage.for_device(image, _public(SECRET), SEED)
    for offset in (eei.RESERVED_OFFSET, 511, 512, 513, 3000, len(whole)):
        assert b"".join(payload.iter_bytes(offset, 999)) == whole[offset:]
    with pytest.raises(AssertionError, match="tag pass"):
        payload.iter_bytes(eei.RESERVED_OFFSET - 1)


def test_matches_one_shot_aes_gcm() -> None:
    image = _image(100_003)
    payload = eei.EspEncryptedImage.for_device(image, _public(SECRET), SEED)
    whole = b"".join(payload.iter_bytes(0, 4096))
    inputs = payload.inputs
    ephemeral = ec.derive_private_key(int.from_bytes(inputs.ephemeral_private_scalar, "big"), ec.SECP256R1())
    device_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _public(SECRET))
    key = HKDF(hashes.SHA256(), 32, inputs.hkdf_salt, b"_esp_enc_img_ecc").derive(
        ephemeral.exchange(ec.ECDH(), device_key)
    )
    sealed = AESGCM(key).encrypt(inputs.iv, image, None)
    assert whole[512:] == sealed[:-16]
    assert whole[408:424] == sealed[-16:]


# --- tampering -----------------------------------------------------------------------------------------

TAMPER_IMAGE = _image(48, b"tamper")


@functools.cache
def _tamper_payload() -> bytes:
    return _payload(TAMPER_IMAGE)


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _expected_reason(index: int) -> set[Reason] | None:
    """What a flip at ``index`` does on a device; None where the device ignores the byte."""
    if index < 4:
        return {Reason.BAD_MAGIC}
    if index < 68:
        return {Reason.BAD_SERVER_KEY}
    if 100 <= index < 388 or 424 <= index < 512:
        return None
    if 404 <= index < 408:
        return {Reason.TRUNCATED, Reason.TRAILING_DATA}
    return {Reason.BAD_TAG}  # HKDF salt, IV, tag, ciphertext


@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_every_flipped_byte(mask: int) -> None:
    payload = _tamper_payload()
    for index in range(len(payload)):
        tampered = _flip(payload, index, mask)
        expected = _expected_reason(index)
        if expected is None:
            assert device.decrypt(tampered, _hmac(SECRET)) == TAMPER_IMAGE, index
            with pytest.raises(ImageRejected) as strict:
                device.decrypt(tampered, _hmac(SECRET), strict=True)
            assert strict.value.reason is Reason.RESERVED_NOT_ZERO
            continue
        with pytest.raises(ImageRejected) as caught:
            device.decrypt(tampered, _hmac(SECRET))
        assert caught.value.reason in expected, (index, caught.value)


def test_truncated_and_extended() -> None:
    payload = _tamper_payload()
    for cut in (0, 3, 100, 511, 512, 513, len(payload) - 1):
        with pytest.raises(ImageRejected) as caught:
            device.decrypt(payload[:cut], _hmac(SECRET))
        assert caught.value.reason is Reason.TRUNCATED, cut
    with pytest.raises(ImageRejected) as extended:
        device.decrypt(payload + b"\x00", _hmac(SECRET))
    assert extended.value.reason is Reason.TRAILING_DATA


def test_device_refuses_an_unusable_key() -> None:
    # a constant HMAC makes the 2048 PBKDF2 terms cancel: the scalar is 0, which the device refuses
    with pytest.raises(ImageRejected) as caught:
        device.decrypt(_tamper_payload(), lambda message: b"\xff" * 32)
    assert caught.value.reason is Reason.UNUSABLE_DEVICE_KEY


def test_factory_refuses_an_unusable_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (bytes(32), N.to_bytes(32, "big"), b"\xff" * 32):
        monkeypatch.setattr(hashlib, "pbkdf2_hmac", lambda *args, value=bad: value)
        with pytest.raises(InvalidArgument, match="burn another"):
            eei.device_public_key_from_secret(SECRET)


# --- the GCM counter -----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), iv=st.binary(min_size=16, max_size=16))
def test_j0_matches_the_gcm_keystream(key: bytes, iv: bytes) -> None:
    """Our GHASH-derived J0: AES-GCM's first keystream block is E_K(J0 + 1), so decrypting it gives J0 + 1."""
    keystream = AESGCM(key).encrypt(iv, bytes(16), None)[:16]
    ecb = Cipher(algorithms.AES(key), modes.ECB()).decryptor()  # noqa: S305 - test oracle
    first_counter = int.from_bytes(ecb.update(keystream) + ecb.finalize(), "big")
    j0 = eei._j0(eei._ghash_key(key), iv)
    assert (j0 & ~0xFFFFFFFF) | ((j0 + 1) & 0xFFFFFFFF) == first_counter


def test_counter_wrap_boundary() -> None:
    j0 = (1 << 96) | 0xFFFFFF00
    assert not eei._counter_wraps(j0, 0xFF * 16)
    assert eei._counter_wraps(j0, 0xFF * 16 + 1)
    assert not eei._counter_wraps(0, eei.MAX_IMAGE_SIZE)


def test_an_iv_that_wraps_is_refused() -> None:
    size = 1 << 26  # 2^22 blocks: about 1 IV in 1024 wraps
    inputs = eei.derive_encryption_inputs(SEED, _public(SECRET), bytes(32), size)
    aes_key = eei._aes_key(inputs.ephemeral_private_scalar, inputs.hkdf_salt, _device_key())
    hash_key = eei._ghash_key(aes_key)
    candidates = (hashlib.sha256(i.to_bytes(4, "big")).digest()[:16] for i in range(100_000))
    wrapping = next(iv for iv in candidates if eei._counter_wraps(eei._j0(hash_key, iv), size))
    bad = eei.EncryptionInputs(inputs.ephemeral_private_scalar, inputs.hkdf_salt, wrapping)
    with pytest.raises(InvalidArgument, match="wrap"):
        eei.EspEncryptedImage(bytes(size), _public(SECRET), bad)  # the image is never read


def test_derived_ivs_never_wrap() -> None:
    for i in range(32):
        seed = hashlib.sha256(i.to_bytes(4, "big")).digest()
        inputs = eei.derive_encryption_inputs(seed, _public(SECRET), bytes(32), eei.MAX_IMAGE_SIZE)
        aes_key = eei._aes_key(inputs.ephemeral_private_scalar, inputs.hkdf_salt, _device_key())
        assert not eei._counter_wraps(eei._j0(eei._ghash_key(aes_key), inputs.iv), eei.MAX_IMAGE_SIZE)


def _device_key() -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _public(SECRET))


# --- arguments -----------------------------------------------------------------------------------------


def test_seed_message_is_unambiguous() -> None:
    digest = bytes(range(32))
    message = eei.seed_message("dev-1", digest)
    assert message == eei.SEED_LABEL + b"\x00\x05dev-1" + digest
    assert eei.seed_message("dev-12", digest) != eei.seed_message("dev-1", b"2" + digest[1:])
    with pytest.raises(InvalidArgument):
        eei.seed_message("", digest)
    with pytest.raises(InvalidArgument):
        eei.seed_message("dev-1", digest[:31])


def test_seed_is_an_hmac_the_hsm_can_compute() -> None:
    """The service's seed is an HMAC-SHA256 in the HSM; any 32 bytes work, so a software HMAC stands in."""
    image = _image(64)
    seed = hmac.digest(b"k" * 32, eei.seed_message("dev-1", hashlib.sha256(image).digest()), "sha256")
    assert device.decrypt(_payload(image, seed=seed), _hmac(SECRET)) == image


def test_normalize_device_public_key() -> None:
    public = _public(SECRET)
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public)
    compressed = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    assert eei.normalize_device_public_key(compressed) == public
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    for bad in (
        p384.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        b"\x04" + bytes(64),
        b"",
        b"\x30\x00",
    ):
        with pytest.raises(InvalidArgument):
            eei.normalize_device_public_key(bad)


@pytest.mark.parametrize(
    ("scalar", "salt", "iv"),
    [
        (bytes(32), bytes(32), bytes(16)),
        (N.to_bytes(32, "big"), bytes(32), bytes(16)),
        (b"\x01" * 31, bytes(32), bytes(16)),
        (b"\x01" * 32, bytes(31), bytes(16)),
        (b"\x01" * 32, bytes(32), bytes(12)),
    ],
)
def test_encryption_inputs_are_checked(scalar: bytes, salt: bytes, iv: bytes) -> None:
    with pytest.raises(InvalidArgument):
        eei.EncryptionInputs(scalar, salt, iv)


def test_other_arguments_are_checked() -> None:
    public = _public(SECRET)
    with pytest.raises(InvalidArgument):
        eei.device_public_key_from_secret(SECRET[:31])
    with pytest.raises(InvalidArgument):
        eei.EspEncryptedImage.for_device(b"", public, SEED)
    with pytest.raises(InvalidArgument):
        eei.EspEncryptedImage.for_device(b"x", public[:64], SEED)
    with pytest.raises(InvalidArgument):
        eei.EspEncryptedImage.for_device(b"x", b"\x04" + bytes(64), SEED)
    with pytest.raises(InvalidArgument):
        eei.EspEncryptedImage.for_device(b"x", public, SEED[:31])
    with pytest.raises(InvalidArgument):
        eei.total_size(eei.MAX_IMAGE_SIZE + 1)
    payload = eei.EspEncryptedImage.for_device(b"abc", public, SEED)
    for offset in (-1, payload.total_size() + 1):
        with pytest.raises(OutOfRange):
            payload.iter_bytes(offset)
    with pytest.raises(InvalidArgument):
        payload.iter_bytes(0, chunk=0)
    assert list(payload.iter_bytes(payload.total_size())) == []


def test_the_decoder_is_independent_of_the_service() -> None:
    tree = ast.parse(Path(device.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name == "kms" or name.startswith("kms.") for name in imported)
