"""The C reference decoder (``client/device-c``, mbedTLS) against the FKSP v1 vectors and tamper matrix.

The tool is built once per session with the project's Makefile (``-Werror``), plus once with AddressSanitizer
and UBSan. Every check compares the C decoder with two references: the expected verdicts of
``tests/support/sealed_tamper.py`` and the Python device decoder (``kmsctl.device.decode_stream``), down to
the exact plaintext each one let out before it stopped. ``fksp_tool`` runs with ``--keep-partial`` unless a
test says otherwise, so its output file shows everything the decoder wrote (what a device's inactive OTA
slot would hold).

These tests need gcc, make and the mbedTLS headers (Debian: ``libmbedtls-dev``); they fail without them,
unless ``KMS_ALLOW_SKIP_C=1`` is set, which turns the failure into a skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsctl.device import (
    DecodedManifest,
    DeviceContext,
    PayloadRejected,
    decode_stream,
    hmac_sha256,
    manifest_key_id,
    segment_nonce,
)
from tests.support.sealed_tamper import TamperCase, sign_raw, standard_context

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIR = REPO / "client" / "device-c"
VECTOR_DIR = REPO / "tests" / "vectors" / "sealed"
CHUNKS = (1, 7, 4096, 65536)
PREAMBLE_LEN = 384
# fksp_status codes (client/device-c/fksp.h), which are also fksp_tool's exit codes.
EXIT_CODES = {
    "ok": 0,
    "bad_header": 1,
    "bad_signature": 2,
    "wrong_device": 3,
    "wrong_chip": 4,
    "downgrade": 5,
    "bad_segment": 6,
    "truncated": 7,
    "trailing_data": 8,
    "bad_image_digest": 9,
    "internal_error": 10,
    "write_error": 11,
    "buffer_too_small": 12,
    "invalid_argument": 13,
}
EXIT_USAGE = 64
# Verdicts reached before any segment is decrypted: nothing may have been written.
PREAMBLE_VERDICTS = {"bad_header", "bad_signature", "wrong_device", "wrong_chip", "downgrade"}
# Sanitizer failures get exit codes no verdict uses (the default, 1, is bad_header's).
# Leaks are valgrind's job (LeakSanitizer needs ptrace, which some containers forbid).
SANITIZER_ENV = {
    "ASAN_OPTIONS": "exitcode=86:detect_leaks=0:abort_on_error=0",
    "UBSAN_OPTIONS": "exitcode=87:halt_on_error=1:print_stacktrace=1",
}


# ---- building ----------------------------------------------------------------------------------------------


def _toolchain_problem() -> str | None:
    compiler = shlex.split(os.environ.get("CC") or "gcc")
    if shutil.which("make") is None:
        return "make is not installed"
    if not compiler or shutil.which(compiler[0]) is None:
        return f"the C compiler {compiler[0] if compiler else '(empty CC)'} is not installed"
    probe = subprocess.run(
        [*compiler, "-E", "-x", "c", "-"],
        input="#include <mbedtls/gcm.h>\n#include <mbedtls/ecdsa.h>\n#include <mbedtls/sha256.h>\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return "the mbedTLS headers are missing (install libmbedtls-dev)"
    return None


def _build(build_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(SOURCE_DIR), f"BUILD={build_dir}", *extra],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="session")
def fksp_tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    problem = _toolchain_problem()
    if problem is not None:
        if os.environ.get("KMS_ALLOW_SKIP_C") == "1":
            pytest.skip(f"C decoder not built: {problem} (KMS_ALLOW_SKIP_C=1)")
        pytest.fail(f"C decoder cannot be built: {problem}; set KMS_ALLOW_SKIP_C=1 to skip these tests")
    build_dir = tmp_path_factory.mktemp("fksp-build")
    done = _build(build_dir)
    assert done.returncode == 0, f"make failed:\n{done.stdout}\n{done.stderr}"
    return build_dir / "fksp_tool"


@pytest.fixture(scope="session")
def fksp_tool_sanitized(fksp_tool: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    build_dir = tmp_path_factory.mktemp("fksp-build-sanitized")
    done = _build(build_dir, "SANITIZE=1")
    if done.returncode != 0 and "asan" in (done.stdout + done.stderr).lower():
        pytest.skip(f"the compiler has no AddressSanitizer runtime:\n{done.stderr}")
    assert done.returncode == 0, f"make SANITIZE=1 failed:\n{done.stdout}\n{done.stderr}"
    return build_dir / "fksp_tool"


# ---- running the tool and the Python reference -------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A device as fksp_tool is told about it. ``manifest_keys``: DER SubjectPublicKeyInfo or raw points."""

    secret: bytes
    device_id: str
    chip_id: int
    floor: int
    manifest_keys: tuple[bytes, ...]


