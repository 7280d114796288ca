"""Secure Boot V2 slots: the domain rules (kms.domain.sbv2_slots), their SQLite repository on a real file,
the use cases (kms.service.sbv2_slots) and the signing path's caches of revoked slots and keys."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.domain import sbv2, sbv2_slots
from kms.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from kms.domain.identity import Caller, Role
from kms.domain.keys import Algorithm, Key, KeyPurpose, KeyVersion, KeyVersionState
from kms.domain.ports import KeyRepository
from kms.domain.sbv2_slots import SlotRevocation, SlotState
from kms.service.sbv2_slots import SecureBootSlots
from kms.service.signing import KeyCache, RevokedSlotCache
from kms.store.database import Database
from kms.store.keys import SqliteKeyRepository
from kms.store.sbv2_slots import SqliteSlotRevocationRepository

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
ALICE = "spiffe://kms.dev/security-officer/alice"
PRODUCT = "thermo"
_hsm_ids = itertools.count(1)


def _public_key() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _version(key_id: str, number: int, state: KeyVersionState = KeyVersionState.ENABLED) -> KeyVersion:
    return KeyVersion(
        key_id=key_id,
        version=number,
        algorithm=Algorithm.ECDSA_P256_SHA256,
        state=state,
        hsm_id=next(_hsm_ids).to_bytes(8, "big"),
        public_key_der=_public_key(),
        created_at=T0,
    )


def _key(key_id: str, slot: int | None, product: str = PRODUCT, versions: int = 1, primary: int = 1) -> Key:
    return Key(
        key_id=key_id,
        product=product,
        purpose=KeyPurpose.DIGEST_SIGNING if slot is None else KeyPurpose.SECURE_BOOT_V2,
        algorithm=Algorithm.ECDSA_P256_SHA256,
        sbv2_slot=slot,
        primary_version=primary,
        versions=tuple(_version(key_id, n) for n in range(1, versions + 1)),
        created_at=T0,
    )


def _revocation(slot: int, key_id: str, product: str = PRODUCT) -> SlotRevocation:
    return SlotRevocation(product, slot, key_id, T0, ALICE, "r0")


THREE = [_key("sb0", 0), _key("sb1", 1), _key("sb2", 2)]


# --- the slot view -----------------------------------------------------------------------------------------


def test_slots_show_which_key_sits_where_and_ignore_other_keys() -> None:
    keys = [_key("sb0", 0), _key("sb2", 2), _key("other-product", 1, product="lamp"), _key("digest", None)]
    slots = sbv2_slots.product_slots(PRODUCT, keys, [_revocation(1, "x", product="lamp")])
    assert [s.slot for s in slots] == [0, 1, 2]
    assert [s.state for s in slots] == [SlotState.ACTIVE, SlotState.EMPTY, SlotState.ACTIVE]
    assert [None if s.key is None else s.key.key_id for s in slots] == ["sb0", None, "sb2"]
    assert slots[1].efuse_digest == b"" and slots[1].primary is None and slots[1].versions == ()
    assert slots[0].target == "products/thermo/sbv2-slots/0"


def test_the_digest_is_the_primary_versions_and_destroyed_versions_are_left_out() -> None:
    key = _key("sb0", 0, versions=3, primary=2)
    key = replace(
        key, versions=(replace(key.versions[0], state=KeyVersionState.DESTROYED), *key.versions[1:])
    )
    slot = sbv2_slots.product_slots(PRODUCT, [key], [])[0]
    assert slot.primary is not None and slot.primary.version == 2
    primary = key.versions[1]
    assert slot.efuse_digest == sbv2.key_digest(primary.algorithm, primary.public_key_der)
    assert len(slot.efuse_digest) == 32
    assert [v.version for v in slot.versions] == [2, 3]
    assert slot.efuse_digest != sbv2_slots.efuse_digest(key.versions[2])


def test_a_revoked_slot_keeps_its_key_and_record() -> None:
    slots = sbv2_slots.product_slots(PRODUCT, THREE, [_revocation(1, "sb1")])
    assert [s.state for s in slots] == [SlotState.ACTIVE, SlotState.REVOKED, SlotState.ACTIVE]
    assert slots[1].key is not None and slots[1].key.key_id == "sb1"
    assert slots[1].revocation == _revocation(1, "sb1")


@pytest.mark.parametrize("slot", [-1, 3, 7, 2**32])
def test_slots_out_of_range_are_invalid(slot: int) -> None:
    with pytest.raises(InvalidArgument, match="slots are 0, 1 and 2"):
        sbv2_slots.check_slot(slot)
    with pytest.raises(InvalidArgument):
        sbv2_slots.revoke(sbv2_slots.product_slots(PRODUCT, THREE, []), slot, ALICE, "r1", T0)


def test_slot_targets_round_trip_and_malformed_ones_are_refused() -> None:
    assert sbv2_slots.parse_slot_target(sbv2_slots.slot_target("a.b_c-1", 2)) == ("a.b_c-1", 2)
    for bad in ("products/thermo/sbv2-slots/3", "products/Thermo/sbv2-slots/0", "keys/k/versions/1", ""):
        with pytest.raises(InvalidArgument):
            sbv2_slots.parse_slot_target(bad)


# --- revocation rules -------------------------------------------------------------------------------------


def test_revoking_an_active_slot_records_who_when_and_under_which_request() -> None:
    slots = sbv2_slots.product_slots(PRODUCT, THREE, [])
    revocation = sbv2_slots.revoke(slots, 1, ALICE, "abc123", T0)
    assert revocation == SlotRevocation(PRODUCT, 1, "sb1", T0, ALICE, "abc123")


def test_an_empty_slot_cannot_be_revoked() -> None:
    slots = sbv2_slots.product_slots(PRODUCT, [_key("sb0", 0), _key("sb2", 2)], [])
    with pytest.raises(FailedPrecondition, match="slot 1 of product 'thermo' is empty"):
        sbv2_slots.revoke(slots, 1, ALICE, "r1", T0)


def test_a_revoked_slot_cannot_be_revoked_again() -> None:
    slots = sbv2_slots.product_slots(PRODUCT, THREE, [_revocation(1, "sb1")])
    with pytest.raises(
        FailedPrecondition, match=r"revoked already, at 2026-03-01T09:30:00\+00:00 by .*alice"
    ):
        sbv2_slots.revoke(slots, 1, ALICE, "r2", T0)


@pytest.mark.parametrize(
    ("keys", "revoked", "slot"),
    [
        ([_key("sb0", 0)], [], 0),  # the only key
        (THREE, [_revocation(0, "sb0"), _revocation(2, "sb2")], 1),  # the others are revoked
        ([_key("sb1", 1), _key("sb2", 2)], [_revocation(2, "sb2")], 1),  # one empty, one revoked
    ],
)
def test_the_last_active_slot_cannot_be_revoked(
    keys: list[Key], revoked: list[SlotRevocation], slot: int
) -> None:
    slots = sbv2_slots.product_slots(PRODUCT, keys, revoked)
    with pytest.raises(FailedPrecondition, match=r"last active slot .* boot nothing"):
        sbv2_slots.revoke(slots, slot, ALICE, "r1", T0)


def test_a_revocation_needs_its_approval_request() -> None:
    with pytest.raises(InvalidArgument, match="approval request"):
        sbv2_slots.revoke(sbv2_slots.product_slots(PRODUCT, THREE, []), 1, ALICE, "", T0)


def test_revoked_slots_sign_nothing() -> None:
    assert [k.key_id for k in sbv2_slots.signing_keys(THREE[::-1], {1})] == ["sb0", "sb2"]
    assert [k.key_id for k in sbv2_slots.signing_keys(THREE, set())] == ["sb0", "sb1", "sb2"]
    with pytest.raises(FailedPrecondition, match="slot 1 of product 'thermo', which is revoked"):
        sbv2_slots.check_not_revoked(THREE[1], {1})
    sbv2_slots.check_not_revoked(THREE[0], {1})
    sbv2_slots.check_not_revoked(_key("digest", None), {0, 1, 2})  # not a Secure Boot V2 key


# --- repository and use cases on a real SQLite file ------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "kms.db")
    yield database
    database.close()


@pytest.fixture
def keys(db: Database) -> SqliteKeyRepository:
    repo = SqliteKeyRepository(db)
    for key in THREE:
        repo.add_key(key)
    repo.add_key(_key("lamp-sb0", 0, product="lamp"))
    return repo


OFFICER = Caller(ALICE, Role.SECURITY_OFFICER)


def _service(keys: SqliteKeyRepository, db: Database, changed: list[str] | None = None) -> SecureBootSlots:
    seen = changed if changed is not None else []
    clock = iter(T0 + timedelta(seconds=n) for n in itertools.count())
    return SecureBootSlots(
        keys, SqliteSlotRevocationRepository(db), changed=seen.append, clock=lambda: next(clock)
    )


def test_a_revocation_is_stored_and_seen_by_every_reader(keys: SqliteKeyRepository, db: Database) -> None:
    changed: list[str] = []
    service = _service(keys, db, changed)
    revoked = service.revoke(OFFICER, PRODUCT, 1, "req-1", approved_key="keys/sb1")
    assert revoked.state is SlotState.REVOKED and revoked.key == keys.get_key("sb1")
    assert changed == [PRODUCT]
    store = SqliteSlotRevocationRepository(db)
    assert store.revoked_slots(PRODUCT) == frozenset({1}) and store.revoked_slots("lamp") == frozenset()
    assert store.list(PRODUCT) == [SlotRevocation(PRODUCT, 1, "sb1", T0, ALICE, "req-1")]
    listed = service.list(OFFICER, PRODUCT)
    assert [s.state for s in listed] == [SlotState.ACTIVE, SlotState.REVOKED, SlotState.ACTIVE]
    assert listed[1] == revoked


def test_refusals_write_nothing(keys: SqliteKeyRepository, db: Database) -> None:
    service = _service(keys, db)
    service.revoke(OFFICER, PRODUCT, 0, "req-1")
    with pytest.raises(FailedPrecondition, match="revoked already"):
        service.revoke(OFFICER, PRODUCT, 0, "req-2")
    service.revoke(OFFICER, PRODUCT, 2, "req-3")
    with pytest.raises(FailedPrecondition, match="last active slot"):
        service.revoke(OFFICER, PRODUCT, 1, "req-4")
    with pytest.raises(FailedPrecondition, match="last active slot"):
        service.check_revocable(OFFICER, PRODUCT, 1)
    with pytest.raises(FailedPrecondition, match="is empty"):
        service.revoke(OFFICER, "lamp", 1, "req-5")
    assert [(r.slot, r.approval_id) for r in SqliteSlotRevocationRepository(db).list(PRODUCT)] == [
        (0, "req-1"),
        (2, "req-3"),
    ]


def test_the_rule_sees_revocations_committed_after_the_keys_were_read(
    keys: SqliteKeyRepository, db: Database
) -> None:
    """Two officers executing revocations of the two remaining slots at once: the store applies the rule
    to the revocations it reads inside its write transaction, so the second one is refused."""
    other = SecureBootSlots(keys, SqliteSlotRevocationRepository(db), clock=lambda: T0)
    other.revoke(OFFICER, PRODUCT, 0, "first")

    class RacingKeys(SqliteKeyRepository):
        def list_keys(self, product: str | None = None) -> list[Key]:
            listed = super().list_keys(product)  # read before the other officer's revocation commits
            other.revoke(OFFICER, PRODUCT, 2, "second")
            return listed

    racing = RacingKeys(db)
    with pytest.raises(FailedPrecondition, match="last active slot"):
        SecureBootSlots(racing, SqliteSlotRevocationRepository(db)).revoke(OFFICER, PRODUCT, 1, "third")
    assert SqliteSlotRevocationRepository(db).revoked_slots(PRODUCT) == frozenset({0, 2})


def test_use_cases_are_bound_to_the_product_scope(keys: SqliteKeyRepository, db: Database) -> None:
    scoped = Caller("spiffe://kms.dev/security-officer/lamps", Role.SECURITY_OFFICER, frozenset({"lamp"}))
    service = _service(keys, db)
    for call in (
        lambda: service.list(scoped, PRODUCT),
        lambda: service.check_revocable(scoped, PRODUCT, 1),
        lambda: service.revoke(scoped, PRODUCT, 1, "req-1"),
    ):
        with pytest.raises(PermissionDenied, match="may not act for product 'thermo'"):
            call()
    assert [s.state for s in service.list(scoped, "lamp")] == [
        SlotState.ACTIVE,
        SlotState.EMPTY,
        SlotState.EMPTY,
    ]
    assert SqliteSlotRevocationRepository(db).revoked_slots(PRODUCT) == frozenset()


def test_unknown_products_and_slots(keys: SqliteKeyRepository, db: Database) -> None:
    service = _service(keys, db)
    with pytest.raises(NotFound, match="product 'nothing' has no keys"):
        service.list(OFFICER, "nothing")
    with pytest.raises(InvalidArgument, match="slot 3 does not exist"):
        service.check_revocable(OFFICER, PRODUCT, 3)
    with pytest.raises(InvalidArgument, match="malformed product"):
        service.list(OFFICER, "Bad Product")


def test_the_act_refuses_a_slot_that_holds_another_key_than_approved(
    keys: SqliteKeyRepository, db: Database
) -> None:
    service = _service(keys, db)
    with pytest.raises(FailedPrecondition, match="holds key keys/sb1, not keys/elsewhere"):
        service.revoke(OFFICER, PRODUCT, 1, "req-1", approved_key="keys/elsewhere")
    assert SqliteSlotRevocationRepository(db).revoked_slots(PRODUCT) == frozenset()


# --- the signing path's cache -----------------------------------------------------------------------------


class CountingRevocations:
    def __init__(self) -> None:
        self.revoked: frozenset[int] = frozenset()
        self.reads = 0

    def revoked_slots(self, product: str) -> frozenset[int]:
        self.reads += 1
        return self.revoked

    def list(self, product: str) -> list[SlotRevocation]:
        raise AssertionError("the signing path reads only revoked_slots")

    def revoke(self, product: str, decide: object) -> SlotRevocation:
        raise AssertionError("the signing path never revokes")


def test_the_signing_cache_reads_once_per_ttl_and_forgets_on_revocation() -> None:
    source = CountingRevocations()
    cache = RevokedSlotCache(source, ttl=60.0)
    assert cache.get(PRODUCT) == frozenset() and cache.get(PRODUCT) == frozenset()
    assert source.reads == 1
    source.revoked = frozenset({1})
    assert cache.get(PRODUCT) == frozenset()  # within the TTL: another process's change is not seen yet
    cache.invalidate(PRODUCT)  # this process revoked: seen at once
    assert cache.get(PRODUCT) == frozenset({1}) and source.reads == 2
    assert RevokedSlotCache(source, ttl=0.0).get(PRODUCT) == frozenset({1}) and source.reads == 3
    assert RevokedSlotCache(None).get(PRODUCT) == frozenset()


class RevokedWhileRead(CountingRevocations):
    """A read that returns the state from before a revocation committed (and invalidated) while it ran."""

    def __init__(self, during_read: Callable[[], None]) -> None:
        super().__init__()
        self.during_read: Callable[[], None] | None = during_read

    def revoked_slots(self, product: str) -> frozenset[int]:
        seen = super().revoked_slots(product)
        hook, self.during_read = self.during_read, None
        if hook is not None:
            hook()
        return seen


def test_a_refill_that_started_before_an_invalidate_does_not_store_its_stale_result() -> None:
    """The interleaving: a SignDigest call misses the cache and reads the slots; meanwhile this process
    commits a revocation and invalidates; then the read returns the old slots. Stored, they would let the
    revoked slot's key sign for another ttl after the revocation returned."""

    def revoke_meanwhile() -> None:
        source.revoked = frozenset({1})
        cache.invalidate(PRODUCT)

    source = RevokedWhileRead(revoke_meanwhile)
    cache = RevokedSlotCache(source, ttl=60.0)
    assert cache.get(PRODUCT) == frozenset(), "the call that began before the revocation sees what it read"
    assert cache.get(PRODUCT) == frozenset({1}), "every call that begins after invalidate sees the revocation"
    assert cache.get(PRODUCT) == frozenset({1}) and source.reads == 2, "and the fresh result is cached"


def test_the_key_cache_has_the_same_guard() -> None:
    versions: list[int] = [1]

    class Keys:
        reads = 0

        def get_key(self, key_id: str) -> Key:
            Keys.reads += 1
            key = _key(key_id, None, versions=versions[0], primary=versions[0])
            if Keys.reads == 1:  # a rotation commits and invalidates while this read runs
                versions[0] = 2
                cache.invalidate(key_id)
            return key

    cache = KeyCache(cast(KeyRepository, Keys()), ttl=60.0)
    assert cache.get("fw").primary_version == 1
    assert cache.get("fw").primary_version == 2 and cache.get("fw").primary_version == 2
    assert Keys.reads == 2
