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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from kmsapi.v1 import kek_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

SECURITY_OFFICER = "security-officer"
_BAR_WIDTH = 30

Command = Callable[[argparse.Namespace, "KmsClient"], "Outcome"]


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
    def moment(field: str) -> datetime | None:
        if not message.HasField(field):  # type: ignore[arg-type]
            return None
        value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
        return value

    return KekRotationInfo(
        product=message.product,
        kek=message.kek,
        from_version=message.from_version,
        to_version=message.to_version,
        started_by=message.started_by,
        start_time=moment("start_time"),
        finish_time=moment("finish_time"),
        finished=message.finished,
        rewrapped=message.rewrapped,
        remaining=message.remaining,
        total=message.total,
    )


class KekClient:
    """The KEK rotation calls, over a ``KmsClient``'s connection (``KekClient.of(client)``)."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        from kmsapi.v1 import kek_pb2
        from kmsctl import _wire

        self._timeout = timeout
        path = _wire.method_path
        self._start = channel.unary_unary(
            path(kek_pb2.DESCRIPTOR, "KekRotationService", "StartKekRotation"),
            request_serializer=kek_pb2.StartKekRotationRequest.SerializeToString,
            response_deserializer=kek_pb2.KekRotation.FromString,
        )
        self._get = channel.unary_unary(
            path(kek_pb2.DESCRIPTOR, "KekRotationService", "GetKekRotation"),
            request_serializer=kek_pb2.GetKekRotationRequest.SerializeToString,
            response_deserializer=kek_pb2.KekRotation.FromString,
        )

    @classmethod
    def of(cls, client: KmsClient) -> KekClient:
        return cls(client._channel, client._timeout)

    def start(self, product: str) -> KekRotationInfo:
        """Rotate the product's KEK; not retried (a repeat would rotate again)."""
        from kmsapi.v1 import kek_pb2
        from kmsctl import _wire

        try:
            response = self._start(kek_pb2.StartKekRotationRequest(product=product), timeout=self._timeout)
        except grpc.RpcError as error:
            raise _wire.translate(error) from error
        return _info(response)

    def get(self, product: str) -> KekRotationInfo:
        from kmsapi.v1 import kek_pb2
        from kmsctl import _wire

        try:
            response = self._get(kek_pb2.GetKekRotationRequest(product=product), timeout=self._timeout)
        except grpc.RpcError as error:
            raise _wire.translate(error) from error
        return _info(response)


def add_kek_commands(commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``kek rotate|status`` to the top-level ``commands`` subparsers; ``common_parents`` are the
    connection and output option parsers every command shares."""
    from kmsctl.cli import _EXIT_CODES_HELP

    kek = commands.add_parser(
        "kek",
        help="Rotate a product's key-encryption key and follow the rewrap (officers).",
        description="Rotate a product's key-encryption key and follow the rewrap of its device secrets.",
    )
    kek_commands = kek.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def add(name: str, summary: str, command: Command) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = kek_commands.add_parser(
            name,
            help=summary,
            description=summary,
            parents=common_parents,
            epilog=f"default --identity: {SECURITY_OFFICER}\n\n{_EXIT_CODES_HELP}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        sub.set_defaults(command=command, local_command=None, default_identity=SECURITY_OFFICER)
        sub.add_argument("--product", required=True, help="the product whose KEK it is")
        return sub

    rotate = add(
        "rotate",
        "Rotate the product's KEK; the server rewraps every device secret in the background.",
        _rotate,
    )
    rotate.add_argument("--wait", action="store_true", help="show progress until the rewrap has finished")
    rotate.add_argument(
        "--interval", type=float, default=0.5, metavar="SECONDS", help="--wait poll interval (default 0.5)"
    )
    add("status", "Show the product's latest KEK rotation.", _status)


def _rotate(args: argparse.Namespace, client: KmsClient) -> Outcome:
    kek = KekClient.of(client)
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
    info = KekClient.of(client).get(args.product)
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