@dataclass(frozen=True)
class Outcome:
    verdict: str
    written: bytes | None  # the output file's content; None if the tool left no file
    returncode: int = 0
    stderr: str = field(default="", compare=False)


def run_tool(
    tool: Path,
    device: Device,
    payload: bytes,
    tmp: Path,
    *,
    chunk: int | None = None,
    keep_partial: bool = True,
    seg_buf: int | None = None,
    out: Path | None = None,
    wrapper: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Outcome:
    payload_path, out = tmp / "payload.fksp", out or tmp / "image.bin"
    payload_path.write_bytes(payload)
    if out.is_file():
        out.unlink()
    args = [*wrapper, str(tool), "--secret-hex", device.secret.hex(), "--device-id", device.device_id]
    args += ["--chip-id", str(device.chip_id), "--floor", str(device.floor)]
    for i, key in enumerate(device.manifest_keys):
        key_path = tmp / f"manifest-key-{i}.bin"
        key_path.write_bytes(key)
        args += ["--manifest-key", str(key_path)]
    args += ["--in", str(payload_path), "--out", str(out)]
    if chunk is not None:
        args += ["--chunk", str(chunk)]
    if seg_buf is not None:
        args += ["--seg-buf", str(seg_buf)]
    if keep_partial:
        args.append("--keep-partial")
    done = subprocess.run(
        args, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    written = out.read_bytes() if out.is_file() else None
    return Outcome(done.stdout.strip(), written, done.returncode, done.stderr)


class _Recorder:
    """A ``kmsctl.device.Sink`` that keeps every plaintext byte the Python decoder lets out."""

    def __init__(self) -> None:
        self.data = bytearray()

    def begin(self, manifest: DecodedManifest) -> None:
        assert not self.data

    def write(self, offset: int, plaintext: bytes) -> None:
        assert offset == len(self.data)
        self.data += plaintext


def _public_key(encoded: bytes) -> ec.EllipticCurvePublicKey:
    if len(encoded) == 65:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), encoded)
    key = serialization.load_der_public_key(encoded)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def python_decode(device: Device, payload: bytes) -> Outcome:
    """The Python reference decoder's verdict and the plaintext it wrote before stopping."""
    keys = [_public_key(key) for key in device.manifest_keys]
    context = DeviceContext(
        device_id=device.device_id.encode(),
        chip_id=device.chip_id,
        floor=device.floor,
        manifest_keys={manifest_key_id(key): key for key in keys},
        efuse_hmac=lambda message: hmac_sha256(device.secret, message),
    )
    sink = _Recorder()
    try:
        decode_stream(payload, context, sink)
    except PayloadRejected as rejected:
        return Outcome(rejected.verdict.value, bytes(sink.data), EXIT_CODES[rejected.verdict.value])
    return Outcome("ok", bytes(sink.data))


def expected_outcome(reference: Outcome, *, keep_partial: bool = True) -> Outcome:
    """What fksp_tool must give for the Python decoder's ``reference``."""
    if reference.verdict != "ok" and not keep_partial:
        return replace(reference, written=None)
    return reference


