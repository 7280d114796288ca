"""kmsctl: sign firmware with the firmware KMS, register devices at the factory, fetch device payloads.

Synopsis::

    kmsctl sign IMAGE --product PRODUCT -o OUT
    kmsctl sign-digest --key NAME (--sha256 HEX | --sha384 HEX | --file FILE) [--encoding raw|der] -o SIG
    kmsctl public-key NAME [-o PEM]
    kmsctl efuse-digest NAME -o DIGEST.bin
    kmsctl keys list [--product PRODUCT]
    kmsctl audit tail [-n N] [--follow] | export -o FILE.jsonl | verify [FILE.jsonl] [--public-key PEM]
    kmsctl keys create --key-id ID --product PRODUCT --algorithm ALG [--purpose PURPOSE] [--slot N]
    kmsctl keys create-product-set --product PRODUCT
    kmsctl keys rotate KEY
    kmsctl keys disable|enable VERSION [--new-primary N]
    kmsctl keys set-primary VERSION
    kmsctl keys schedule-destroy VERSION [--delay DURATION] [--new-primary N]
    kmsctl keys cancel-destroy VERSION
    kmsctl keys set-rotation KEY (--period DURATION [--first-rotation TIME] | --clear)
    kmsctl keys history NAME
    kmsctl keys rollover --product PRODUCT (--trusted-key-id HEX | --trusted-key PEM) -o FILE
    kmsctl devices new-secret -o KEY.bin [--ecies]
    kmsctl devices register --product PRODUCT (--csv FILE | --jsonl FILE) [--plain-secrets]
                            [--state-file FILE] [--batch-size N]
    kmsctl devices show DEVICE_ID
    kmsctl devices revoke DEVICE_ID
    kmsctl payload get --device DEVICE_ID --release NAME [--format fksp|esp-encrypted-img]
                       [--segment-size N] [--device-secure-version N] -o OUT

Every command takes the connection options ``--server HOST:PORT`` (env ``KMSCTL_SERVER``, default
``localhost:50051``), ``--ca``, ``--cert``, ``--tls-key`` (env ``KMSCTL_CA``, ``KMSCTL_CERT``,
``KMSCTL_KEY``; the client key option is not ``--key`` because ``sign-digest --key`` names the signing key),
``--server-name``, ``--timeout``, ``--retries``, ``--json`` and ``-q/--quiet``. A file that
``--ca``/``--cert``/``--tls-key`` do not name comes from the development PKI that ``kms init`` creates:
``STATE_DIR/pki/ca.pem``, ``STATE_DIR/pki/clients/ROLE.pem`` and ``STATE_DIR/pki/clients/ROLE.key``,
where STATE_DIR is ``--state-dir`` (env ``KMS_STATE_DIR``, default ``./.kms``) and ROLE is ``--identity``,
by default the role the command is for: ``build-server`` (sign, sign-digest, public-key, efuse-digest,
keys list), ``factory-registrar`` (devices register, devices show), ``security-officer`` (devices revoke,
every other keys command: see ``kmsctl._admin_cli``), ``distribution-server`` (payload get). A key NAME
is ``keys/ID``, ``keys/ID/versions/N``, or just ``ID``; a release NAME is ``releases/HEX`` or just the hex
SHA-256. ``devices new-secret`` works offline.

``devices register`` reads CSV (header line) or JSON Lines with the fields device_id, chip, secret (hex) or
secret_file (a 32-byte file), and optionally ecies_public_key (hex); see ``kmsctl._device_input``. Rows
are numbered by their line in the file. Malformed rows are reported and not sent; the others go to the
server with their secrets wrapped for its HSM (``--plain-secrets``: in plaintext, under mutual TLS only).
Progress is saved after every acknowledgement in FILE.kmsctl-progress (``--state-file``), so running the
same command again after an interruption skips the rows already registered; the file is removed when the
whole input has been processed. The summary counts created, unchanged (registered before with the same
secret) and rejected rows, and lists the rejected rows on stderr (all of them in ``--json``).

``payload get`` downloads to OUT.part and renames it to OUT once complete and checked; a broken download is
resumed automatically, and an interrupted command resumes from OUT.part when run again.

Output files are written atomically (a temporary file beside the target, renamed over it once complete and
checked), so a failed command never leaves a partial file. ``--json`` prints one JSON object on stdout, also
for errors: ``{"error": {"code": ..., "message": ..., "exit_code": ...}}``. Otherwise errors are one line on
stderr: ``kmsctl: error: MESSAGE``. Argument syntax errors are reported by argparse on stderr. gRPC's own
diagnostics are off unless ``GRPC_VERBOSITY`` is set (e.g. ``GRPC_VERBOSITY=INFO`` to debug TLS).

Exit codes:
    0  success
    1  unexpected error
    2  usage error (bad command line)
    3  invalid argument or bad input (refused by the server or locally; also a missing local file and an
       image above the server's size limit)
    4  not found (product, key or key version)
    5  failed precondition (anti-rollback floor, key state, chip rules)
    6  permission denied or unauthenticated
    7  server unavailable after retries, or deadline exceeded
    8  integrity check failed or data lost (a response did not match its checksum)
    130 interrupted

``devices register`` exits 0 when every row was registered (created or unchanged), 3 when any row was
rejected as invalid (malformed in the file or refused by the server; this wins over 5), 5 when rows were
refused only because the device is registered with another secret (ALREADY_EXISTS); counts include the
earlier runs of a resumed registration. Whole-command failures use the codes above.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import enum
import errno
import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from kmsctl import errors
from kmsctl._device_input import DeviceInput, InputError, InputFormat, InputRow, RegisterState
from kmsctl._files import atomic_write
from kmsctl._models import (
    SECRET_SIZE,
    DeviceInfo,
    DeviceRegistration,
    EncodingName,
    HashName,
    KeyInfo,
    PayloadFormatName,
    ProgressCallback,
    RegistrationStatus,
    RowOutcome,
)
from kmsctl._retry import RetryPolicy

if TYPE_CHECKING:
    from kmsctl._client import KmsClient

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INVALID = 3
EXIT_NOT_FOUND = 4
EXIT_PRECONDITION = 5
EXIT_PERMISSION = 6
EXIT_UNAVAILABLE = 7
EXIT_INTEGRITY = 8
EXIT_INTERRUPTED = 130

_EXIT_CODES_HELP = """\
exit codes:
  0  success                         5  failed precondition (anti-rollback, key state)
  1  unexpected error                6  permission denied or unauthenticated
  2  usage error                     7  unavailable after retries, or deadline exceeded
  3  invalid argument or bad input   8  integrity check failed or data loss
  4  not found                     130  interrupted
