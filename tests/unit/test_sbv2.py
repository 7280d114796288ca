"""Secure Boot V2 signature sectors, checked byte by byte and against espsecure as an external oracle.

Software keys (``tests/vectors/sbv2``) sign through the same RAW encodings the HSM port returns. espsecure
then verifies what we assembled, builds the same blocks from the same signatures, and digests the same keys.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.domain import sbv2
from kms.domain.errors import InvalidArgument, InvalidImage
from kms.domain.keys import Algorithm
from tests.support.esp_images import build_app_image
from tests.support.espressif_tools import exit_codes, run_all

VECTORS = Path(__file__).parents[1] / "vectors" / "sbv2"
RSA = Algorithm.RSA_3072_PSS_SHA256
P256 = Algorithm.ECDSA_P256_SHA256
P384 = Algorithm.ECDSA_P384_SHA384
CHIP_FOR = {RSA: "esp32s3", P256: "esp32c6", P384: "esp32c5"}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SoftKey:
    name: str
    algorithm: Algorithm
    private: PrivateKey
    pub_pem: Path

    @property
    def public_der(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign_raw(self, digest: bytes) -> bytes:
        """Sign as ``Hsm.sign_digest`` does: RAW r||s (big-endian) or the big-endian RSA-PSS signature."""
        prehashed = utils.Prehashed(hashes.SHA384() if self.algorithm is P384 else hashes.SHA256())
        if isinstance(self.private, rsa.RSAPrivateKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return self.private.sign(digest, pss, prehashed)
        r, s = utils.decode_dss_signature(self.private.sign(digest, ec.ECDSA(prehashed)))
        size = self.algorithm.raw_signature_size // 2
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


@functools.cache
def keys(algorithm: Algorithm) -> tuple[SoftKey, ...]:
    found = []
    for n in range(3):
        name = f"{algorithm.value}-{n}"
        private = serialization.load_pem_private_key((VECTORS / f"{name}.pem").read_bytes(), None)
        assert isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        found.append(SoftKey(name, algorithm, private, VECTORS / f"{name}.pub.pem"))
    return tuple(found)


def sign(image: bytes, signers: tuple[SoftKey, ...]) -> tuple[bytes, list[bytes]]:
    """The padded image and one block per signer, assembled by the code under test."""
    padded = sbv2.pad_image(image)
    blocks = []
    for key in signers:
        digest = sbv2.image_digest(padded, key.algorithm)
        blocks.append(sbv2.signature_block(key.algorithm, key.public_der, digest, key.sign_raw(digest)))
    return padded, blocks


def with_crc(block: bytes) -> bytes:
    return block[: sbv2.CRC_OFFSET] + struct.pack("<I", zlib.crc32(block[: sbv2.CRC_OFFSET])) + block[1200:]


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


# --- layout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "padded"), [(0, 0), (1, 4096), (4095, 4096), (4096, 4096), (4097, 8192)])
def test_pad_image(length: int, padded: int) -> None:
    result = sbv2.pad_image(b"\x00" * length)
    assert len(result) == padded
    assert result[length:] == b"\xff" * (padded - length)


def test_image_digest_is_sha256_or_sha384_of_the_padded_image() -> None:
    padded = sbv2.pad_image(b"abc")
    assert sbv2.image_digest(padded, RSA) == hashlib.sha256(padded).digest()
    assert sbv2.image_digest(padded, P256) == hashlib.sha256(padded).digest()
    assert sbv2.image_digest(padded, P384) == hashlib.sha384(padded).digest()
    with pytest.raises(ValueError, match="not padded"):
        sbv2.image_digest(b"abc", RSA)


def test_rsa_block_layout() -> None:
    key = keys(RSA)[0]
    padded, (block,) = sign(b"\x5a" * 5000, (key,))
    numbers = key.private.public_key().public_numbers()
    assert isinstance(numbers, rsa.RSAPublicNumbers)
    n = numbers.n
    assert len(block) == 1216
    assert block[:4] == b"\xe7\x02\x00\x00"
    assert block[4:36] == hashlib.sha256(padded).digest()
    assert int.from_bytes(block[36:420], "little") == n
    assert struct.unpack_from("<I", block, 420)[0] == numbers.e == 65537
    r = int.from_bytes(block[424:808], "little")
    assert r == pow(2, 6144, n)
    (m_prime,) = struct.unpack_from("<I", block, 808)
    assert (n * m_prime) % 2**32 == 2**32 - 1  # M' = -n^-1 mod 2^32
    signature = block[812:1196][::-1]
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    public = key.private.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, block[4:36], pss, utils.Prehashed(hashes.SHA256()))
    assert struct.unpack_from("<I", block, 1196)[0] == zlib.crc32(block[:1196])
    assert block[1200:] == bytes(16)


@pytest.mark.parametrize(
    ("algorithm", "sha_type", "digest_size", "curve_id", "size"), [(P256, 0, 32, 2, 32), (P384, 1, 48, 3, 48)]
)
def test_ecdsa_block_layout(
    algorithm: Algorithm, sha_type: int, digest_size: int, curve_id: int, size: int
) -> None:
    key = keys(algorithm)[0]
    padded, (block,) = sign(b"\x5a" * 5000, (key,))
    numbers = key.private.public_key().public_numbers()
    assert isinstance(numbers, ec.EllipticCurvePublicNumbers)
    digest = hashlib.new("sha384" if digest_size == 48 else "sha256", padded).digest()
    assert block[:4] == bytes([0xE7, 3, sha_type, 0])
    assert block[4 : 4 + digest_size] == digest
    at = 4 + digest_size
    assert block[at] == curve_id
    assert int.from_bytes(block[at + 1 : at + 1 + size], "little") == numbers.x
    assert int.from_bytes(block[at + 1 + size : at + 1 + 2 * size], "little") == numbers.y
    at += 1 + 2 * size
    r = int.from_bytes(block[at : at + size], "little")
    s = int.from_bytes(block[at + size : at + 2 * size], "little")
    curve_hash = hashes.SHA384() if digest_size == 48 else hashes.SHA256()
    public = key.private.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(curve_hash)))
    assert block[at + 2 * size : 1196] == bytes(1196 - at - 2 * size)
    assert struct.unpack_from("<I", block, 1196)[0] == zlib.crc32(block[:1196])
    assert block[1200:] == bytes(16)


def test_signature_sector_layout() -> None:
    blocks = [bytes([i]) * 1216 for i in (1, 2, 3)]
    sector = sbv2.signature_sector(blocks)
    assert len(sector) == 4096
    assert sector[:1216] == blocks[0] and sector[1216:2432] == blocks[1] and sector[2432:3648] == blocks[2]
    assert sector[3648:] == b"\xff" * (4096 - 3648)
    assert sbv2.signature_sector(blocks[:1])[1216:] == b"\xff" * (4096 - 1216)


@pytest.mark.parametrize("count", [0, 4])
def test_signature_sector_holds_one_to_three_blocks(count: int) -> None:
    with pytest.raises(ValueError, match="1 to 3 blocks"):
        sbv2.signature_sector([bytes(1216)] * count)


def test_signature_sector_refuses_a_short_block() -> None:
    with pytest.raises(ValueError, match="1216 bytes"):
        sbv2.signature_sector([bytes(1215)])


def test_signature_block_checks_its_inputs() -> None:
    rsa_key, p256_key = keys(RSA)[0], keys(P256)[0]
    with pytest.raises(ValueError, match="32-byte digest"):
        sbv2.signature_block(P256, p256_key.public_der, bytes(48), bytes(64))
    with pytest.raises(ValueError, match="must be 64 bytes, got 65"):
        sbv2.signature_block(P256, p256_key.public_der, bytes(32), bytes(65))
    with pytest.raises(InvalidArgument, match="not a ecdsa-p256 key"):
        sbv2.signature_block(P256, rsa_key.public_der, bytes(32), bytes(64))


# --- key digests: equal to espsecure digest-sbv2-public-key --------------------------------------------


def _recorded_digests() -> dict[str, bytes]:
    lines = (VECTORS / "espsecure-key-digests.txt").read_text().splitlines()
    return {name: bytes.fromhex(value) for name, value in (line.split() for line in lines)}


ALL_KEYS = [key for algorithm in (RSA, P256, P384) for key in keys(algorithm)]


def test_key_digest_matches_recorded_espsecure_output() -> None:
    recorded = _recorded_digests()
    for key in ALL_KEYS:
        assert sbv2.key_digest(key.algorithm, key.public_der) == recorded[key.name], key.name


def test_key_digest_matches_espsecure_live(tmp_path: Path) -> None:
    outputs = [tmp_path / f"{key.name}.digest" for key in ALL_KEYS]
    results = run_all(
        [
            ("espsecure", "digest-sbv2-public-key", "--keyfile", str(key.pub_pem), "-o", str(out))
            for key, out in zip(ALL_KEYS, outputs, strict=True)
        ]
    )
    for key, out, result in zip(ALL_KEYS, outputs, results, strict=True):
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == sbv2.key_digest(key.algorithm, key.public_der), key.name


def test_key_digest_covers_the_blocks_key_fields() -> None:
    for algorithm, key_fields in [(RSA, slice(36, 812)), (P256, slice(36, 101)), (P384, slice(52, 149))]:
        key = keys(algorithm)[0]
        _, (block,) = sign(b"x", (key,))
        assert sbv2.key_digest(algorithm, key.public_der) == hashlib.sha256(block[key_fields]).digest()


# --- espsecure verify-signature accepts what we assemble ----------------------------------------------


@dataclass(frozen=True)
class Verification:
    label: str
    data: bytes
    key: SoftKey
    should_pass: bool


def _write_and_verify(tmp_path: Path, cases: list[Verification], *, batched: bool = False) -> None:
    """Run ``espsecure verify-signature`` on each case; ``batched`` runs many per process (same verdicts)."""
    commands = []
    for n, case in enumerate(cases):
        path = tmp_path / f"{n}.bin"
        path.write_bytes(case.data)
        commands.append(["verify-signature", "--version", "2", "--keyfile", str(case.key.pub_pem), str(path)])
    if batched:
        codes = exit_codes("espsecure", commands)
    else:
        codes = [result.returncode for result in run_all([("espsecure", *command) for command in commands])]
    wrong = [
        f"{case.label}: espsecure exit {code}, expected {'0' if case.should_pass else 'failure'}"
        for case, code in zip(cases, codes, strict=True)
        if (code == 0) != case.should_pass
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("algorithm", [RSA, P256, P384], ids=lambda a: a.value)
def test_espsecure_verifies_one_two_and_three_blocks(algorithm: Algorithm, tmp_path: Path) -> None:
    image = build_app_image(CHIP_FOR[algorithm], 10_000, seed=1)
    other = keys(P256 if algorithm is not P256 else RSA)[0]
    cases = []
    for count in (1, 2, 3):
        signers = keys(algorithm)[:count]
        padded, blocks = sign(image, signers)
        signed = padded + sbv2.signature_sector(blocks)
        cases += [Verification(f"{count} blocks, key {key.name}", signed, key, True) for key in signers]
        outsider = keys(algorithm)[count] if count < 3 else other
        cases.append(Verification(f"{count} blocks, unrelated key {outsider.name}", signed, outsider, False))
    _write_and_verify(tmp_path, cases)


def _block_positions(algorithm: Algorithm) -> dict[str, int]:
    """Sample offsets inside a block, by field."""
    if algorithm is RSA:
        return {
            "magic": 0, "version": 1, "digest[0]": 4, "digest[-1]": 35, "n[0]": 36, "n[-1]": 419, "e": 420,
            "R": 424, "M'": 808, "signature[0]": 812, "signature[-1]": 1195, "crc[0]": 1196, "crc[-1]": 1199,
        }  # fmt: skip
    ds, size = (32, 32) if algorithm is P256 else (48, 48)
    key_at = 4 + ds
    sig_at = key_at + 1 + 2 * size
    return {
        "magic": 0, "version": 1, "sha type": 2, "digest[0]": 4, "digest[-1]": 3 + ds, "curve id": key_at,
        "X[0]": key_at + 1, "Y[-1]": key_at + 2 * size, "r[0]": sig_at, "s[-1]": sig_at + 2 * size - 1,
        "zero area": 1000, "crc[0]": 1196, "crc[-1]": 1199,
    }  # fmt: skip


@pytest.mark.parametrize("algorithm", [RSA, P256, P384], ids=lambda a: a.value)
def test_single_byte_flips(algorithm: Algorithm, tmp_path: Path) -> None:
    """Which flips espsecure must refuse, and which it cannot see.

    espsecure skips a block whose magic, version or CRC-32 is wrong and passes if ANY remaining block
    verifies with the supplied key, so with three blocks only damage to the image or to the key's own block
    must fail. It aborts on the first CRC-valid block whose digest differs from the image. It verifies with
    the supplied key, not the block's, and ignores R and M': a key-field flip with a repaired CRC passes
    espsecure (the bootloader would refuse it: the key digest no longer matches eFuse), so ``verify_block``
    must catch those. The 16 zero bytes after the CRC and the sector's 0xFF fill are covered by nothing.
    """
    image = build_app_image(CHIP_FOR[algorithm], 9000, seed=2)
    signers = keys(algorithm)
    padded, blocks = sign(image, signers)
    cases: list[Verification] = []
    for count in (1, 3):
        sector = sbv2.signature_sector(blocks[:count])
        signed = padded + sector
        own = count - 1  # verify with the key of the last block
        key = signers[own]
        base = len(padded) + own * sbv2.BLOCK_SIZE
        for label, at in {
            "body[0]": 0,
            "body[middle]": len(image) // 2,
            "padding[-1]": len(padded) - 1,
        }.items():
            cases.append(Verification(f"{count} blocks, {label}", flip(signed, at), key, False))
        for field, at in _block_positions(algorithm).items():
            cases.append(
                Verification(f"{count} blocks, own block {field}", flip(signed, base + at), key, False)
            )
        cases.append(Verification(f"{count} blocks, trailing zeros", flip(signed, base + 1205), key, True))
        cases.append(Verification(f"{count} blocks, 0xFF fill", flip(signed, len(signed) - 1), key, True))
        if count == 3:
            for other in (0, 1):
                at = len(padded) + other * sbv2.BLOCK_SIZE + 40
                cases.append(Verification(f"3 blocks, block {other} body", flip(signed, at), key, True))
            repaired = with_crc(flip(blocks[0], 4))
            cases.append(
                Verification(
                    "3 blocks, block 0 digest with repaired CRC",
                    padded + sbv2.signature_sector([repaired, *blocks[1:3]]),
                    key,
                    False,
                )
            )
    # Flips behind a repaired CRC: espsecure sees digest and signature damage, not key-field damage.
    positions = _block_positions(algorithm)
    for field in positions:
        if field in ("magic", "version", "sha type", "curve id", "crc[0]", "crc[-1]", "zero area"):
            continue
        damaged = with_crc(flip(blocks[0], positions[field]))
        visible = field.startswith(("digest", "signature", "r[", "s["))
        signed = padded + sbv2.signature_sector([damaged])
        cases.append(Verification(f"1 block, {field} with repaired CRC", signed, signers[0], not visible))
        assert not sbv2.verify_block(damaged, sbv2.image_digest(padded, algorithm), signers[0].public_der), (
            field
        )
    _write_and_verify(tmp_path, cases, batched=True)


def test_batched_verdicts_agree_with_the_console_script(tmp_path: Path) -> None:
    key = keys(P256)[0]
    padded, blocks = sign(b"app", (key,))
    signed = padded + sbv2.signature_sector(blocks)
    cases = [Verification("good", signed, key, True), Verification("bad", flip(signed, 7), key, False)]
    _write_and_verify(tmp_path, cases)
    _write_and_verify(tmp_path, cases, batched=True)


# --- espsecure builds the same blocks from the same signatures ------------------------------------------


@pytest.mark.parametrize("algorithm", [RSA, P256, P384], ids=lambda a: a.value)
def test_espsecure_builds_identical_blocks_from_our_signatures(algorithm: Algorithm, tmp_path: Path) -> None:
    """espsecure's pre-computed path (``--pub-key --signature``) and ours produce the same sector."""
    padded = sbv2.pad_image(build_app_image(CHIP_FOR[algorithm], 7000, seed=4))
    digest = sbv2.image_digest(padded, algorithm)
    signers = keys(algorithm)
    raws = [key.sign_raw(digest) for key in signers]
    (tmp_path / "image.bin").write_bytes(padded)
    signature_files = []
    for n, raw in enumerate(raws):
        if algorithm is RSA:
            encoded = raw  # espsecure takes the raw big-endian RSA-PSS signature
        else:
            half = len(raw) // 2
            encoded = utils.encode_dss_signature(
                int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
            )
        signature_files.append(tmp_path / f"sig{n}.bin")
        signature_files[-1].write_bytes(encoded)
    (result,) = run_all(
        [
            (
                "espsecure", "sign-data", "--version", "2",
                "--pub-key", *[str(key.pub_pem) for key in signers],
                "--signature", *[str(path) for path in signature_files],
                "--output", str(tmp_path / "signed.bin"), str(tmp_path / "image.bin"),
            )
        ]
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    theirs = (tmp_path / "signed.bin").read_bytes()
    ours = [
        sbv2.signature_block(algorithm, key.public_der, digest, raw)
        for key, raw in zip(signers, raws, strict=True)
    ]
    assert theirs == padded + sbv2.signature_sector(ours)


@pytest.mark.parametrize("algorithm", [RSA, P256, P384], ids=lambda a: a.value)
def test_we_parse_and_verify_blocks_espsecure_signed(algorithm: Algorithm, tmp_path: Path) -> None:
    padded = sbv2.pad_image(build_app_image(CHIP_FOR[algorithm], 7000, seed=5))
    (tmp_path / "image.bin").write_bytes(padded)
    signers = keys(algorithm)[:2]
    (result,) = run_all(
        [
            (
                "espsecure", "sign-data", "--version", "2",
                "--keyfile", *[str(VECTORS / f"{key.name}.pem") for key in signers],
                "--output", str(tmp_path / "signed.bin"), str(tmp_path / "image.bin"),
            )
        ]
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    signed = (tmp_path / "signed.bin").read_bytes()
    assert signed[:-4096] == padded
    digest = sbv2.image_digest(padded, algorithm)
    parsed = sbv2.parse_signature_sector(signed[-4096:])
    assert [p.index for p in parsed] == [0, 1]
    for block, key in zip(parsed, signers, strict=True):
        assert block.algorithm is algorithm
        assert block.image_digest == digest
        assert block.public_key_der == key.public_der
        assert block.key_digest == sbv2.key_digest(algorithm, key.public_der)
        raw_block = signed[-4096 + block.index * 1216 :][:1216]
        assert sbv2.verify_block(raw_block, digest, key.public_der)


# --- parsing and verifying our own sectors -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", [RSA, P256, P384], ids=lambda a: a.value)
def test_parse_round_trip(algorithm: Algorithm) -> None:
    signers = keys(algorithm)
    padded, blocks = sign(b"firmware" * 100, signers)
    digest = sbv2.image_digest(padded, algorithm)
    parsed = sbv2.parse_signature_sector(sbv2.signature_sector(blocks))
    assert len(parsed) == 3
    for index, (block, key, raw_block) in enumerate(zip(parsed, signers, blocks, strict=True)):
        assert block.index == index
        assert block.algorithm is algorithm
        assert block.image_digest == digest
        assert block.public_key_der == key.public_der
        assert block.key_digest == sbv2.key_digest(algorithm, key.public_der)
        assert block.crc == struct.unpack_from("<I", raw_block, 1196)[0]
        assert sbv2.signature_block(algorithm, key.public_der, digest, block.raw_signature) == raw_block
        assert sbv2.verify_block(raw_block, digest, key.public_der)


def test_parse_stops_at_the_first_slot_without_magic() -> None:
    assert sbv2.parse_signature_sector(b"\xff" * 4096) == []
    _, (block,) = sign(b"x", keys(P256)[:1])
    assert len(sbv2.parse_signature_sector(block + b"\xff" * 1216 + block + b"\xff" * (4096 - 3 * 1216))) == 1


def _sector_with(block: bytes) -> bytes:
    return sbv2.signature_sector([block])


def _damaged_rsa_r() -> bytes:
    _, (block,) = sign(b"x", keys(RSA)[:1])
    return with_crc(flip(block, 500))


def _ecdsa_point_off_curve() -> bytes:
    _, (block,) = sign(b"x", keys(P256)[:1])
    return with_crc(flip(block, 37))


def _ecdsa(**changes: int) -> bytes:
    _, (block,) = sign(b"x", keys(P256)[:1])
    edited = bytearray(block)
    for offset, value in changes.items():
        edited[int(offset.removeprefix("at"))] = value
    return with_crc(bytes(edited))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: flip(sign(b"x", keys(P256)[:1])[1][0], 1196),
            r"signature block 0 \(sector offset 0\): CRC-32 is 0x",
        ),
        (lambda: flip(sign(b"x", keys(RSA)[:1])[1][0], 700), r"CRC-32 is 0x[0-9a-f]{8}, expected 0x"),
        (lambda: _ecdsa(at1=4), r"unknown version 4, expected 2 or 3"),
        (lambda: _ecdsa(at2=7), r"unknown ECDSA digest type 7"),
        (lambda: _ecdsa(at36=3), r"curve id 3 does not match digest type 0"),
        (lambda: _ecdsa(at36=1), r"curve id 1 does not match"),
        (_damaged_rsa_r, r"the RSA constants R and M' do not match the modulus"),
        (_ecdsa_point_off_curve, r"the public key in the block is not a valid key"),
    ],
)
def test_parse_refuses_malformed_blocks(make: object, message: str) -> None:
    assert callable(make)
    with pytest.raises(InvalidImage, match=message) as caught:
        sbv2.parse_signature_sector(_sector_with(make()))
    assert caught.type is InvalidImage


