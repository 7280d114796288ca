"""``kmsctl floor``: a product's anti-rollback floor (security officers).

    kmsctl floor show --product P
    kmsctl floor lower --product P --to N

The floor is the lowest secure_version the service still signs for the product; it rises by itself to the
highest secure_version signed. ``show`` prints it (``RollbackFloorService.GetRollbackFloor``) with its last
lowering. ``lower`` requests lowering it to N, below the current floor
(``ApprovalService.RequestFloorLowering``): the server's required number of other officers approve with
``kmsctl approvals approve ID``, then one executes it with ``kmsctl approvals execute ID``. Execution is
refused if the floor moved after the request (a release signed meanwhile): request again.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from kmsctl import _officer_cli

if TYPE_CHECKING:
    from kmsapi.v1 import approvals_pb2, rollback_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

_MAX_SECURE_VERSION = 2**32 - 1  # esp_app_desc_t.secure_version is a uint32_t


def floor_json(message: rollback_pb2.RollbackFloor) -> dict[str, Any]:
    """A floor as ``--json`` prints it (``secure_version`` null before the product's first release)."""
    return {
        "product": message.product,
        "secure_version": message.secure_version if message.HasField("secure_version") else None,
        "update_time": _officer_cli.iso_time(message, "update_time"),
        "updated_by": message.updated_by or None,
        "update_request": message.update_request or None,
    }


def executed_lowering(response: approvals_pb2.ExecuteRequestResponse) -> Outcome:
    """What ``kmsctl approvals execute`` prints for an executed floor lowering."""
    from kmsctl._approvals_cli import request_json
    from kmsctl.cli import Outcome

    floor = floor_json(response.floor)
    return Outcome(
        {"request": request_json(response.request), "floor": floor},
        f"the anti-rollback floor of {floor['product']} is now secure_version {floor['secure_version']}",
    )


def add_floor_commands(commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``floor show|lower`` to the top-level ``commands`` subparsers."""
    floor = _officer_cli.CommandGroup(
        commands,
        common_parents,
        "floor",
        "Show or lower a product's anti-rollback floor (officers).",
        "A product's anti-rollback floor: the lowest secure_version the service still signs.",
        product_help="the product",
    )
    floor.add("show", "Show a product's anti-rollback floor.", _show)
    lower = floor.add(
        "lower",
        "Request lowering a product's anti-rollback floor (dual control: other officers approve).",
        _lower,
    )
    lower.add_argument(
        "--to", required=True, type=_secure_version, metavar="N", help="the new floor, below the current one"
    )


def _secure_version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= _MAX_SECURE_VERSION:
        raise argparse.ArgumentTypeError(f"must be 0 to {_MAX_SECURE_VERSION}")
    return value


def _show(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsapi.v1 import rollback_pb2
    from kmsctl.cli import Outcome, _rows

    message = _officer_cli.call(
        client,
        rollback_pb2.DESCRIPTOR,
        "RollbackFloorService",
        "GetRollbackFloor",
        rollback_pb2.GetRollbackFloorRequest(product=args.product),
        rollback_pb2.RollbackFloor,
    )
    data = floor_json(message)
    if data["secure_version"] is None:
        return Outcome(
            data, f"product {args.product} has no anti-rollback floor yet: nothing was signed for it"
        )
    lines = [f"anti-rollback floor of product {args.product}: secure_version {data['secure_version']}"]
    if data["update_request"]:
        lines += _rows(
            ("lowered at", data["update_time"] or ""),
            ("lowered by", data["updated_by"] or ""),
            ("request", data["update_request"]),
        )
    return Outcome(data, "\n".join(lines))


def _lower(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsapi.v1 import approvals_pb2

    request = approvals_pb2.RequestFloorLoweringRequest(product=args.product, secure_version=args.to)
    message = _officer_cli.request_approval(client, "RequestFloorLowering", request)
    current = message.parameters.get("current_floor", "?")
    return _officer_cli.requested(
        message, f"lowering the anti-rollback floor of {args.product} from {current} to {args.to}"
    )