"""

_EXIT_BY_ERROR: tuple[tuple[type[errors.KmsClientError], int], ...] = (
    (errors.InvalidArgumentError, EXIT_INVALID),
    (errors.ResourceExhaustedError, EXIT_INVALID),
    (errors.NotFoundError, EXIT_NOT_FOUND),
    (errors.FailedPreconditionError, EXIT_PRECONDITION),
    (errors.AlreadyExistsError, EXIT_PRECONDITION),
    (errors.PermissionDeniedError, EXIT_PERMISSION),
    (errors.UnauthenticatedError, EXIT_PERMISSION),
    (errors.UnavailableError, EXIT_UNAVAILABLE),
    (errors.DeadlineExceededError, EXIT_UNAVAILABLE),
    (errors.DataLossError, EXIT_INTEGRITY),
)
# Local file problems the user can fix; others (disk full, I/O error) are unexpected.
_BAD_INPUT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST}


class BadInputError(Exception):
    """A command-line value that parses but cannot be used (exit 3)."""


@dataclasses.dataclass
class Outcome:
    """What a command reports: ``data`` for --json; ``summary`` for people (silenced by --quiet);
    ``payload``, the requested output itself when it goes to stdout (printed even with --quiet);
    ``problems``, lines for stderr (not with --json, where ``data`` carries them); ``exit_code``."""

    data: dict[str, Any]
    summary: str = ""
    payload: str = ""
    problems: str = ""
    exit_code: int = EXIT_OK


Command = Callable[[argparse.Namespace, "KmsClient"], Outcome]
LocalCommand = Callable[[argparse.Namespace], Outcome]

# The role each command is for, as the dev PKI names its client certificates.
BUILD_SERVER = "build-server"
FACTORY_REGISTRAR = "factory-registrar"
SECURITY_OFFICER = "security-officer"
DISTRIBUTION_SERVER = "distribution-server"
#: Rejected rows listed on stderr at most (--json lists them all).
_REJECTED_SHOWN = 50


def main(argv: Sequence[str] | None = None) -> int:
    """Run kmsctl with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    # gRPC's C core logs handshake failures and the like on stderr, which would break the one-line error
    # format. It reads this only when first loaded, which is why kmsctl imports gRPC lazily.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        outcome: Outcome
        if args.local_command is not None:
            outcome = args.local_command(args)
        else:
            with _connect(args) as client:
                outcome = args.command(args, client)
    except KeyboardInterrupt:
        return _report_error(args, "CANCELLED", "interrupted", EXIT_INTERRUPTED)
    except errors.KmsClientError as error:
        return _report_error(args, error.code, error.message, _exit_code(error))
    except BadInputError as error:
        return _report_error(args, "INVALID_ARGUMENT", str(error), EXIT_INVALID)
    except OSError as error:
        status = EXIT_INVALID if error.errno in _BAD_INPUT_ERRNOS else EXIT_UNEXPECTED
        return _report_error(args, "OS_ERROR", _describe_os_error(error), status)
    except Exception as error:  # noqa: BLE001 -- the one place any failure becomes an exit code
        return _report_error(args, "UNKNOWN", f"unexpected {type(error).__name__}: {error}", EXIT_UNEXPECTED)
    try:
        if args.json:
            print(json.dumps(outcome.data, indent=2, sort_keys=True))
        else:
            if outcome.payload:
                sys.stdout.write(outcome.payload)
            if outcome.summary and not args.quiet:
                print(outcome.summary)
            if outcome.problems:
                print(outcome.problems, file=sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (kmsctl ... | head): the work is done; stay quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error again at interpreter exit
    return outcome.exit_code


# -- commands ----------------------------------------------------------------------------------------


def _sign(args: argparse.Namespace, client: KmsClient) -> Outcome:
    image = Path(args.image)
    show_progress = not (args.json or args.quiet) and sys.stderr.isatty()
    with _ProgressBar(enabled=show_progress, description=f"upload {image.name}") as bar:
        signed = client.sign_image(args.product, image, progress=bar.callback, output=args.output)
    release = signed.release
    data = {**_json_value(release), "output": str(args.output)}
    reused = " (signed earlier; stored release returned)" if release.reused else ""
    summary = "\n".join(
        [
            f"signed {image} for product {release.product} -> {args.output}{reused}",
            *_rows(
                ("release", release.name),
                ("chip", release.chip),
                ("version", release.version),
                ("secure_version", str(release.secure_version)),
                ("project", release.project_name),
                ("key versions", ", ".join(release.key_versions)),
                ("sha256", release.output_sha256.hex()),
                ("size", f"{release.output_size} bytes"),
                ("signed by", release.signed_by),
            ),
        ]
    )
    return Outcome(data, summary)


def _sign_digest(args: argparse.Namespace, client: KmsClient) -> Outcome:
    name = _key_name(args.key)
    hash_name: HashName
    if args.file is not None:
        hash_name = client.get_public_key(name).algorithm.hash
        digest = _hash_file(Path(args.file), hash_name)
    elif args.sha384 is not None:
        hash_name, digest = "sha384", _parse_hex(args.sha384, "--sha384")
    else:
        hash_name, digest = "sha256", _parse_hex(args.sha256, "--sha256")
    encoding: EncodingName = args.encoding
    result = client.sign_digest(name, digest, hash=hash_name, encoding=encoding)
    atomic_write(args.output, result.signature)
    data = {
        "key_version": result.key_version,
        "algorithm": result.algorithm.value,
        "encoding": result.encoding,
        "hash": hash_name,
        "digest": digest.hex(),
        "signature": base64.b64encode(result.signature).decode("ascii"),
        "output": str(args.output),
    }
    summary = (
        f"signed {hash_name} digest {digest.hex()} with {result.key_version} "
        f"({result.algorithm.value}, {result.encoding}) -> {args.output}"
    )
    return Outcome(data, summary)


def _public_key(args: argparse.Namespace, client: KmsClient) -> Outcome:
    info = client.get_public_key(_key_name(args.name))
    data: dict[str, Any] = _json_value(info)
    if args.output is None:
        return Outcome(data, payload=info.pem)
    atomic_write(args.output, info.pem.encode("ascii"))
    data["output"] = str(args.output)
    return Outcome(
        data, f"wrote the public key of {info.key_version} ({info.algorithm.value}) to {args.output}"
    )


def _efuse_digest(args: argparse.Namespace, client: KmsClient) -> Outcome:
    info = client.get_public_key(_key_name(args.name))
    atomic_write(args.output, info.sbv2_key_digest)
    data = {
        "key_version": info.key_version,
        "algorithm": info.algorithm.value,
        "sbv2_key_digest": info.sbv2_key_digest.hex(),
        "output": str(args.output),
    }
    summary = (
        f"wrote the Secure Boot V2 key digest of {info.key_version} ({info.algorithm.value}) to "
        f"{args.output}\n  {info.sbv2_key_digest.hex()}"
    )
    return Outcome(data, summary)


def _keys_list(args: argparse.Namespace, client: KmsClient) -> Outcome:
    keys = client.list_keys(args.product)
    return Outcome({"keys": [_json_value(key) for key in keys]}, payload=_key_table(keys))


def _key_table(keys: Sequence[KeyInfo]) -> str:
    header = ("NAME", "PRODUCT", "PURPOSE", "ALGORITHM", "SLOT", "PRIMARY", "VERSIONS")
    rows = [
        (
            key.name,
            key.product,
            key.purpose.value,
            key.algorithm.value,
            "-" if key.sbv2_slot is None else str(key.sbv2_slot),
            key.primary_version.rpartition("/")[2] or "-",
            " ".join(f"{v.name.rpartition('/')[2]}:{v.state.value}" for v in key.versions),
        )
        for key in keys
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


# -- devices and payloads ----------------------------------------------------------------------------


def _devices_new_secret(args: argparse.Namespace) -> Outcome:
    output = Path(args.output)
    secret = bytearray(os.urandom(SECRET_SIZE))
    try:
        ecies = _ecies_public_key(secret) if args.ecies else None
        _write_new_secret(output, secret)
    finally:
        secret[:] = bytes(SECRET_SIZE)
    data: dict[str, Any] = {"output": str(output), "size": SECRET_SIZE, "mode": "0600"}
    lines = [
        f"wrote a new {SECRET_SIZE}-byte eFuse secret to {output} (mode 0600)",
        f"  burn it with: espefuse burn-key BLOCK_KEYn {output} HMAC_UP",
    ]
    if ecies is not None:
        data["ecies_public_key"] = ecies.hex()
        lines.append(f"  ecies public key (X||Y): {ecies.hex()}")
    return Outcome(data, "\n".join(lines))


def _ecies_public_key(secret: bytearray) -> bytes:
    """The esp_encrypted_img ECIES public key (X||Y) a device with ``secret`` as its HMAC_UP key exports.
    Draws a new secret in the (2^-32) case where the secret gives no usable key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from kmsctl.device.esp_encrypted_img import ImageRejected, device_public_key_der, efuse_hmac_from_secret

    while True:
        try:
            der = device_public_key_der(efuse_hmac_from_secret(bytes(secret)))
            break
        except ImageRejected:
            secret[:] = os.urandom(SECRET_SIZE)
    key = serialization.load_der_public_key(der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]


def _write_new_secret(output: Path, secret: bytearray) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(output, flags, 0o600)
    except FileExistsError:
        raise BadInputError(f"{output} exists; kmsctl never overwrites a secret") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            if hasattr(os, "fchmod"):
                os.fchmod(file.fileno(), 0o600)
            file.write(secret)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        output.unlink(missing_ok=True)
        raise


class _RegisterRun:
    """Counts and state of one ``devices register`` run: feeds the rows, records every acknowledgement in
    the state file, keeps malformed rows until the rows around them are acknowledged."""

    def __init__(self, state: RegisterState, state_path: Path, bar: _ProgressBar, total: int | None) -> None:
        self.state = state
        self._state_path = state_path
        self._bar = bar
        self._total = total
        self._lock = threading.Lock()
        self._malformed: list[InputRow] = []  # read (on gRPC's thread), not yet counted
        self._counted_malformed = 0
        self._last_row = state.last_row
        self.rejected: list[dict[str, Any]] = []  # this run's

    def rows(self, source: DeviceInput, after: int) -> Iterator[DeviceRegistration]:
        for item in source:
            if item.row <= after:
                continue
            if item.registration is None:
                with self._lock:
                    self._malformed.append(item)
                continue
            yield item.registration

    def outcome(self, outcome: RowOutcome) -> None:
        if outcome.status is RegistrationStatus.CREATED:
            self.state.created += 1
        elif outcome.status is RegistrationStatus.UNCHANGED:
            self.state.unchanged += 1
        elif outcome.status is RegistrationStatus.REPROVISIONED:
            self.state.reprovisioned += 1
        else:
            self.rejected.append(
                self.state.record(outcome.row, outcome.device_id, outcome.code, outcome.message)
            )
        self._last_row = outcome.row

    def progress(self, done: int, total: int | None) -> None:
        if done == 0:
            return
        self._count_malformed(up_to=self._last_row)
        self.state.last_row = self._last_row
        self.state.save(self._state_path)
        self._bar.update(done + self._counted_malformed, self._total)

    def finish(self) -> None:
        self._count_malformed(up_to=None)

    def _count_malformed(self, up_to: int | None) -> None:
        with self._lock:
            ready = [item for item in self._malformed if up_to is None or item.row <= up_to]
            self._malformed = self._malformed[len(ready) :]  # rows arrive in order
        for item in ready:
            self.rejected.append(self.state.record(item.row, item.device_id, "INVALID_ARGUMENT", item.error))
        self._counted_malformed += len(ready)


def _devices_register(args: argparse.Namespace, client: KmsClient) -> Outcome:
    kind: InputFormat = "csv" if args.csv is not None else "jsonl"
    path = Path(args.csv if args.csv is not None else args.jsonl)
    state_path = Path(args.state_file) if args.state_file else path.with_name(f"{path.name}.kmsctl-progress")
    try:
        source = DeviceInput(path, kind)
        state = RegisterState.load(state_path)
    except InputError as error:
        raise BadInputError(f"{path}: {error}") from None
    digest = source.sha256()
    if state is None:
        state = RegisterState(product=args.product, input=str(path), input_sha256=digest)
    elif state.input_sha256 != digest or state.product != args.product:
        raise BadInputError(
            f"{state_path} records the progress of another registration (a different input file or "
            "product); delete it to start over (registering the same devices again is harmless)"
        )
    resumed_after = state.last_row
    earlier = list(state.rejected)  # details of the earlier runs' rejected rows (up to a limit)
    show_progress = not (args.json or args.quiet) and sys.stderr.isatty()
    try:
        total = source.count(after=resumed_after) if show_progress else None
    except InputError as error:
        raise BadInputError(f"{path}: {error}") from None
    if args.plain_secrets and not args.quiet and not args.json:
        print("kmsctl: warning: sending eFuse secrets in plaintext (mutual TLS only)", file=sys.stderr)
    with _ProgressBar(enabled=show_progress, description=f"register {path.name}", unit="dev") as bar:
        run = _RegisterRun(state, state_path, bar, total)
        try:
            summary = client.register_devices(
                args.product,
                run.rows(source, resumed_after),
                transport="plain" if args.plain_secrets else "wrapped",
                batch_size=args.batch_size,
                progress=run.progress,
                on_outcome=run.outcome,
            )
        except (errors.KmsClientError, InputError) as error:
            hint = f"; progress saved in {state_path}: run again to resume after row {state.last_row}"
            if isinstance(error, InputError):
                raise BadInputError(f"{path}: {error}{hint if state.last_row else ''}") from None
            if state.last_row == 0:
                raise
            raise type(error)(error.message + hint, code=error.code) from error
        run.finish()
    state_path.unlink(missing_ok=True)
    return _register_outcome(
        args, path, state, earlier, run.rejected, summary.transport_key_version, resumed_after
    )


def _register_outcome(
    args: argparse.Namespace,
    path: Path,
    state: RegisterState,
    earlier: list[dict[str, Any]],
    rejected_now: list[dict[str, Any]],
    transport_key_version: str,
    resumed_after: int,
) -> Outcome:
    rejected = sorted([*earlier, *rejected_now], key=lambda entry: int(entry["row"]))
    rejected_count = state.invalid + state.conflicts
    exit_code = EXIT_INVALID if state.invalid else EXIT_PRECONDITION if state.conflicts else EXIT_OK
    data: dict[str, Any] = {
        "product": args.product,
        "input": str(path),
        "transport": "plain" if args.plain_secrets else "wrapped",
        "transport_key_version": transport_key_version,
        "created": state.created,
        "unchanged": state.unchanged,
        "reprovisioned": state.reprovisioned,
        "rejected_count": rejected_count,
        "invalid": state.invalid,
        "conflicts": state.conflicts,
        "rejected": rejected,
        "resumed_after_row": resumed_after,
    }
    how = (
        f"secrets wrapped for {transport_key_version}"
        if transport_key_version
        else "secrets in plaintext under mutual TLS"
    )
    lines = [f"registered the devices of {path} for product {args.product} ({how})"]
    if resumed_after:
        lines.append(f"  resumed after row {resumed_after}; the counts include the earlier runs")
    lines += _rows(
        ("created", str(state.created)),
        ("unchanged", str(state.unchanged)),
        ("reprovisioned", str(state.reprovisioned) if state.reprovisioned else ""),
        ("rejected", f"{rejected_count} ({state.invalid} invalid, {state.conflicts} already registered)"),
    )
    problems = [
        f"kmsctl: row {entry['row']} ({entry['device_id'] or '?'}): {entry['code']}: {entry['message']}"
        for entry in rejected[:_REJECTED_SHOWN]
    ]
    if rejected_count > len(problems):
        problems.append(f"kmsctl: ... {rejected_count - len(problems)} more rejected rows (see --json)")
    return Outcome(data, "\n".join(lines), problems="\n".join(problems), exit_code=exit_code)


def _devices_show(args: argparse.Namespace, client: KmsClient) -> Outcome:
    device = client.device(args.device_id)
    return Outcome(_json_value(device), _device_summary(f"device {device.device_id}", device))


def _devices_revoke(args: argparse.Namespace, client: KmsClient) -> Outcome:
    device = client.revoke_device(args.device_id)
    return Outcome(_json_value(device), _device_summary(f"revoked device {device.device_id}", device))


def _device_summary(title: str, device: DeviceInfo) -> str:
    # "registered" is the first registration; after a re-provisioning, who installed the current secret.
    replaced = device.secret_generation > 1
    secret_at = device.secret_register_time.isoformat() if device.secret_register_time else ""
    return "\n".join(
        [
            title,
            *_rows(
                ("product", device.product),
                ("chip", device.chip),
                ("state", device.state.value),
                ("kek version", device.kek_version),
                ("ecies key", "yes" if device.has_ecies_public_key else "no"),
                ("registered by", device.registered_by),
                ("registered at", device.register_time.isoformat() if device.register_time else ""),
                ("generation", str(device.secret_generation)),
                ("secret by", (device.secret_registered_by or "(not recorded)") if replaced else ""),
                ("secret at", secret_at if replaced else ""),
                ("approved under", device.reprovisioned_under if replaced else ""),
                (
                    "reprovision by",
                    device.reprovision_until.isoformat() if device.reprovision_until else "",
                ),
            ),
        ]
    )


def _payload_get(args: argparse.Namespace, client: KmsClient) -> Outcome:
    output = Path(args.output)
    payload_format: PayloadFormatName = args.format
    show_progress = not (args.json or args.quiet) and sys.stderr.isatty()
    with _ProgressBar(enabled=show_progress, description=f"download {output.name}") as bar:
        download = client.get_payload(
            args.device,
            args.release,
            format=payload_format,
            segment_size=args.segment_size,
            device_secure_version=args.device_secure_version,
            output=output,
            resume=True,
            progress=bar.callback,
        )
    info = download.info
    data = {
        **_json_value(info),
        "output": str(output),
        "resumed_from": download.start_offset,
        "resumes": download.resumes,
    }
    resumed = f" (resumed at byte {download.start_offset})" if download.start_offset else ""
    summary = "\n".join(
        [
            f"wrote the {info.format.value} payload of {info.release} for device {info.device_id} "
            f"to {output}{resumed}",
            *_rows(
                ("size", f"{info.total_size} bytes"),
                ("secure_version", str(info.secure_version)),
                ("segment size", str(info.segment_size) if info.segment_size else ""),
                ("manifest key", info.manifest_key_version),
            ),
        ]
    )
    return Outcome(data, summary)


# -- helpers -----------------------------------------------------------------------------------------


class _ProgressBar:
    """A progress bar on stderr, or nothing. Fed by a callback (possibly from gRPC's thread); goes back
    when a retried upload restarts."""

    def __init__(self, *, enabled: bool, description: str, unit: str = "B") -> None:
        self._enabled = enabled
        self._description = description
        self._unit = unit
        self._bar: tqdm[Any] | None = None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def callback(self) -> ProgressCallback | None:
        return self._update if self._enabled else None

    def update(self, position: int, total: int | None) -> None:
        if self._enabled:
            self._update(position, total)

    def _update(self, position: int, total: int | None) -> None:
        if self._bar is None:
            in_bytes = self._unit == "B"
            self._bar = tqdm(
                total=total,
                desc=self._description,
                unit=self._unit,
                unit_scale=in_bytes,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
            )
        if position < self._bar.n:
            self._bar.reset(total=total)
        self._bar.update(position - self._bar.n)


def _connect(args: argparse.Namespace) -> KmsClient:
    from kmsctl._client import KmsClient  # loads gRPC: see main()

    state = Path(args.state_dir)
    identity = args.identity or args.default_identity
    files = {
        "CA certificate": (args.ca, state / "pki" / "ca.pem", "--ca"),
        "client certificate": (args.cert, state / "pki" / "clients" / f"{identity}.pem", "--cert"),
        "client key": (args.tls_key, state / "pki" / "clients" / f"{identity}.key", "--tls-key"),
    }
    paths: dict[str, Path] = {}
    for label, (given, default, option) in files.items():
        path = Path(given) if given else default
        if not path.is_file():
            hint = "" if given else f" (give {option}, or choose the dev PKI with --state-dir and --identity)"
            raise BadInputError(f"{label} {path} not found{hint}")
        paths[label] = path
    return KmsClient.from_files(
        args.server,
        ca=paths["CA certificate"],
        cert=paths["client certificate"],
        key=paths["client key"],
        server_name_override=args.server_name,
        timeout=args.timeout,
        retries=RetryPolicy(max_attempts=args.retries + 1),
    )


def _key_name(text: str) -> str:
    return text if text.startswith("keys/") else f"keys/{text}"


def _parse_hex(text: str, option: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BadInputError(f"{option} expects a hexadecimal digest") from None


def _hash_file(path: Path, hash_name: HashName) -> bytes:
    hasher = hashlib.new(hash_name)
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            hasher.update(block)
    return hasher.digest()


def _rows(*rows: tuple[str, str]) -> list[str]:
    return [f"  {label:<16}{value}" for label, value in rows if value]


def _json_value(value: Any) -> Any:
    """Results as JSON: digests and other bytes in hex, enums by value, times in ISO 8601."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _json_value(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_json_value(item) for item in value]
    return value


def _exit_code(error: errors.KmsClientError) -> int:
    return next((code for kind, code in _EXIT_BY_ERROR if isinstance(error, kind)), EXIT_UNEXPECTED)


def _describe_os_error(error: OSError) -> str:
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _report_error(args: argparse.Namespace, code: str, message: str, exit_code: int) -> int:
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message, "exit_code": exit_code}}))
    else:
        print(f"kmsctl: error: {message}", file=sys.stderr)
    return exit_code


