"""``kmsctl audit``: read, export and verify the audit log (auditors and security officers).

    kmsctl audit tail [-n N] [--follow [--interval SECONDS]]
    kmsctl audit export -o FILE.jsonl
    kmsctl audit verify [FILE.jsonl] [--public-key [NAME=]PEM ...] [--checkpoints FILE.jsonl ...]

``verify`` checks the hash chain of every record and the signature of every checkpoint, offline, with the
verifier of ``kmsctl._audit`` (no trust in the server). Without FILE it first fetches a complete export from
the server. Without ``--public-key`` it fetches the audit public keys the checkpoints name from the server
(``KeyService.GetPublicKey``), which only proves the log consistent with what the server says its key is: pin
the key instead (``kmsctl public-key kms-audit -o audit.pem``, kept apart from the server). ``--public-key``
takes ``NAME=PEM`` for one key version (``keys/kms-audit/versions/2=old.pem``) or a bare PEM trusted for any
version. ``--checkpoints`` adds the checkpoints of earlier exports, so records cut from the end since then
are noticed. Exit 0 when the log verifies, 8 when it does not, naming the first bad record.

``tail --follow`` polls the server every ``--interval`` seconds; its own polls are recorded in the log too
(every call is), and are not shown. The default identity of these commands is ``auditor``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kmsctl import errors
from kmsctl._audit import (
    AuditClient,
    AuditRecordLine,
    CheckpointLine,
    ExportReader,
    MalformedExport,
    key_versions,
    parse_record,
    signature_check,
    verify_export_lines,
)
from kmsctl._files import AtomicFile

if TYPE_CHECKING:
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

AUDITOR = "auditor"
_FOLLOW_PAGE = 1000

AddCommand = Callable[..., argparse.ArgumentParser]
Connect = Callable[[argparse.Namespace], "KmsClient"]


def add_audit_commands(commands: Any, add: AddCommand, connect: Connect) -> None:
    """Add ``audit tail|export|verify`` to the ``commands`` subparsers, with ``build_parser``'s ``add`` helper
    (connection and output options, default identity) and ``connect`` (for ``verify``, which connects only
    when it needs the server)."""
    audit = commands.add_parser(
        "audit",
        help="Read, export and verify the audit log (auditors, officers).",
        description="Read, export and verify the audit log.",
    )
    audit_commands = audit.add_subparsers(title="commands", metavar="COMMAND", required=True)

    tail = add(audit_commands, "tail", "Show the last records of the audit log.", _tail, identity=AUDITOR)
    tail.add_argument("-n", type=_positive_int, default=20, metavar="N", help="records (default %(default)s)")
    tail.add_argument("--follow", action="store_true", help="keep printing new records until interrupted")
    tail.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="--follow poll interval (default 2)"
    )

    export = add(
        audit_commands, "export", "Write the whole audit log as JSON lines.", _export, identity=AUDITOR
    )
    export.add_argument("-o", "--output", metavar="FILE.jsonl", required=True, help="where to write it")

    verify = add(
        audit_commands,
        "verify",
        "Verify the audit log's hash chain and checkpoint signatures; name the first bad record.",
        _verify_needs_no_connection,
        identity=AUDITOR,
    )
    verify.set_defaults(local_command=lambda args: _verify(args, connect))
    verify.add_argument("file", metavar="FILE.jsonl", nargs="?", help="an export (default: fetch one now)")
    verify.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="[NAME=]PEM",
        help="a pinned audit public key, for key version NAME or any (repeatable; default: ask the server)",
    )
    verify.add_argument(
        "--checkpoints",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="an earlier export whose checkpoints must still hold (repeatable)",
    )


# -- commands ----------------------------------------------------------------------------------------


def _tail(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    audit = AuditClient.of(client)
    requests = _OwnRequests()
    head = audit.head(request_id=requests.new())
    first = max(1, head.count - args.n + 1)
    read = _window(audit, first, args.n, requests.new()) if head.count else []
    shown = [r for r in read if not requests.own(r)]
    if not args.follow:
        data = {"records": [r.to_json() for r in shown], "count": head.count}
        return Outcome(data, payload="".join(_format(r) + "\n" for r in shown))
    last = read[-1].seq if read else 0
    _show(shown, args.json)
    while True:
        time.sleep(args.interval)
        head = audit.head(request_id=requests.new())
        while head.count > last:
            page = _window(audit, last + 1, _FOLLOW_PAGE, requests.new())
            if not page:
                break
            _show((r for r in page if not requests.own(r)), args.json)
            last = page[-1].seq


def _export(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    counts = {"checkpoint": 0, "record": 0}
    with AtomicFile(args.output) as out:
        for line in AuditClient.of(client).export():
            out.write(line.encode("ascii") + b"\n")
            kind = _kind(line)
            if kind in counts:
                counts[kind] += 1
    data = {"output": str(args.output), "records": counts["record"], "checkpoints": counts["checkpoint"]}
    summary = f"wrote {counts['record']} records and {counts['checkpoint']} checkpoints to {args.output}"
    return Outcome(data, summary)


def _verify_needs_no_connection(args: argparse.Namespace, client: KmsClient) -> Outcome:
    raise AssertionError("audit verify runs as a local command")  # pragma: no cover


def _verify(args: argparse.Namespace, connect: Connect) -> Outcome:
    from kmsctl.cli import EXIT_INTEGRITY, BadInputError, Outcome

    by_version, any_version = _pinned_keys(args.public_key)
    extra = [c for path in args.checkpoints for c in _checkpoints_of(Path(path))]
    with ExitStack() as stack:
        client: KmsClient | None = None
        if args.file is None or not args.public_key:
            client = stack.enter_context(connect(args))
        if args.file is not None:
            source = Path(args.file)
            lines: IO[str] = stack.enter_context(source.open(encoding="utf-8", errors="surrogateescape"))
            where = str(source)
        else:
            assert client is not None
            lines = stack.enter_context(tempfile.TemporaryFile("w+", encoding="ascii"))
            for line in AuditClient.of(client).export():
                lines.write(line + "\n")
            lines.seek(0)
            where = f"the export of {args.server}"
        fetched: list[str] = []
        if not args.public_key:
            assert client is not None
            for name in sorted(key_versions(lines) | {c.key_version for c in extra}):
                try:
                    by_version[name] = client.get_public_key(name).pem.encode("ascii")
                    fetched.append(name)
                except errors.NotFoundError:
                    continue  # its checkpoints fail as bad signatures
            lines.seek(0)
        try:
            check = signature_check(by_version, any_version)
        except ValueError as error:
            raise BadInputError(f"--public-key: {error}") from None
        report = verify_export_lines(lines, check, extra)
    data: dict[str, Any] = {
        "ok": report.ok,
        "source": where,
        "verified": report.verified,
        "signed": report.signed,
        "checkpoints": report.checkpoints,
        "head_hash": report.head_hash.hex(),
        "problem": report.problem,
        "first_bad": report.first_bad,
        "checkpoint": report.checkpoint,
        "detail": report.detail,
        "public_keys_from_server": fetched,
    }
    note = (
        f"\n  checked with the keys the server gave for {', '.join(fetched)}; pin them with --public-key"
        if fetched
        else ""
    )
    if report.ok:
        return Outcome(data, f"{report} ({where}){note}")
    first_bad = f"; first bad record: {report.first_bad}" if report.first_bad is not None else ""
    return Outcome(
        data, f"audit log of {where}{note}", problems=f"{report}{first_bad}", exit_code=EXIT_INTEGRITY
    )


# -- helpers -----------------------------------------------------------------------------------------


class _OwnRequests:
    """Request ids of this command's own calls (``tail --follow`` does not show its polls)."""

    def __init__(self) -> None:
        self._prefix = f"kmsctl-tail-{secrets.token_hex(6)}-"
        self._count = 0

    def new(self) -> str:
        self._count += 1
        return f"{self._prefix}{self._count}"

    def own(self, record: AuditRecordLine) -> bool:
        return record.request_id.startswith(self._prefix)


