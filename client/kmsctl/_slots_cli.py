"""``kmsctl slots``: a product's Secure Boot V2 key slots (security officers; ``show`` also auditors).

    kmsctl slots show --product P
    kmsctl slots export --product P -o DIR
    kmsctl slots revoke --product P --slot N

``show`` prints the three slots (``SecureBootSlotService.ListSecureBootSlots``): state (empty, active,
revoked), the key and its primary version, the algorithm and the eFuse key digest of the primary version,
and for a revoked slot when, by whom and under which approval request. ``--json`` adds every version that is
not destroyed, with its digest.

``export`` writes ``DIR/slotN.digest`` for each ACTIVE slot: the 32 bytes to burn into
``SECURE_BOOT_DIGESTn``, the same bytes as ``espsecure digest-sbv2-public-key`` writes for the primary
version's public key. Each digest is recomputed here from that public key (``KeyService.GetPublicKey``) and
the command fails (exit 8) and writes nothing if the server's digest differs. It prints the ``espefuse
burn-key`` command as a hint (choose free key blocks for your chip; burning is irreversible).

``revoke`` requests the revocation of a slot (``ApprovalService.RequestSlotRevocation``): the server's
required number of other officers approve it (``kmsctl approvals approve ID``), then any officer executes
it (``kmsctl approvals execute ID``). From then on nothing is signed with the slot's key, and every release
carries blocks of the remaining slots only; the revocation is permanent, as the ``KEY_REVOKEn`` eFuse is.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kmsctl import _officer_cli

if TYPE_CHECKING:
    from kmsapi.v1 import approvals_pb2, slots_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

DIGEST_FILE = "slot{slot}.digest"


def _state(message: slots_pb2.SecureBootSlot) -> str:
    from kmsapi.v1 import slots_pb2

    return slots_pb2.SecureBootSlotState.Name(message.state).removeprefix("SECURE_BOOT_SLOT_").lower()


def slot_json(message: slots_pb2.SecureBootSlot) -> dict[str, Any]:
    """A slot as ``--json`` prints it (digests in hex; names as the server gives them)."""
    from kmsapi.v1 import common_pb2
    from kmsctl import _wire

    revoked = _state(message) == "revoked"
    return {
        "product": message.product,
        "slot": message.slot,
        "state": _state(message),
        "key": message.key or None,
        "algorithm": _wire.algorithm(message.algorithm).value if message.key else None,
        "primary_version": message.primary_version or None,
        "efuse_digest": message.efuse_digest.hex() or None,
        "versions": [
            {
                "name": v.name,
                "state": common_pb2.KeyVersionState.Name(v.state).lower().replace("_", "-"),
                "efuse_digest": v.efuse_digest.hex(),
                "primary": v.primary,
            }
            for v in message.versions
        ],
        "revoke_time": _officer_cli.iso_time(message, "revoke_time") if revoked else None,
        "revoked_by": message.revoked_by or None,
        "revocation_request": message.revocation_request or None,
    }


def slot_line(message: slots_pb2.SecureBootSlot) -> str:
    """One line about a slot, for people."""
    data = slot_json(message)
    head = f"slot {data['slot']} of {data['product']}: {data['state']}"
    if data["key"] is None:
        return head
    line = f"{head}, {data['primary_version']} ({data['algorithm']}), digest {data['efuse_digest']}"
    if data["state"] == "revoked":
        line += (
            f"; revoked {data['revoke_time']} by {data['revoked_by']} ({data['revocation_request']}): "
            "nothing is signed with this key any more"
        )
    return line


class SlotClient:
    """``ListSecureBootSlots`` and ``RequestSlotRevocation`` over a ``KmsClient``'s connection. Neither is
    retried: a repeated request would make a second approval request (list them first)."""

    def __init__(self, client: KmsClient) -> None:
        self._client = client

    def list(self, product: str) -> list[slots_pb2.SecureBootSlot]:
        from kmsapi.v1 import slots_pb2

        response = _officer_cli.call(
            self._client,
            slots_pb2.DESCRIPTOR,
            "SecureBootSlotService",
            "ListSecureBootSlots",
            slots_pb2.ListSecureBootSlotsRequest(product=product),
            slots_pb2.ListSecureBootSlotsResponse,
        )
        return list(response.slots)

    def request_revocation(self, product: str, slot: int) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        request = approvals_pb2.RequestSlotRevocationRequest(product=product, slot=slot)
        return _officer_cli.request_approval(self._client, "RequestSlotRevocation", request)


def add_slot_commands(commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``slots show|export|revoke`` to the top-level ``commands`` subparsers; ``common_parents`` are the
    connection and output option parsers every command shares."""
    slots = _officer_cli.CommandGroup(
        commands,
        common_parents,
        "slots",
        "Secure Boot V2 key slots of a product: show, export digests, revoke (officers).",
        "Secure Boot V2 key slots of a product: which key sits in which eFuse digest slot.",
        product_help="the product whose slots to act on",
    )
    slots.add("show", "Show the product's three slots, their keys and eFuse key digests.", _show)
    export = slots.add(
        "export",
        "Write DIR/slotN.digest (32 bytes, as espsecure digest-sbv2-public-key) for each active slot.",
        _export,
    )
    export.add_argument("-o", "--output", metavar="DIR", required=True, help="directory for the digests")
    revoke = slots.add("revoke", "Request the revocation of a slot (dual control; permanent).", _revoke)
    revoke.add_argument("--slot", type=int, required=True, choices=(0, 1, 2), help="the slot to revoke")