# ---- inputs ------------------------------------------------------------------------------------------------


def standard_device() -> Device:
    context = standard_context()
    return Device(
        secret=context.device_secret,
        device_id=context.device_id,
        chip_id=context.chip_id,
        floor=context.floor,
        manifest_keys=(context.manifest_public_key_der,),
    )


def _untrusted_key_der() -> bytes:
    key = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class Vector:
    name: str
    device: Device
    image: bytes
    payload: bytes
    segment_size: int


def _vector_plaintext(spec: dict[str, Any]) -> bytes:
    """tests/vectors/sealed/README.md: hex, or SHA-256(seed || i as 4 bytes big-endian), i = 0, 1, ..."""
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    assert spec["recipe"] == "sha256-counter"
    seed, size = spec["seed"].encode(), spec["size"]
    blocks = (hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(-(-size // 32)))
    return b"".join(blocks)[:size]


def load_vector(path: Path) -> Vector:
    data = json.loads(path.read_text())
    inputs, mid = data["inputs"], data["intermediates"]
    image = _vector_plaintext(inputs["plaintext"])
    if "payload" in mid:
        payload = bytes.fromhex(mid["payload"])
    else:  # stored by SHA-256 only: rebuild it from the vector's own intermediates
        size_s, count = inputs["segment_size"], mid["segment_count"]
        aead = AESGCM(bytes.fromhex(mid["payload_key"]))
        segments = (
            aead.encrypt(segment_nonce(i, i == count - 1), image[i * size_s : (i + 1) * size_s], None)
            for i in range(count)
        )
        payload = bytes.fromhex(mid["header"] + mid["manifest"] + inputs["signature"]) + b"".join(segments)
    assert hashlib.sha256(payload).hexdigest() == mid["payload_sha256"], path.name
    device = Device(
        secret=bytes.fromhex(inputs["device_secret"]),
        device_id=inputs["device_id"],
        chip_id=inputs["chip_id"],
        floor=inputs["manifest"]["secure_version"],  # the floor at its boundary: equal is accepted
        manifest_keys=(bytes.fromhex(mid["manifest_public_key_der"]),),
    )
    return Vector(data["name"], device, image, payload, inputs["segment_size"])


VECTOR_PATHS = sorted(VECTOR_DIR.glob("*.json"))
MATRIX: list[TamperCase] = standard_context().cases()


def test_the_inputs_exist() -> None:
    assert len(VECTOR_PATHS) >= 5
    assert len(MATRIX) >= 50
    assert {case.verdict for case in MATRIX} == set(EXIT_CODES) - {
        "internal_error",
        "write_error",
        "buffer_too_small",
        "invalid_argument",
    }


# ---- vectors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", VECTOR_PATHS, ids=[path.stem for path in VECTOR_PATHS])
def test_vector_decodes_to_its_image_at_every_chunking(fksp_tool: Path, path: Path, tmp_path: Path) -> None:
    vector = load_vector(path)
    for chunk in CHUNKS:
        outcome = run_tool(fksp_tool, vector.device, vector.payload, tmp_path, chunk=chunk)
        assert outcome == Outcome("ok", vector.image), f"chunk {chunk}: {outcome.stderr}"
        segments = -(-len(vector.image) // vector.segment_size)
        assert f"ok: {segments} segment(s), {len(vector.image)} byte(s)" in outcome.stderr


@pytest.mark.parametrize("path", VECTOR_PATHS, ids=[path.stem for path in VECTOR_PATHS])
def test_vector_device_checks(fksp_tool: Path, path: Path, tmp_path: Path) -> None:
    """The device-dependent verdicts at their boundaries, on every vector's shape."""
    vector = load_vector(path)
    device = vector.device
    cases = {
        "downgrade": replace(device, floor=device.floor + 1),
        "wrong_chip": replace(device, chip_id=device.chip_id ^ 1),
        "wrong_device": replace(device, device_id=device.device_id[:-1] or "x"),
        "bad_signature": replace(device, manifest_keys=(_untrusted_key_der(),)),
        "bad_segment": replace(device, secret=bytes(32)),
    }
    for verdict, other in cases.items():
        assert run_tool(fksp_tool, other, vector.payload, tmp_path) == Outcome(
            verdict, b"", EXIT_CODES[verdict]
        )
        assert python_decode(other, vector.payload).verdict == verdict


# ---- the tamper matrix -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MATRIX, ids=[case.name for case in MATRIX])
def test_tamper_matrix(fksp_tool: Path, case: TamperCase, tmp_path: Path) -> None:
    """Each case gives its verdict at every chunking, and lets out exactly what the Python decoder does."""
    context, device = standard_context(), standard_device()
    reference = python_decode(device, case.payload)
    assert reference.verdict == case.verdict  # the two references agree
    assert reference.returncode == EXIT_CODES[case.verdict]

    # Only authenticated segments were let out: none before step 5, then whole segments of the image.
    assert reference.written is not None
    if case.verdict in PREAMBLE_VERDICTS:
        assert reference.written == b""
    else:
        assert context.image.startswith(reference.written)
        assert len(reference.written) % context.segment_size == 0 or reference.written == context.image

    for chunk in CHUNKS:
        outcome = run_tool(fksp_tool, device, case.payload, tmp_path, chunk=chunk)
        assert outcome == expected_outcome(reference), f"chunk {chunk}: {outcome.stderr}"
    # Without --keep-partial the output of a rejected payload is deleted.
    outcome = run_tool(fksp_tool, device, case.payload, tmp_path, keep_partial=False)
    assert outcome == expected_outcome(reference, keep_partial=False), outcome.stderr


def _mutants(payload: bytes, other: bytes, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Randomly damaged copies of ``payload``: bit flips, header fields, cuts, insertions, splices."""
    out: list[tuple[str, bytes]] = []
    for n in range(count):
        data = bytearray(payload)
        kind = n % 7
        if kind == 0:
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            at = rng.randrange(64)
            data[at] = rng.randrange(256)
        elif kind == 2:
            del data[rng.randrange(len(data) + 1) :]
        elif kind == 3:
            data += rng.randbytes(rng.randrange(1, 300))
        elif kind == 4:
            start = rng.randrange(len(data))
            del data[start : start + rng.randrange(1, 64)]
        elif kind == 5:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randrange(1, 40))
        else:
            start = rng.randrange(PREAMBLE_LEN, len(data))
            data[start : start + 50] = other[start : start + 50]
        out.append((f"mutant {n} kind {kind}", bytes(data)))
    return out


def _resigned_mutants(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Header or manifest bytes changed and then validly signed: exercises steps 1, 3 and the key binding."""
    context = standard_context()
    key = ec.derive_private_key(context.manifest_private_scalar, ec.SECP256R1())
    out: list[tuple[str, bytes]] = []
    for n in range(count):
        signed = bytearray(context.payload[:320])
        # Half the time a field a decoder interprets (header sizes; manifest sizes, versions, chip, lengths,
        # paddings, reserved bytes), otherwise any manifest byte.
        at = 64 + rng.randrange(256)
        if n % 2 == 0:
            at = rng.choice(
                [8, 9, 12, 16, 17, *(64 + i for i in (32, 33, 40, 41, 43, 44, 45, 46, 48, 112))]
                + [64 + i for i in (113, 176, 177, 209, 217, 218, 255)]
            )
        signed[at] = rng.choice([0, 1, 0x20, 0x7E, 0x7F, 0xFF, signed[at] ^ 1, rng.randrange(256)])
        payload = bytes(signed) + sign_raw(key, bytes(signed)) + context.payload[PREAMBLE_LEN:]
        out.append((f"re-signed mutant {n}: byte {at} = {signed[at]:#04x}", payload))
    return out


def test_random_damage_matches_the_python_decoder(fksp_tool: Path, tmp_path: Path) -> None:
    """Differential: random damage, including re-signed manifests, gives the same verdict and output."""
    context, device = standard_context(), standard_device()
    rng = random.Random(20260101)
    mutants = _mutants(context.payload, context.other_device_payload, rng, 140)
    mutants += _resigned_mutants(rng, 120)
    mismatches, verdicts = [], set()
    for name, payload in mutants:
        reference = python_decode(device, payload)
        verdicts.add(reference.verdict)
        chunk = rng.choice([*CHUNKS, rng.randrange(2, 600)])
        outcome = run_tool(fksp_tool, device, payload, tmp_path, chunk=chunk)
        if outcome != expected_outcome(reference):
            mismatches.append(f"{name} (chunk {chunk}): C {outcome.verdict}, Python {reference.verdict}")
    assert not mismatches, "\n".join(mismatches)
    # The mutants reached every verdict the standard device can give, except the ones needing a new image.
    assert verdicts >= {"ok", "bad_header", "bad_signature", "wrong_device", "wrong_chip", "downgrade"}
    assert verdicts >= {"bad_segment", "truncated", "trailing_data"}


# ---- sanitizers and valgrind -------------------------------------------------------------------------------


def test_sanitized_build_on_vectors_and_matrix(fksp_tool_sanitized: Path, tmp_path: Path) -> None:
    """ASan + UBSan (-fno-sanitize-recover) over every vector and every matrix case."""
    failures = []
    runs: list[tuple[str, Device, bytes, Outcome]] = []
    for path in VECTOR_PATHS:
        vector = load_vector(path)
        runs.append((path.stem, vector.device, vector.payload, Outcome("ok", vector.image)))
    for case in MATRIX:
        runs.append(
            (case.name, standard_device(), case.payload, python_decode(standard_device(), case.payload))
        )
    for name, device, payload, expected in runs:
        outcome = run_tool(fksp_tool_sanitized, device, payload, tmp_path, chunk=7, env=SANITIZER_ENV)
        if outcome != expected or "Sanitizer" in outcome.stderr or "runtime error" in outcome.stderr:
            failures.append(f"{name}: {outcome.verdict} ({outcome.returncode})\n{outcome.stderr}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "case_name",
    ["ok", "flip segment 1 tag first byte", "payload for another device", "truncate to 792 bytes"],
)
def test_valgrind_clean(fksp_tool: Path, case_name: str, tmp_path: Path) -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed")
    (case,) = [case for case in MATRIX if case.name == case_name]
    wrapper = [valgrind, "-q", "--error-exitcode=99", "--leak-check=full"]
    outcome = run_tool(fksp_tool, standard_device(), case.payload, tmp_path, chunk=7, wrapper=wrapper)
    assert outcome == expected_outcome(python_decode(standard_device(), case.payload)), outcome.stderr
    assert outcome.returncode == EXIT_CODES[case.verdict], outcome.stderr


# ---- what only the C tool has ------------------------------------------------------------------------------


def test_segment_buffer_limit(fksp_tool: Path, tmp_path: Path) -> None:
    """A device whose buffer is smaller than S + 16 refuses the body, but only after steps 1-3 passed."""
    vector = load_vector(VECTOR_DIR / "multi-segment-s65536.json")
    needed = vector.segment_size + 16
    too_small = run_tool(fksp_tool, vector.device, vector.payload, tmp_path, seg_buf=needed - 1)
    assert too_small == Outcome("buffer_too_small", b"", EXIT_CODES["buffer_too_small"])
    assert run_tool(fksp_tool, vector.device, vector.payload, tmp_path, seg_buf=needed) == Outcome(
        "ok", vector.image
    )
    # Spec verdicts of steps 1-3 come first.
    stranger = replace(vector.device, device_id="someone-else")
    assert run_tool(fksp_tool, stranger, vector.payload, tmp_path, seg_buf=272).verdict == "wrong_device"
    # A one-segment payload needs only its size + 16, however large S is.
    single = load_vector(VECTOR_DIR / "single-segment-s4096.json")
    assert len(single.image) + 16 <= 272 < single.segment_size + 16
    assert run_tool(fksp_tool, single.device, single.payload, tmp_path, seg_buf=272) == Outcome(
        "ok", single.image
    )


def test_write_failure_is_write_error(fksp_tool: Path, tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    context = standard_context()
    outcome = run_tool(fksp_tool, standard_device(), context.payload, tmp_path, out=Path("/dev/full"))
    assert (outcome.verdict, outcome.returncode) == ("write_error", EXIT_CODES["write_error"])


def test_manifest_key_forms_and_rotation(fksp_tool: Path, tmp_path: Path) -> None:
    context, device = standard_context(), standard_device()
    raw_point = _public_key(context.manifest_public_key_der).public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    ok = Outcome("ok", context.image)
    for keys in [
        (raw_point,),
        (_untrusted_key_der(), raw_point),
        (_untrusted_key_der(), *device.manifest_keys),
    ]:
        assert run_tool(fksp_tool, replace(device, manifest_keys=keys), context.payload, tmp_path) == ok
    untrusted_only = replace(device, manifest_keys=(_untrusted_key_der(),))
    assert run_tool(fksp_tool, untrusted_only, context.payload, tmp_path).verdict == "bad_signature"
    # Not a P-256 key: refused on the command line (exit 64, no verdict).
    for garbage in (b"", raw_point[:-1], b"\x04" + bytes(64), raw_point[:64] + bytes([raw_point[64] ^ 1])):
        bad = run_tool(fksp_tool, replace(device, manifest_keys=(garbage,)), context.payload, tmp_path)
        assert (bad.returncode, bad.verdict) == (EXIT_USAGE, ""), bad.stderr


def test_reads_stdin(fksp_tool: Path, tmp_path: Path) -> None:
    context, device = standard_context(), standard_device()
    (tmp_path / "key.der").write_bytes(context.manifest_public_key_der)
    args = [str(fksp_tool), "--secret-hex", device.secret.hex(), "--device-id", device.device_id]
    args += ["--chip-id", str(device.chip_id), "--floor", str(device.floor)]
    args += ["--manifest-key", str(tmp_path / "key.der"), "--in", "-", "--out", str(tmp_path / "out")]
    done = subprocess.run([*args, "--chunk", "1"], input=context.payload, capture_output=True, check=False)
    assert (done.returncode, done.stdout) == (0, b"ok\n"), done.stderr
    assert (tmp_path / "out").read_bytes() == context.image


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--secret-hex", "00" * 31],
        ["--chunk", "0"],
        ["--seg-buf", "100"],
        ["--chip-id", "65536"],
        ["--floor", "-1"],
        ["--device-id", "x" * 65],
        ["--bogus"],
    ],
    ids=[
        "nothing",
        "short-secret",
        "chunk-0",
        "small-seg-buf",
        "chip-id",
        "negative-floor",
        "long-id",
        "bogus",
    ],
)
def test_usage_errors(fksp_tool: Path, args: list[str], tmp_path: Path) -> None:
    (tmp_path / "key.der").write_bytes(standard_context().manifest_public_key_der)
    base = ["--secret-hex", "00" * 32, "--device-id", "d", "--chip-id", "9", "--floor", "0"]
    base += ["--manifest-key", str(tmp_path / "key.der"), "--in", "/dev/null", "--out", str(tmp_path / "o")]
    done = subprocess.run(
        [str(fksp_tool), *(base if args else []), *args], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout) == (EXIT_USAGE, "")
