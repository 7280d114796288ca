"""Making and serving rollover statements: ``KeyLifecycle`` rotations (on demand and scheduled), the store
(statement, version and key-use record in one transaction) and ``ManifestKeyRollovers.chain``, on a real
SQLite file with a software HSM whose P-256 keys really sign (``tests.support.fake_admin.SoftwareHsm``).

Every statement the service makes is checked with the device-side verifier (``kmsctl.device.rollover``),
which shares no code with the service.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from kms.domain import lifecycle, rollover
from kms.domain.errors import (
    FailedPrecondition,
    HsmFailure,
    HsmUnavailable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from kms.domain.identity import Caller, Role
from kms.domain.keys import Algorithm, Key, KeyPurpose, KeyVersionState
from kms.domain.releases import SignatureRecord
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import SCHEDULER, KeyLifecycle
from kms.service.rollover import ManifestKeyRollovers
from kms.store.database import Database
from kms.store.keys import SqliteKeyRepository
from kms.store.rollovers import SqliteRolloverRepository
from kmsctl.device.rollover import RolloverRejected, RolloverVerdict, verify_chain
from tests.support.fake_admin import T0, Clock, SoftwareHsm

OFFICER = Caller("spiffe://kms.dev/security-officer/alice", Role.SECURITY_OFFICER)
DISTRIBUTOR = Caller(
    "spiffe://kms.dev/distribution-server/d1", Role.DISTRIBUTION_SERVER, frozenset({"thermo"})
)
PRODUCT = "thermo"


class RecordingLog:
    """A ``SignatureLog`` that keeps what is appended (key uses whose change was not stored)."""

    def __init__(self) -> None:
        self.records: list[SignatureRecord] = []

    def append(self, record: SignatureRecord) -> None:
        self.records.append(record)


class Env:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.hsm = SoftwareHsm()
        self.clock = Clock()
        self.keys = SqliteKeyRepository(database)
        self.rollovers = SqliteRolloverRepository(database)
        self.log = RecordingLog()
        self.lifecycle = KeyLifecycle(self.hsm, self.keys, clock=self.clock, signature_log=self.log)
        self.admin = KeyAdministration(self.hsm, self.keys, self.clock)
        self.service = ManifestKeyRollovers(self.keys, self.rollovers)

    def manifest_key(self, product: str = PRODUCT) -> Key:
        key_id = f"{product}-manifest"
        return self.admin.create_key(
            key_id, product, KeyPurpose.OTA_MANIFEST, Algorithm.ECDSA_P256_SHA256, None
        )

    def key_id_of(self, key_id: str, version: int) -> bytes:
        return hashlib.sha256(self.keys.get_key(key_id).version(version).public_key_der).digest()

    def device_keys(self, key_id: str, version: int) -> dict[bytes, ec.EllipticCurvePublicKey]:
        der = self.keys.get_key(key_id).version(version).public_key_der
        public = serialization.load_der_public_key(der)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return {hashlib.sha256(der).digest(): public}

    def key_uses(self) -> list[tuple[str, str, str, bytes, str]]:
        with self.database.snapshot() as session:
            rows = session.rows(
                "SELECT caller, operation, key_version, digest, subject FROM signatures ORDER BY id"
            )
        return [
            (
                r.text("caller"),
                r.text("operation"),
                r.text("key_version"),
                r.blob("digest"),
                r.text("subject"),
            )
            for r in rows
        ]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Database.open(tmp_path / "kms.db") as database:
        yield Env(database)


def test_each_rotation_stores_a_statement_signed_by_the_previous_primary(env: Env) -> None:
    env.manifest_key()
    env.clock.now = T0 + timedelta(hours=1)
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    env.lifecycle.rotate(OFFICER, "thermo-manifest")

    stored = env.rollovers.list_rollovers("thermo-manifest")
    assert [(r.from_version, r.to_version, r.created_at) for r in stored] == [
        (1, 2, env.clock.now),
        (2, 3, env.clock.now),
    ]
    for record in stored:
        body = record.parsed().body
        assert body.product == PRODUCT
        assert (body.from_key_id, body.to_key_id) == (
            env.key_id_of("thermo-manifest", record.from_version),
            env.key_id_of("thermo-manifest", record.to_version),
        )
    after = verify_chain(
        [r.statement for r in stored], PRODUCT.encode(), env.device_keys("thermo-manifest", 1)
    )
    assert set(after) == {env.key_id_of("thermo-manifest", 3)}

    uses = env.key_uses()
    assert [(caller, operation, version, subject) for caller, operation, version, _d, subject in uses] == [
        (
            OFFICER.identity,
            "sign-key-rollover",
            "keys/thermo-manifest/versions/1",
            "keys/thermo-manifest/versions/2",
        ),
        (
            OFFICER.identity,
            "sign-key-rollover",
            "keys/thermo-manifest/versions/2",
            "keys/thermo-manifest/versions/3",
        ),
    ]
    assert [use[3] for use in uses] == [r.parsed().body.digest() for r in stored], (
        "the digest signed is recorded"
    )


def test_scheduled_rotations_make_statements_too(env: Env) -> None:
    env.manifest_key()
    env.lifecycle.set_rotation_schedule(OFFICER, "thermo-manifest", timedelta(days=1))
    result = env.lifecycle.rotate_due(T0 + timedelta(days=1))
    assert result.done == ("keys/thermo-manifest/versions/2",)
    (record,) = env.rollovers.list_rollovers("thermo-manifest")
    assert (record.from_version, record.to_version) == (1, 2)
    assert env.key_uses()[0][:3] == (SCHEDULER, "sign-key-rollover", "keys/thermo-manifest/versions/1")


def test_other_keys_get_no_statement(env: Env) -> None:
    env.admin.create_key("fw", PRODUCT, KeyPurpose.DIGEST_SIGNING, Algorithm.ECDSA_P256_SHA256, None)
    env.lifecycle.rotate(OFFICER, "fw")
    assert env.rollovers.list_rollovers("fw") == [] and env.key_uses() == []


def test_a_disabled_primary_signs_nothing_and_the_gap_is_named(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.manifest_key()
    env.lifecycle.set_state(OFFICER, "keys/thermo-manifest/versions/1", KeyVersionState.DISABLED)
    with caplog.at_level(logging.WARNING, logger="kms.lifecycle"):
        env.lifecycle.rotate(OFFICER, "thermo-manifest")
    assert "no rollover statement for keys/thermo-manifest/versions/2" in caplog.text
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    assert [(r.from_version, r.to_version) for r in env.rollovers.list_rollovers("thermo-manifest")] == [
        (2, 3)
    ]
    assert [use[2] for use in env.key_uses()] == ["keys/thermo-manifest/versions/2"], "v1 signed nothing"

    with pytest.raises(
        FailedPrecondition, match="has a gap: no statement introduces keys/thermo-manifest/versions/2"
    ):
        env.service.chain(DISTRIBUTOR, PRODUCT, env.key_id_of("thermo-manifest", 1))
    chain = env.service.chain(DISTRIBUTOR, PRODUCT, env.key_id_of("thermo-manifest", 2))
    assert [(r.from_version, r.to_version) for r in chain.statements] == [(2, 3)]


def test_chain_from_each_version_to_the_primary(env: Env) -> None:
    env.manifest_key()
    for _ in range(3):
        env.lifecycle.rotate(OFFICER, "thermo-manifest")
    for trusted, expected in ((1, [(1, 2), (2, 3), (3, 4)]), (3, [(3, 4)]), (4, [])):
        chain = env.service.chain(DISTRIBUTOR, PRODUCT, env.key_id_of("thermo-manifest", trusted))
        assert [(r.from_version, r.to_version) for r in chain.statements] == expected
        assert chain.current.name == "keys/thermo-manifest/versions/4"
        assert chain.current_key_id == env.key_id_of("thermo-manifest", 4)
        after = verify_chain(
            [r.statement for r in chain.statements],
            PRODUCT.encode(),
            env.device_keys("thermo-manifest", trusted),
        )
        assert set(after) == {chain.current_key_id}


def test_a_destroyed_version_still_links_the_chain(env: Env) -> None:
    env.manifest_key()
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    env.lifecycle.schedule_destroy(OFFICER, "keys/thermo-manifest/versions/2", delay=timedelta(hours=1))
    env.lifecycle.destroy_due(T0 + timedelta(hours=2))
    assert env.lifecycle.get("thermo-manifest").version(2).state is KeyVersionState.DESTROYED
    chain = env.service.chain(DISTRIBUTOR, PRODUCT, env.key_id_of("thermo-manifest", 1))
    assert [(r.from_version, r.to_version) for r in chain.statements] == [(1, 2), (2, 3)]


def test_the_primary_of_a_manifest_key_never_moves_back(env: Env) -> None:
    """Every path that could make an older version primary is refused and changes nothing, so every
    statement stays on one chain: any stored statement a device trusting an older key is replayed moves it
    along the chain that still leads to the primary (the replay of branch.py from the security review)."""
    env.manifest_key()
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    env.lifecycle.rotate(OFFICER, "thermo-manifest")  # v1 -> v2 -> v3, v3 primary, all enabled
    v = "keys/thermo-manifest/versions/{}".format
    before = env.keys.get_managed_key("thermo-manifest")
    refused: list[Callable[[], object]] = [
        lambda: env.lifecycle.set_primary(OFFICER, v(1)),
        lambda: env.lifecycle.set_primary(OFFICER, v(2)),
        lambda: env.lifecycle.set_state(OFFICER, v(3), KeyVersionState.DISABLED, new_primary=2),
        lambda: env.lifecycle.schedule_destroy(OFFICER, v(3), new_primary=1),
    ]
    for request in refused:
        with pytest.raises(FailedPrecondition, match="devices may already trust version 3 through its"):
            request()
    assert env.keys.get_managed_key("thermo-manifest") == before

    # the primary not enabled: enabling an older version would make it the primary, refused too
    for number in (1, 2, 3):
        env.lifecycle.set_state(OFFICER, v(number), KeyVersionState.DISABLED)
    with pytest.raises(FailedPrecondition, match="a manifest key moves forward only: rotate instead"):
        env.lifecycle.set_state(OFFICER, v(1), KeyVersionState.ENABLED)
    env.lifecycle.set_state(OFFICER, v(3), KeyVersionState.ENABLED)  # the primary itself: allowed
    env.lifecycle.rotate(OFFICER, "thermo-manifest")  # v4, signed by v3

    stored = env.rollovers.list_rollovers("thermo-manifest")
    assert [(r.from_version, r.to_version) for r in stored] == [(1, 2), (2, 3), (3, 4)]
    for first in range(len(stored)):  # a replay of any prefix of the chain leaves the device on it
        for last in range(first, len(stored)):
            trusted = verify_chain(
                [r.statement for r in stored[first : last + 1]],
                PRODUCT.encode(),
                env.device_keys("thermo-manifest", stored[first].from_version),
            )
            (key_id,) = trusted
            chain = env.service.chain(DISTRIBUTOR, PRODUCT, key_id)
            assert [r.to_version for r in chain.statements] == list(range(stored[last].to_version + 1, 5))


def test_moving_the_primary_forward_is_allowed(env: Env) -> None:
    """Forward-only does not mean primary-only: a primary left behind (data written before the rule) may be
    moved forward to a later enabled version."""
    env.manifest_key()
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    _move_primary_back_as_before_the_rule(env, 1)
    env.lifecycle.set_primary(OFFICER, "keys/thermo-manifest/versions/2")
    assert env.keys.get_key("thermo-manifest").primary_version == 2


def _move_primary_back_as_before_the_rule(env: Env, number: int) -> None:
    """Write a primary moved back straight into the store, as an earlier release of the service allowed."""
    managed = env.keys.get_managed_key("thermo-manifest")
    made_primary = lifecycle.Transition(
        "thermo-manifest",
        number,
        lifecycle.LifecycleEvent.MADE_PRIMARY,
        KeyVersionState.ENABLED,
        KeyVersionState.ENABLED,
        OFFICER.identity,
        env.clock.now,
    )
    env.keys.apply_change(
        lifecycle.LifecycleChange(
            "thermo-manifest",
            tuple((v.version, v.state) for v in managed.key.versions),
            managed.key.primary_version,
            number,
            transitions=(made_primary,),
        )
    )


def test_a_branch_left_by_a_primary_moved_back_before_the_rule_is_named(env: Env) -> None:
    """Keys whose primary was moved back before the rule keep their branch; the chain service names it."""
    env.manifest_key()
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    _move_primary_back_as_before_the_rule(env, 1)
    with pytest.raises(FailedPrecondition, match="versions/2 is not on the rollover chain of the primary"):
        env.service.chain(DISTRIBUTOR, PRODUCT, env.key_id_of("thermo-manifest", 2))
    assert env.service.chain(DISTRIBUTOR, PRODUCT, env.key_id_of("thermo-manifest", 1)).statements == ()
    env.lifecycle.rotate(OFFICER, "thermo-manifest")  # v3, signed by v1 (the primary again)
    chain = env.service.chain(DISTRIBUTOR, PRODUCT, env.key_id_of("thermo-manifest", 1))
    assert [(r.from_version, r.to_version) for r in chain.statements] == [(1, 3)]
    with pytest.raises(FailedPrecondition, match="not on the rollover chain"):
        env.service.chain(DISTRIBUTOR, PRODUCT, env.key_id_of("thermo-manifest", 2))


def test_refusals(env: Env) -> None:
    env.manifest_key()
    env.manifest_key("other")
    with pytest.raises(NotFound, match="has key id"):
        env.service.chain(DISTRIBUTOR, PRODUCT, bytes(32))
    with pytest.raises(InvalidArgument, match="32-byte"):
        env.service.chain(DISTRIBUTOR, PRODUCT, bytes(31))
    with pytest.raises(PermissionDenied, match="'other'"):
        env.service.chain(DISTRIBUTOR, "other", env.key_id_of("other-manifest", 1))
    with pytest.raises(NotFound, match="has key id"):  # another product's key is not this product's
        env.service.chain(OFFICER, PRODUCT, env.key_id_of("other-manifest", 1))
    with pytest.raises(NotFound, match="no ota-manifest key"):
        env.service.chain(OFFICER, "bare", bytes(32))
    with pytest.raises(InvalidArgument, match="malformed product"):
        env.service.chain(OFFICER, "Bad Product", bytes(32))


def test_a_signing_failure_fails_the_rotation_and_leaves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.manifest_key()

    def unavailable(*_args: object) -> bytes:
        raise HsmUnavailable("the HSM cannot be reached (fake)")

    monkeypatch.setattr(env.hsm, "sign_digest", unavailable)
    held = set(env.hsm.held)
    with pytest.raises(HsmUnavailable):
        env.lifecycle.rotate(OFFICER, "thermo-manifest")
    assert set(env.hsm.held) == held, "the new material was destroyed"
    assert [v.version for v in env.keys.get_key("thermo-manifest").versions] == [1]
    assert env.rollovers.list_rollovers("thermo-manifest") == [] and env.key_uses() == []


def test_a_rotation_refused_at_commit_still_records_the_statement_signature(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another officer changes the key while the rotation signs its statement: the store refuses the change
    (it is no longer based on the key as read), the new material is destroyed, and the signature the HSM
    made is appended to the signature log, its subject saying the version was not created."""
    env.manifest_key()
    env.lifecycle.rotate(OFFICER, "thermo-manifest")  # v2, primary; its statement's use is stored with it
    sign = env.hsm.sign_digest
    other_officer = KeyLifecycle(env.hsm, env.keys, clock=env.clock)

    def sign_while_another_officer_disables_v1(hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        other_officer.set_state(OFFICER, "keys/thermo-manifest/versions/1", KeyVersionState.DISABLED)
        return sign(hsm_id, algorithm, digest)

    monkeypatch.setattr(env.hsm, "sign_digest", sign_while_another_officer_disables_v1)
    held = set(env.hsm.held)
    with pytest.raises(FailedPrecondition):
        env.lifecycle.rotate(OFFICER, "thermo-manifest")

    assert set(env.hsm.held) == held, "the new material was destroyed"
    assert [v.version for v in env.keys.get_key("thermo-manifest").versions] == [1, 2]
    assert [r.to_version for r in env.rollovers.list_rollovers("thermo-manifest")] == [2]
    assert [use[2] for use in env.key_uses()] == ["keys/thermo-manifest/versions/1"], "v2's use not stored"
    (use,) = env.log.records
    assert (use.caller, use.operation, use.key_version) == (
        OFFICER.identity,
        "sign-key-rollover",
        "keys/thermo-manifest/versions/2",
    )
    assert use.subject == "keys/thermo-manifest/versions/3 (not created: FailedPrecondition)"
    assert len(use.digest) == 32

    monkeypatch.setattr(env.hsm, "sign_digest", sign)
    env.lifecycle.rotate(OFFICER, "thermo-manifest")  # retried: v3 with another key, stored as usual
    v = "keys/thermo-manifest/versions/{}".format
    assert [(use[2], use[4]) for use in env.key_uses()] == [(v(1), v(2)), (v(2), v(3))]
    assert len(env.log.records) == 1


def test_a_signature_that_fails_its_check_is_still_a_recorded_key_use(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.manifest_key()
    monkeypatch.setattr(env.hsm, "sign_digest", lambda *_args: bytes(64))  # not a valid signature
    with pytest.raises(HsmFailure, match="does not verify"):
        env.lifecycle.rotate(OFFICER, "thermo-manifest")
    (use,) = env.log.records
    assert use.key_version == "keys/thermo-manifest/versions/1"
    assert use.subject == "keys/thermo-manifest/versions/2 (not created: HsmFailure)"
    assert env.key_uses() == [] and [v.version for v in env.keys.get_key("thermo-manifest").versions] == [1]


def test_the_statement_is_committed_with_its_version_or_not_at_all(env: Env) -> None:
    """A statement that does not go with the version the change adds is refused inside the transaction:
    the version written before the check is rolled back with it."""
    env.manifest_key()
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    (good,) = env.rollovers.list_rollovers("thermo-manifest")
    managed = env.keys.get_managed_key("thermo-manifest")
    pair = env.hsm.generate_key_pair(Algorithm.ECDSA_P256_SHA256, "thermo-manifest/3")
    change = lifecycle.rotate(managed, pair.hsm_id, pair.public_key_der, OFFICER.identity, env.clock.now)
    wrong = rollover.ManifestKeyRollover("thermo-manifest", 1, 2, good.statement, env.clock.now)
    with pytest.raises(InvalidArgument, match="stored with the version it introduces"):
        env.keys.apply_change(replace(change, rollover=wrong))
    assert [v.version for v in env.keys.get_key("thermo-manifest").versions] == [1, 2]
    assert len(env.rollovers.list_rollovers("thermo-manifest")) == 1


def test_a_forged_statement_in_the_store_is_caught_by_the_device(env: Env) -> None:
    """The store is not trusted by devices: a statement swapped for one signed by another key fails."""
    env.manifest_key()
    env.lifecycle.rotate(OFFICER, "thermo-manifest")
    (record,) = env.rollovers.list_rollovers("thermo-manifest")
    body = record.parsed().body
    attacker = ec.generate_private_key(ec.SECP256R1())
    r, s = decode_dss_signature(attacker.sign(body.digest(), ec.ECDSA(Prehashed(hashes.SHA256()))))
    forged = rollover.RolloverStatement(body, r.to_bytes(32, "big") + s.to_bytes(32, "big")).to_bytes()
    with pytest.raises(RolloverRejected) as caught:
        verify_chain([forged], PRODUCT.encode(), env.device_keys("thermo-manifest", 1))
    assert caught.value.verdict is RolloverVerdict.BAD_SIGNATURE