# -- argument parsing --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each leaf command sets ``command`` to its function."""
    parser = argparse.ArgumentParser(
        prog="kmsctl",
        description="Sign firmware, register devices and fetch device payloads with the firmware KMS "
        "(mutual TLS).",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    connection = _connection_options()
    output = _output_options()

    def add(
        subparsers: Any,
        name: str,
        summary: str,
        command: Command,
        *,
        identity: str = BUILD_SERVER,
        epilog: str = "",
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = subparsers.add_parser(
            name,
            help=summary,
            description=summary,
            parents=[connection, output],
            epilog=f"{epilog}default --identity: {identity}\n\n{_EXIT_CODES_HELP}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        sub.set_defaults(command=command, local_command=None, default_identity=identity)
        return sub

    sign = add(commands, "sign", "Sign an ESP app image with its product's Secure Boot V2 keys.", _sign)
    sign.add_argument("image", metavar="IMAGE", help="the unsigned app image (.bin)")
    sign.add_argument("--product", required=True, help="product whose keys sign the image")
    sign.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write the signed image")

    digest = add(commands, "sign-digest", "Sign a SHA-256 or SHA-384 digest with a key.", _sign_digest)
    digest.add_argument("--key", required=True, metavar="NAME", help="keys/ID, keys/ID/versions/N or ID")
    source = digest.add_mutually_exclusive_group(required=True)
    source.add_argument("--sha256", metavar="HEX", help="a SHA-256 digest, in hex")
    source.add_argument("--sha384", metavar="HEX", help="a SHA-384 digest, in hex")
    source.add_argument("--file", metavar="FILE", help="hash FILE locally with the key's hash and sign that")
    digest.add_argument(
        "--encoding",
        choices=["raw", "der"],
        default="raw",
        help="raw: r||s (ECDSA) or the RSA-PSS octets; der: ASN.1 ECDSA signature (default: raw)",
    )
    digest.add_argument("-o", "--output", metavar="SIG", required=True, help="where to write the signature")

    public = add(commands, "public-key", "Print or save a key version's public key (PEM).", _public_key)
    public.add_argument("name", metavar="NAME", help="keys/ID (primary version), keys/ID/versions/N or ID")
    public.add_argument("-o", "--output", metavar="PEM", help="write the PEM here instead of stdout")

    efuse = add(
        commands,
        "efuse-digest",
        "Save the 32-byte Secure Boot V2 key digest to burn into a SECURE_BOOT_DIGESTn eFuse "
        "(as espsecure digest-sbv2-public-key writes it).",
        _efuse_digest,
    )
    efuse.add_argument("name", metavar="NAME", help="keys/ID (primary version), keys/ID/versions/N or ID")
    efuse.add_argument("-o", "--output", metavar="DIGEST", required=True, help="where to write the digest")

    keys = commands.add_parser(
        "keys", help="Inspect and administer keys.", description="Inspect and administer keys."
    )
    key_commands = keys.add_subparsers(title="commands", metavar="COMMAND", required=True)
    listing = add(key_commands, "list", "List keys and their versions.", _keys_list)
    listing.add_argument("--product", help="only this product's keys")
    from kmsctl._admin_cli import add_key_admin_commands  # imports this module: see its docstring

    add_key_admin_commands(key_commands, [connection, output])
    from kmsctl._rollover_cli import add_rollover_commands  # imports this module lazily: see its docstring

    add_rollover_commands(key_commands, [connection, output])
    from kmsctl._audit_cli import add_audit_commands  # imports this module lazily: see its docstring

    add_audit_commands(commands, add, _connect)
    from kmsctl._kek_cli import add_kek_commands  # imports this module lazily: see its docstring

    add_kek_commands(commands, [connection, output])
    from kmsctl._approvals_cli import add_approval_commands  # imports this module lazily: see its docstring

    add_approval_commands(commands, [connection, output])
    from kmsctl._policy_cli import add_policy_commands  # imports this module lazily: see its docstring

    add_policy_commands(commands, [connection, output])
    from kmsctl._floor_cli import add_floor_commands  # imports this module lazily: see its docstring

    add_floor_commands(commands, [connection, output])
    from kmsctl._slots_cli import add_slot_commands  # imports this module lazily: see its docstring

    add_slot_commands(commands, [connection, output])

    devices = commands.add_parser(
        "devices", help="Register and manage devices (factory).", description="Register and manage devices."
    )
    device_commands = devices.add_subparsers(title="commands", metavar="COMMAND", required=True)
    new_key_help = (
        "Write a new random 32-byte eFuse secret (mode 0600; never overwrites), the file "
        "`espefuse burn-key BLOCK_KEYn KEY.bin HMAC_UP` burns. Works offline."
    )
    new_secret = device_commands.add_parser(
        "new-secret",
        help=new_key_help,
        description=new_key_help,
        parents=[output],
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    new_secret.set_defaults(local_command=_devices_new_secret)
    new_secret.add_argument("-o", "--output", metavar="KEY.bin", required=True, help="where to write it")
    new_secret.add_argument(
        "--ecies",
        action="store_true",
        help="also print the device's esp_encrypted_img ECIES public key (X||Y hex) for registration",
    )

    register = add(
        device_commands,
        "register",
        "Register devices and their eFuse secrets from a CSV or JSON Lines file (resumable).",
        _devices_register,
        identity=FACTORY_REGISTRAR,
        epilog=_REGISTER_HELP,
    )
    register.add_argument("--product", required=True, help="the product the devices belong to")
    register_input = register.add_mutually_exclusive_group(required=True)
    register_input.add_argument("--csv", metavar="FILE", help="CSV with a header line")
    register_input.add_argument("--jsonl", metavar="FILE", help="JSON Lines: one object per line")
    register.add_argument(
        "--plain-secrets",
        action="store_true",
        help="send the secrets in plaintext under mutual TLS, instead of wrapped for the server's HSM",
    )
    register.add_argument(
        "--state-file",
        metavar="FILE",
        help="where progress is saved for a resumed run (default: FILE.kmsctl-progress beside the input)",
    )
    register.add_argument(
        "--batch-size",
        type=_batch_size,
        default=500,
        metavar="N",
        help="rows per message, 1-1000 (default %(default)s)",
    )

    show = add(
        device_commands,
        "show",
        "Show a registered device (never its secret).",
        _devices_show,
        identity=FACTORY_REGISTRAR,
    )
    show.add_argument("device_id", metavar="DEVICE_ID")
    revoke = add(
        device_commands,
        "revoke",
        "Revoke a device: it gets no payload from now on (idempotent).",
        _devices_revoke,
        identity=SECURITY_OFFICER,
    )
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    from kmsctl._reprovision_cli import add_reprovision_command  # imports this module lazily

    add_reprovision_command(device_commands, [connection, output])

    payload = commands.add_parser(
        "payload", help="Fetch per-device payloads (distribution).", description="Fetch per-device payloads."
    )
    payload_commands = payload.add_subparsers(title="commands", metavar="COMMAND", required=True)
    get = add(
        payload_commands,
        "get",
        "Download a release's payload sealed for one device (resumes from OUT.part).",
        _payload_get,
        identity=DISTRIBUTION_SERVER,
    )
    get.add_argument("--device", required=True, metavar="DEVICE_ID", help="the device the payload is for")
    get.add_argument("--release", required=True, metavar="NAME", help="releases/HEX or the hex SHA-256")
    get.add_argument(
        "--format",
        choices=["fksp", "esp-encrypted-img"],
        default="fksp",
        help="fksp: the sealed format (docs/sealed-payload-v1.md); esp-encrypted-img: Espressif's "
        "pre-encrypted OTA, ECIES (default: %(default)s)",
    )
    get.add_argument(
        "--segment-size",
        type=int,
        metavar="N",
        help="fksp: plaintext bytes per segment, 256-1048576 (default 4096)",
    )
    get.add_argument(
        "--device-secure-version",
        type=_non_negative_int,
        metavar="N",
        help="the device's anti-rollback floor: refuse a release below it",
    )
    get.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write the payload")
    return parser


_REGISTER_HELP = """\
input: CSV (header line) or JSON Lines with the fields
  device_id         1-64 printable ASCII characters, no spaces (e.g. the base MAC)
  chip              as esptool names it, e.g. esp32s3
  secret            the 32-byte eFuse secret in hex (64 characters), or
  secret_file       a file holding the 32 bytes (relative to the input file's directory)
  ecies_public_key  optional: the esp_encrypted_img ECIES public key, hex (X||Y or 04||X||Y)
Row numbers are line numbers in the file (a CSV file's first device is row 2).

registration exit codes: 0 every row registered (created, or unchanged: registered before with
the same secret, or reprovisioned: a new secret that officers allowed, see `devices reprovision`);
3 a row was rejected as invalid (wins over 5); 5 a device is already registered with another
secret. Counts include the earlier runs of a resumed registration.

"""


def _batch_size(text: str) -> int:
    value = _non_negative_int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be 1-1000")
    return value


def _connection_options() -> argparse.ArgumentParser:
    env = os.environ.get
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=env("KMSCTL_SERVER", "localhost:50051"),
        help="the KMS address (env KMSCTL_SERVER; default %(default)s)",
    )
    group.add_argument(
        "--ca", metavar="PEM", default=env("KMSCTL_CA"), help="CA certificate, PEM (env KMSCTL_CA)"
    )
    group.add_argument(
        "--cert", metavar="PEM", default=env("KMSCTL_CERT"), help="client certificate, PEM (env KMSCTL_CERT)"
    )
    group.add_argument(
        "--tls-key",
        metavar="PEM",
        default=env("KMSCTL_KEY"),
        help="client private key, PEM (env KMSCTL_KEY); not --key, which names a signing key",
    )
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        default=env("KMS_STATE_DIR", ".kms"),
        help="where the dev PKI is, for files --ca/--cert/--tls-key do not name "
        "(env KMS_STATE_DIR; default %(default)s)",
    )
    group.add_argument(
        "--identity",
        metavar="ROLE",
        help="dev PKI client identity to use (default: the role the command is for, named below)",
    )
    group.add_argument(
        "--server-name", metavar="NAME", help="check the server certificate against NAME instead of HOST"
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each attempt; for the registration and payload streams, the longest the server "
        "may stay silent (default %(default)s)",
    )
    group.add_argument(
        "--retries",
        type=_non_negative_int,
        default=3,
        metavar="N",
        help="retries when the server is unavailable, with exponential backoff (default %(default)s)",
    )
    return options


def _output_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    output = options.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    output.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing but errors and requested data"
    )
    return options


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be zero or more")
    return value


def _version() -> str:
    try:
        return metadata.version("firmware-kms")
    except metadata.PackageNotFoundError:
        return "unknown"
