"""Every signature the HSM made for ``SignImage`` is a recorded key use, released or not.

``SigningService.sign_image`` on a real SQLite file (keys, releases, slot revocations) with a software HSM
whose P-256 keys really sign (``tests.support.fake_admin.SoftwareHsm``) and a ``SignatureLog`` fake that
keeps what is appended. The refusals are real ones: a slot revoked while the image is being signed (the
store's commit check, ``kms.domain.sbv2_slots.check_release_keys``), a later key's signature failing, and a
concurrent identical request whose release was stored first.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from kms.domain.errors import FailedPrecondition, HsmUnavailable
from kms.domain.identity import Caller, Role
from kms.domain.keys import Algorithm, KeyPurpose
from kms.domain.releases import Release, SignatureRecord
from kms.service.keys import KeyAdministration
from kms.service.sbv2_slots import SecureBootSlots
from kms.service.signing import SigningService
from kms.store.blobs import BlobStore
from kms.store.database import Database
from kms.store.keys import SqliteKeyRepository
from kms.store.releases import SqliteReleaseRepository
from kms.store.sbv2_slots import SqliteSlotRevocationRepository
from tests.support.esp_images import build_app_image
from tests.support.fake_admin import T0, SoftwareHsm

PRODUCT = "thermo"
BUILDER = Caller("spiffe://kms.dev/build-server/ci", Role.BUILD_SERVER)
OFFICER = Caller("spiffe://kms.dev/security-officer/alice", Role.SECURITY_OFFICER)
IMAGE = build_app_image("esp32c6", 4096, secure_version=1)
INPUT = hashlib.sha256(IMAGE).hexdigest()


class RecordingLog:
    """A ``SignatureLog`` that keeps every record appended."""

    def __init__(self) -> None:
        self.records: list[SignatureRecord] = []

    def append(self, record: SignatureRecord) -> None:
        self.records.append(record)


class HookedHsm(SoftwareHsm):
    """``SoftwareHsm`` that runs ``before_sign(n)`` before its n-th signature (1, 2, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.signed = 0
        self.before_sign: Callable[[int], None] = lambda n: None

    def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        self.signed += 1
        self.before_sign(self.signed)
        return super().sign_digest(hsm_id, algorithm, digest)


class Env:
    def __init__(self, database: Database, tmp_path: Path) -> None:
        self.database = database
        self.hsm = HookedHsm()
        self.keys = SqliteKeyRepository(database)
        self.releases = SqliteReleaseRepository(database, BlobStore(tmp_path / "blobs"))
        self.revocations = SqliteSlotRevocationRepository(database)
        self.log = RecordingLog()
        admin = KeyAdministration(self.hsm, self.keys, lambda: T0)
        for slot in (0, 1):
            admin.create_key(
                f"thermo-sbv2-{slot}", PRODUCT, KeyPurpose.SECURE_BOOT_V2, Algorithm.ECDSA_P256_SHA256, slot
            )
        self.signing = self.signing_service(self.releases)

    def signing_service(self, releases: SqliteReleaseRepository) -> SigningService:
        return SigningService(
            self.hsm,
            self.keys,
            releases,
            self.log,
            max_image_size=1 << 20,
            clock=lambda: T0,
            slot_revocations=self.revocations,
        )

    def stored_key_uses(self) -> int:
        with self.database.snapshot() as session:
            row = session.row("SELECT count(*) AS n FROM signatures")
        assert row is not None
        return row.integer("n")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Database.open(tmp_path / "kms.db") as database:
        yield Env(database, tmp_path)


def _uses(records: Sequence[SignatureRecord]) -> list[tuple[str, str, str]]:
    return [(r.caller, r.operation, r.key_version) for r in records]


BOTH = [
    (BUILDER.identity, "sign-image", "keys/thermo-sbv2-0/versions/1"),
    (BUILDER.identity, "sign-image", "keys/thermo-sbv2-1/versions/1"),
]


def test_a_release_refused_at_commit_still_records_its_key_uses(env: Env) -> None:
    """Slot 1 is revoked after this call read the slots and before it commits: the store refuses the release
    and rolls back its records, so the service appends them to the signature log before refusing."""

    def revoke_slot_1(n: int) -> None:
        if n == 2:
            slots = SecureBootSlots(env.keys, env.revocations, changed=env.signing.slots_changed)
            slots.revoke(OFFICER, PRODUCT, 1, "req-1")

    env.hsm.before_sign = revoke_slot_1
    with pytest.raises(FailedPrecondition, match="was revoked while this image was being signed"):
        env.signing.sign_image(BUILDER, PRODUCT, IMAGE)

    assert _uses(env.log.records) == BOTH
    (subject,) = {r.subject for r in env.log.records}
    assert subject.startswith("releases/") and subject.endswith(" (not released)")
    assert env.stored_key_uses() == 0, "nothing of the refused release was committed"
    assert all(len(r.digest) == 32 for r in env.log.records)

    env.hsm.before_sign = lambda n: None
    signed = env.signing.sign_image(BUILDER, PRODUCT, IMAGE)  # again: slot 0 only, recorded with it
    assert signed.release.key_versions == ("keys/thermo-sbv2-0/versions/1",)
    assert env.stored_key_uses() == 1 and len(env.log.records) == 2


def test_signatures_made_before_a_later_key_fails_are_recorded(env: Env) -> None:
    def unavailable(n: int) -> None:
        if n == 2:
            raise HsmUnavailable("the HSM cannot be reached (fake)")

    env.hsm.before_sign = unavailable
    with pytest.raises(HsmUnavailable):
        env.signing.sign_image(BUILDER, PRODUCT, IMAGE)
    assert _uses(env.log.records) == BOTH[:1]
    assert env.log.records[0].subject == f"image {INPUT} of product {PRODUCT} (not released)"
    assert env.stored_key_uses() == 0


def test_the_key_uses_of_a_call_that_lost_the_race_are_recorded(env: Env, tmp_path: Path) -> None:
    """Two identical requests sign at once; the store keeps the first release and returns it to the second,
    whose own signatures are then recorded through the log (the store did not take them)."""
    other = env.signing_service(SqliteReleaseRepository(env.database, BlobStore(tmp_path / "blobs")))
    first: list[Release] = []

    def concurrent_identical_request(n: int) -> None:
        if n == 1:
            env.hsm.before_sign = lambda n: None
            first.append(other.sign_image(BUILDER, PRODUCT, IMAGE).release)

    env.hsm.before_sign = concurrent_identical_request
    signed = env.signing.sign_image(BUILDER, PRODUCT, IMAGE)

    assert signed.reused and signed.release == first[0]
    assert env.stored_key_uses() == 2, "the first call's records, committed with its release"
    assert _uses(env.log.records) == BOTH
    (subject,) = {r.subject for r in env.log.records}
    own, _, rest = subject.partition(" ")
    assert re.fullmatch("releases/[0-9a-f]{64}", own) and own != first[0].name, "its own (randomized) release"
    assert rest == f"(not released: {first[0].name} was)"


class CorruptingHsm(HookedHsm):
    """Signs, then returns a signature with one bit flipped (the service's check must catch it)."""

    def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        good = super().sign_digest(hsm_id, algorithm, digest)
        return bytes([good[0] ^ 1]) + good[1:]


def test_a_digest_signature_that_fails_its_check_is_still_a_recorded_key_use(env: Env) -> None:
    from kms.domain.keys import HashAlgorithm
    from kms.domain.signatures import SignatureEncoding

    env.hsm = CorruptingHsm()
    KeyAdministration(env.hsm, env.keys, lambda: T0).create_key(
        "thermo-digest", PRODUCT, KeyPurpose.DIGEST_SIGNING, Algorithm.ECDSA_P256_SHA256, None
    )
    signing = env.signing_service(env.releases)
    digest = hashlib.sha256(b"firmware").digest()
    with pytest.raises(Exception, match="signature") as refused:
        signing.sign_digest(
            BUILDER, "keys/thermo-digest", digest, HashAlgorithm.SHA256, SignatureEncoding.RAW
        )
    assert not isinstance(refused.value, AssertionError)
    assert _uses(env.log.records) == [(BUILDER.identity, "sign-digest", "keys/thermo-digest/versions/1")]
    assert env.log.records[0].subject == f"{digest.hex()} (not returned: the signature failed its check)"
