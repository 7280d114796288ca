"""``kmsctl kek``: rotate a product's key-encryption key and follow the rewrap (security officers).

    kmsctl kek rotate --product P [--wait [--interval SECONDS]]
    kmsctl kek status --product P

``rotate`` asks the server to rotate the KEK (``KekRotationService.StartKekRotation``); the server rewraps
every device secret in the background. With ``--wait`` it polls ``GetKekRotation`` and draws a progress bar
on stderr (not with ``--json`` or ``--quiet``) until the job has finished. ``status`` prints the latest job.
Exit 0 once finished with nothing remaining; with ``--wait``, a job that finished with secrets left behind
(damaged blobs: see the server log) exits 8. ``rotate`` is not idempotent: after a lost connection, run
``status`` before repeating it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kmsctl import _officer_cli

if TYPE_CHECKING:
    from kmsapi.v1 import kek_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

_BAR_WIDTH = 30


@dataclass(frozen=True)
class KekRotationInfo:
    """A rotation job as the server reports it (kmsapi/v1/kek.proto)."""

    product: str
    kek: str
    from_version: str
    to_version: str
    started_by: str
    start_time: datetime | None
    finish_time: datetime | None
    finished: bool
    rewrapped: int
    remaining: int
    total: int

    def to_json(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "kek": self.kek,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "started_by": self.started_by,
            "start_time": None if self.start_time is None else self.start_time.isoformat(),
            "finish_time": None if self.finish_time is None else self.finish_time.isoformat(),
            "finished": self.finished,
            "rewrapped": self.rewrapped,
            "remaining": self.remaining,
            "total": self.total,
        }


def _info(message: kek_pb2.KekRotation) -> KekRotationInfo:
    return KekRotationInfo(
        product=message.product,
        kek=message.kek,
        from_version=message.from_version,
        to_version=message.to_version,
        started_by=message.started_by,
        start_time=_officer_cli.moment(message, "start_time"),
        finish_time=_officer_cli.moment(message, "finish_time"),
        finished=message.finished,
        rewrapped=message.rewrapped,
        remaining=message.remaining,
        total=message.total,
    )


class KekClient:
    """The KEK rotation calls, over a ``KmsClient``'s connection (``KekClient(client)``)."""

    def __init__(self, client: KmsClient) -> None:
        self._client = client

    def start(self, product: str) -> KekRotationInfo:
        """Rotate the product's KEK; not retried (a repeat would rotate again)."""
        from kmsapi.v1 import kek_pb2

        return _info(
            _officer_cli.call(
                self._client,
                kek_pb2.DESCRIPTOR,
                "KekRotationService",
                "StartKekRotation",
                kek_pb2.StartKekRotationRequest(product=product),
                kek_pb2.KekRotation,
            )
        )

    def get(self, product: str) -> KekRotationInfo:
        from kmsapi.v1 import kek_pb2

        return _info(
            _officer_cli.call(
                self._client,
                kek_pb2.DESCRIPTOR,
                "KekRotationService",
                "GetKekRotation",
                kek_pb2.GetKekRotationRequest(product=product),
                kek_pb2.KekRotation,
            )
        )


def add_kek_commands(commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``kek rotate|status`` to the top-level ``commands`` subparsers; ``common_parents`` are the
    connection and output option parsers every command shares."""
    kek = _officer_cli.CommandGroup(
        commands,
        common_parents,
        "kek",
        "Rotate a product's key-encryption key and follow the rewrap (officers).",
        "Rotate a product's key-encryption key and follow the rewrap of its device secrets.",
        product_help="the product whose KEK it is",
    )
    rotate = kek.add(
        "rotate",
        "Rotate the product's KEK; the server rewraps every device secret in the background.",
        _rotate,
    )
    rotate.add_argument("--wait", action="store_true", help="show progress until the rewrap has finished")
    rotate.add_argument(
        "--interval", type=float, default=0.5, metavar="SECONDS", help="--wait poll interval (default 0.5)"
    )
    kek.add("status", "Show the product's latest KEK rotation.", _status)


def _rotate(args: argparse.Namespace, client: KmsClient) -> Outcome:
    kek = KekClient(client)
    info = kek.start(args.product)
    if args.wait:
        show = not (args.json or args.quiet)
        while not info.finished:
            if show:
                _draw(info)
            time.sleep(args.interval)
            info = kek.get(args.product)
        if show:
            _draw(info)
            sys.stderr.write("\n")
    return _outcome(info, f"{info.kek} rotated to {info.to_version}")


def _status(args: argparse.Namespace, client: KmsClient) -> Outcome:
    info = KekClient(client).get(args.product)
    return _outcome(info, f"{info.kek}: rotation to {info.to_version}")


def _outcome(info: KekRotationInfo, what: str) -> Outcome:
    from kmsctl.cli import EXIT_INTEGRITY, EXIT_OK, Outcome

    if not info.finished:
        state = f"running, {info.rewrapped} of {info.total} device secrets rewrapped"
    elif info.remaining:
        state = f"finished, {info.rewrapped} rewrapped, {info.remaining} could not be (see the server log)"
    else:
        state = f"finished, {info.rewrapped} device secrets rewrapped"
    return Outcome(
        info.to_json(),
        f"{what}: {state}",
        exit_code=EXIT_INTEGRITY if info.finished and info.remaining else EXIT_OK,
    )


def _draw(info: KekRotationInfo) -> None:
    done = info.total - info.remaining
    fraction = 1.0 if info.total == 0 else done / info.total
    filled = int(fraction * _BAR_WIDTH)
    bar = "#" * filled + "." * (_BAR_WIDTH - filled)
    sys.stderr.write(f"\rrewrap [{bar}] {done}/{info.total} {fraction:6.1%}")
    sys.stderr.flush()
