"""``kmsctl devices reprovision``: request permission to replace a registered device's eFuse secret.

    kmsctl devices reprovision DEVICE_ID --reason TEXT

A registered device keeps its secret: registering it again with another one is refused (ALREADY_EXISTS).
When the hardware really got a new secret (a repair that burned a new eFuse key block), an officer requests
re-provisioning (``ApprovalService.RequestDeviceReprovisioning``), the server's required number of other
officers approve (``kmsctl approvals approve ID``) and one executes it (``kmsctl approvals execute ID``).
From then until the request expires, the next ``kmsctl devices register`` of that device id (factory
registrar) with a different secret replaces the stored one and reports the row as reprovisioned;
``kmsctl devices show`` tells the window and the secret's generation. No secret is part of the request.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from kmsctl import _officer_cli

if TYPE_CHECKING:
    from kmsapi.v1 import approvals_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome


def add_reprovision_command(device_commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``reprovision`` to the ``devices`` subparsers."""
    reprovision = _officer_cli.add_command(
        device_commands,
        common_parents,
        "reprovision",
        "Request permission to replace a device's eFuse secret (dual control: other officers approve).",
        _reprovision,
    )
    reprovision.add_argument("device_id", metavar="DEVICE_ID")
    reprovision.add_argument(
        "--reason", required=True, help="why the secret must change (recorded in the request; no secret)"
    )


def executed_reprovisioning(response: approvals_pb2.ExecuteRequestResponse) -> Outcome:
    """What ``kmsctl approvals execute`` prints for an executed re-provisioning request."""
    from kmsctl import _wire
    from kmsctl._approvals_cli import request_json
    from kmsctl.cli import Outcome, _json_value

    device = _wire.device_info(response.device)
    until = device.reprovision_until.isoformat() if device.reprovision_until else "?"
    return Outcome(
        {"request": request_json(response.request), "device": _json_value(device)},
        f"device {device.device_id} is open for re-provisioning until {until}: the next registration with a "
        "different secret replaces the stored one",
    )


def _reprovision(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsapi.v1 import approvals_pb2

    request = approvals_pb2.RequestDeviceReprovisioningRequest(device_id=args.device_id, reason=args.reason)
    message = _officer_cli.request_approval(client, "RequestDeviceReprovisioning", request)
    outcome = _officer_cli.requested(message, f"re-provisioning of device {args.device_id}")
    outcome.summary += (
        "\nonce executed, the next registration of the device with a different secret replaces the stored "
        "one (until the request expires)"
    )
    return outcome