def _window(audit: AuditClient, first: int, limit: int, request_id: str) -> list[AuditRecordLine]:
    return list(_records(audit.export(first, limit, request_id=request_id)))


def _records(lines: Iterable[str]) -> Iterator[AuditRecordLine]:
    for number, line in enumerate(lines, 1):
        value = _json(line)
        if value.get("type") == "record":
            try:
                yield parse_record(number, value)
            except MalformedExport as error:
                raise errors.IntegrityError(f"the server sent an unreadable record: {error}") from None


def _json(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        raise errors.IntegrityError("the server sent an export line that is not JSON") from None
    if not isinstance(value, dict):
        raise errors.IntegrityError("the server sent an export line that is not a JSON object")
    return value


def _kind(line: str) -> str:
    value = _json(line).get("type")
    return value if isinstance(value, str) else ""


def _format(record: AuditRecordLine) -> str:
    target = " ".join(part for part in (record.product, record.resource, record.key_version) if part)
    who = f"{record.role or '-'} {record.caller or '(unauthenticated)'}"
    return (
        f"{record.seq:>7} {record.time} {record.outcome:<19} {record.operation} {who}"
        f"{' ' + target if target else ''} [{record.request_id}]"
    )


def _show(records: Iterable[AuditRecordLine], as_json: bool) -> None:
    for record in records:
        print(json.dumps(record.to_json(), sort_keys=True) if as_json else _format(record), flush=True)


def _pinned_keys(values: list[str]) -> tuple[dict[str, bytes], list[bytes]]:
    by_version: dict[str, bytes] = {}
    any_version: list[bytes] = []
    for value in values:
        name, separator, path = value.rpartition("=")
        data = Path(path if separator else value).read_bytes()
        if separator and name:
            by_version[name] = data
        else:
            any_version.append(data)
    return by_version, any_version


def _checkpoints_of(path: Path) -> list[CheckpointLine]:
    with path.open(encoding="utf-8") as file:
        try:
            return list(ExportReader(file).checkpoints())
        except MalformedExport as error:
            from kmsctl.cli import BadInputError

            raise BadInputError(f"--checkpoints {path}: {error}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
