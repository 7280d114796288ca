"""kmsctl: sign firmware images and digests with the firmware KMS, from a build server.

Synopsis::

    kmsctl sign IMAGE --product PRODUCT -o OUT
    kmsctl sign-digest --key NAME (--sha256 HEX | --sha384 HEX | --file FILE) [--encoding raw|der] -o SIG
    kmsctl public-key NAME [-o PEM]
    kmsctl efuse-digest NAME -o DIGEST.bin
    kmsctl keys list [--product PRODUCT]

Every command takes the connection options ``--server HOST:PORT`` (env ``KMSCTL_SERVER``, default
``localhost:50051``), ``--ca``, ``--cert``, ``--tls-key`` (env ``KMSCTL_CA``, ``KMSCTL_CERT``,
``KMSCTL_KEY``; the client key option is not ``--key`` because ``sign-digest --key`` names the signing key),
``--server-name``, ``--timeout``, ``--retries``, ``--json`` and ``-q/--quiet``. A file that
``--ca``/``--cert``/``--tls-key`` do not name comes from the development PKI that ``kms init`` creates:
``STATE_DIR/pki/ca.pem``, ``STATE_DIR/pki/clients/ROLE.pem`` and ``STATE_DIR/pki/clients/ROLE.key``,
where STATE_DIR is ``--state-dir`` (env ``KMS_STATE_DIR``, default ``./.kms``) and ROLE is ``--identity``
(default ``build-server``). A key NAME is ``keys/ID``, ``keys/ID/versions/N``, or just ``ID``.

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
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from kmsctl import errors
from kmsctl._files import atomic_write
from kmsctl._models import EncodingName, HashName, KeyInfo, ProgressCallback
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
    ``payload``, the requested output itself when it goes to stdout (printed even with --quiet)."""

    data: dict[str, Any]
    summary: str = ""
    payload: str = ""


Command = Callable[[argparse.Namespace, "KmsClient"], Outcome]


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
        with _connect(args) as client:
            outcome: Outcome = args.command(args, client)
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
    if args.json:
        print(json.dumps(outcome.data, indent=2, sort_keys=True))
    else:
        if outcome.payload:
            sys.stdout.write(outcome.payload)
        if outcome.summary and not args.quiet:
            print(outcome.summary)
    return EXIT_OK


# -- commands ----------------------------------------------------------------------------------------


def _sign(args: argparse.Namespace, client: KmsClient) -> Outcome:
    image = Path(args.image)
    show_progress = not (args.json or args.quiet) and sys.stderr.isatty()
    with _ProgressBar(enabled=show_progress, description=image.name) as bar:
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


# -- helpers -----------------------------------------------------------------------------------------


class _ProgressBar:
    """An upload progress bar on stderr, or nothing. Fed from gRPC's thread; restarts on a retry."""

    def __init__(self, *, enabled: bool, description: str) -> None:
        self._enabled = enabled
        self._description = description
        self._bar: tqdm[Any] | None = None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def callback(self) -> ProgressCallback | None:
        return self._update if self._enabled else None

    def _update(self, sent: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                desc=f"upload {self._description}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
            )
        if sent < self._bar.n:
            self._bar.reset(total=total)
        self._bar.update(sent - self._bar.n)


def _connect(args: argparse.Namespace) -> KmsClient:
    from kmsctl._client import KmsClient  # loads gRPC: see main()

    state = Path(args.state_dir)
    files = {
        "CA certificate": (args.ca, state / "pki" / "ca.pem", "--ca"),
        "client certificate": (args.cert, state / "pki" / "clients" / f"{args.identity}.pem", "--cert"),
        "client key": (args.tls_key, state / "pki" / "clients" / f"{args.identity}.key", "--tls-key"),
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
        description="Sign firmware images and digests with the firmware KMS (mutual TLS).",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    common = _connection_options()

    def add(subparsers: Any, name: str, summary: str, command: Command) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = subparsers.add_parser(
            name,
            help=summary,
            description=summary,
            parents=[common],
            epilog=_EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        sub.set_defaults(command=command)
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

    keys = commands.add_parser("keys", help="Inspect keys.", description="Inspect keys.")
    key_commands = keys.add_subparsers(title="commands", metavar="COMMAND", required=True)
    listing = add(key_commands, "list", "List keys and their versions.", _keys_list)
    listing.add_argument("--product", help="only this product's keys")
    return parser


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
        default="build-server",
        help="dev PKI client identity to use (default %(default)s)",
    )
    group.add_argument(
        "--server-name", metavar="NAME", help="check the server certificate against NAME instead of HOST"
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each attempt (default %(default)s)",
    )
    group.add_argument(
        "--retries",
        type=_non_negative_int,
        default=3,
        metavar="N",
        help="retries when the server is unavailable, with exponential backoff (default %(default)s)",
    )
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