def _table(slots: list[slots_pb2.SecureBootSlot]) -> str:
    header = ("SLOT", "STATE", "KEY VERSION", "ALGORITHM", "EFUSE DIGEST (SHA-256)")
    rows = []
    for message in slots:
        data = slot_json(message)
        rows.append(
            (
                str(data["slot"]),
                data["state"],
                data["primary_version"] or "-",
                data["algorithm"] or "-",
                data["efuse_digest"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in [header, *rows]
    ]
    for message in slots:
        if message.revocation_request:
            data = slot_json(message)
            lines.append(
                f"slot {data['slot']} revoked {data['revoke_time']} by {data['revoked_by']} "
                f"({data['revocation_request']})"
            )
    return "\n".join(lines) + "\n"


def _show(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    slots = SlotClient(client).list(args.product)
    return Outcome({"product": args.product, "slots": [slot_json(s) for s in slots]}, payload=_table(slots))


def _export(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl._files import atomic_write
    from kmsctl.cli import Outcome
    from kmsctl.errors import FailedPreconditionError, IntegrityError

    active = [s for s in SlotClient(client).list(args.product) if _state(s) == "active"]
    if not active:
        raise FailedPreconditionError(f"product {args.product!r} has no active Secure Boot V2 slot")
    digests: dict[int, bytes] = {}
    for message in active:
        # The client recomputes the digest from the public key: a wrong digest, once burned, would make
        # every device refuse the firmware signed with this key.
        computed = client.get_public_key(message.primary_version).sbv2_key_digest
        if computed != message.efuse_digest:
            raise IntegrityError(
                f"slot {message.slot}: the server's digest {message.efuse_digest.hex()} does not match the "
                f"public key of {message.primary_version} ({computed.hex()}); nothing was written; do not "
                "burn it"
            )
        digests[message.slot] = computed
    directory = Path(args.output)
    directory.mkdir(parents=True, exist_ok=True)
    files = {slot: directory / DIGEST_FILE.format(slot=slot) for slot in digests}
    for slot, digest in digests.items():
        atomic_write(files[slot], digest)
    burn = " ".join(
        f"BLOCK_KEY{n} {files[slot]} SECURE_BOOT_DIGEST{slot}" for n, slot in enumerate(sorted(digests))
    )
    data = {
        "product": args.product,
        "digests": [
            {
                "slot": m.slot,
                "key_version": m.primary_version,
                "efuse_digest": digests[m.slot].hex(),
                "output": str(files[m.slot]),
            }
            for m in active
        ],
    }
    summary = "\n".join(
        [
            *(
                f"slot {m.slot}: {m.primary_version} {digests[m.slot].hex()} -> {files[m.slot]}"
                for m in active
            ),
            "burn them (irreversible; choose free key blocks of your chip) with, e.g.:",
            f"  espefuse --port PORT burn-key {burn}",
        ]
    )
    return Outcome(data, summary)


def _revoke(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl._approvals_cli import request_json
    from kmsctl.cli import Outcome

    made = SlotClient(client).request_revocation(args.product, args.slot)
    data = request_json(made)
    summary = "\n".join(
        [
            f"requested the revocation of Secure Boot V2 slot {args.slot} of product {args.product} "
            f"(key {made.parameters.get('key', '?')}): approval request {made.id}, {data['state']}, "
            f"expires {data['expire_time']}",
            f"next: {made.required_approvals} other officer(s) run 'kmsctl approvals approve {made.id}', "
            f"then any officer runs 'kmsctl approvals execute {made.id}'",
            "once executed, nothing is signed with this slot's key again (permanent); new releases carry the "
            "other slots' blocks, and devices running them may burn KEY_REVOKE" + str(args.slot),
        ]
    )
    return Outcome(data, summary)


def executed_revocation(response: approvals_pb2.ExecuteRequestResponse) -> Outcome:
    """What ``kmsctl approvals execute`` reports for an executed slot revocation."""
    from kmsctl._approvals_cli import request_json
    from kmsctl.cli import Outcome

    request = request_json(response.request)
    data = {"request": request, "slot": slot_json(response.slot)}
    summary = (
        f"{request['id']} {request['state']}: {request['action']} {request['target']} "
        f"by {request['executed_by']}\n{slot_line(response.slot)}"
    )
    return Outcome(data, summary)