def test_parse_refuses_a_sector_of_the_wrong_size() -> None:
    with pytest.raises(InvalidImage, match="4096 bytes, got 4095"):
        sbv2.parse_signature_sector(bytes(4095))


def test_verify_block_refuses_the_wrong_key_digest_or_signature() -> None:
    key_a, key_b = keys(P256)[:2]
    padded, (block,) = sign(b"app", (key_a,))
    digest = sbv2.image_digest(padded, P256)
    assert sbv2.verify_block(block, digest, key_a.public_der)
    assert not sbv2.verify_block(block, digest, key_b.public_der)  # another key
    assert not sbv2.verify_block(block, hashlib.sha256(b"other").digest(), key_a.public_der)  # another image
    assert not sbv2.verify_block(block, digest, keys(RSA)[0].public_der)  # another algorithm
    assert not sbv2.verify_block(block, digest, b"not DER")
    assert not sbv2.verify_block(block[:-1], digest, key_a.public_der)
    assert not sbv2.verify_block(flip(block, 1210), digest, key_a.public_der)  # trailing zeros
    # A fault: the HSM signed with key B, the block claims key A.
    forged = sbv2.signature_block(P256, key_a.public_der, digest, key_b.sign_raw(digest))
    assert not sbv2.verify_block(forged, digest, key_a.public_der)
    # A fault: the HSM returned a signature of another digest.
    wrong = sbv2.signature_block(
        P256, key_a.public_der, digest, key_a.sign_raw(hashlib.sha256(b"?").digest())
    )
    assert not sbv2.verify_block(wrong, digest, key_a.public_der)


@pytest.mark.parametrize("algorithm", [RSA, P256, P384], ids=lambda a: a.value)
def test_verify_block_refuses_every_single_byte_change(algorithm: Algorithm) -> None:
    """Unlike espsecure, the guard sees every byte: trailing zeros, key fields, R and M' included."""
    key = keys(algorithm)[0]
    padded, (block,) = sign(b"app", (key,))
    digest = sbv2.image_digest(padded, algorithm)
    assert sbv2.verify_block(block, digest, key.public_der)
    for offset in range(sbv2.BLOCK_SIZE):
        changed = bytearray(block)
        changed[offset] ^= 0x80
        assert not sbv2.verify_block(bytes(changed), digest, key.public_der), offset
        if not sbv2.CRC_OFFSET <= offset < sbv2.CRC_OFFSET + 4:  # repairing the CRC would undo the change
            assert not sbv2.verify_block(with_crc(bytes(changed)), digest, key.public_der), offset


def test_verify_block_refuses_a_corrupted_rsa_signature() -> None:
    key = keys(RSA)[0]
    padded = sbv2.pad_image(b"app")
    digest = sbv2.image_digest(padded, RSA)
    raw = bytearray(key.sign_raw(digest))
    raw[100] ^= 0x40
    block = sbv2.signature_block(RSA, key.public_der, digest, bytes(raw))
    assert not sbv2.verify_block(block, digest, key.public_der)
    oversized = sbv2.signature_block(RSA, key.public_der, digest, b"\xff" * 384)  # larger than n
    assert not sbv2.verify_block(oversized, digest, key.public_der)


_SECTOR = sbv2.signature_sector(sign(b"firmware", keys(P256)[:2])[1] + sign(b"firmware", keys(RSA)[:1])[1])


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=4),
    fix=st.booleans(),
)
def test_damaged_sectors_raise_only_invalid_image(edits: list[tuple[int, int]], fix: bool) -> None:
    sector = bytearray(_SECTOR)
    for offset, value in edits:
        sector[offset] = value
    if fix:  # repair every CRC so that the damage reaches the field checks
        for index in range(3):
            start = index * 1216
            sector[start : start + 1216] = with_crc(bytes(sector[start : start + 1216]))
    try:
        sbv2.parse_signature_sector(bytes(sector))
    except InvalidImage as e:
        assert type(e) is InvalidImage
    digest = sbv2.image_digest(sbv2.pad_image(b"firmware"), P256)
    assert isinstance(sbv2.verify_block(bytes(sector[:1216]), digest, keys(P256)[0].public_der), bool)
