"""The input files of ``kmsctl devices register`` and its resume state file.

Input: CSV with a header line, or JSON Lines (one object per line), with the fields

    device_id          required; 1-64 printable ASCII characters without spaces
    chip               required; as esptool names it (esp32s3; "ESP32-S3" is accepted and normalized)
    secret             the 32-byte eFuse secret in hex (64 characters), or
    secret_file        a file holding exactly those 32 bytes (as ``espefuse burn-key`` takes it); a relative
                       path is relative to the input file's directory
    ecies_public_key   optional; the esp_encrypted_img ECIES public key in hex, X||Y or 04||X||Y

Row numbers are line numbers in the input file, so a CSV file's first device is row 2 (after the header),
as a spreadsheet shows it; blank lines are skipped. An unknown CSV column is refused up front (a misspelt
column must not silently drop data); in JSONL it makes that row malformed. A malformed row is reported
with its number and not sent.

State: after every acknowledgement the command replaces ``FILE.kmsctl-progress`` (atomically) with the last
acknowledged row and the counts so far; a later run over the same file (same SHA-256) and product skips the
rows up to it. The file is removed once the whole input has been processed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kmsctl._files import atomic_write
from kmsctl._models import SECRET_SIZE, DeviceRegistration

InputFormat = Literal["csv", "jsonl"]

FIELDS = ("device_id", "chip", "secret", "secret_file", "ecies_public_key")
_REQUIRED = ("device_id", "chip")
STATE_VERSION = 1
#: Rejected rows of earlier runs the state file keeps in detail (the counts are always complete).
STATE_REJECTED_LIMIT = 100


class InputError(Exception):
    """The input or state file cannot be used at all (not one row of it)."""


@dataclass(frozen=True)
class InputRow:
    """One row of the input: a registration, or why the row is malformed (``error``)."""

    row: int
    device_id: str
    registration: DeviceRegistration | None = None
    error: str = ""


class DeviceInput:
    """The rows of an input file, read lazily (the file may hold millions)."""

    def __init__(self, path: Path, kind: InputFormat) -> None:
        self.path = path
        self.kind = kind
        if kind == "csv":
            with path.open(encoding="utf-8-sig", newline="") as file:
                try:
                    self._columns = _csv_columns(file)
                except (UnicodeDecodeError, csv.Error) as error:
                    raise InputError(f"not a readable CSV text file: {error}") from None

    def __iter__(self) -> Iterator[InputRow]:
        """The rows in file order. A file that stops being readable text part-way raises ``InputError``."""
        try:
            yield from self._csv_rows() if self.kind == "csv" else self._jsonl_rows()
        except (UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"not a readable {self.kind.upper()} text file: {error}") from None

    def count(self, *, after: int = 0) -> int:
        """How many rows (devices, well-formed or not) the file holds after row ``after``."""
        try:
            return sum(1 for row, _ in self._records() if row > after)
        except (UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"not a readable {self.kind.upper()} text file: {error}") from None

    def sha256(self) -> str:
        hasher = hashlib.sha256()
        with self.path.open("rb") as file:
            while block := file.read(1 << 20):
                hasher.update(block)
        return hasher.hexdigest()

    def _records(self) -> Iterator[tuple[int, Any]]:
        """(row number, CSV record or JSONL line) for every non-blank row."""
        with self.path.open(encoding="utf-8-sig", newline="" if self.kind == "csv" else None) as file:
            if self.kind == "csv":
                reader = csv.reader(file)
                next(reader, None)
                start = reader.line_num + 1
                for record in reader:
                    row, start = start, reader.line_num + 1  # a quoted field may span lines
                    if any(cell.strip() for cell in record):
                        yield row, record
            else:
                for number, line in enumerate(file, start=1):
                    if line.strip():
                        yield number, line

    def _csv_rows(self) -> Iterator[InputRow]:
        id_column = self._columns.index("device_id")
        for row, record in self._records():
            if len(record) != len(self._columns):
                device_id = record[id_column].strip() if id_column < len(record) else ""
                yield InputRow(
                    row, device_id, error=f"{len(record)} fields, the header has {len(self._columns)}"
                )
                continue
            yield self._parse(row, dict(zip(self._columns, record, strict=True)))

    def _jsonl_rows(self) -> Iterator[InputRow]:
        for number, line in self._records():
            try:
                value = json.loads(line)
            except ValueError as error:
                yield InputRow(number, "", error=f"not JSON: {error}")
                continue
            if not isinstance(value, dict):
                yield InputRow(number, "", error="not a JSON object")
                continue
            device_id = value.get("device_id")
            shown = device_id if isinstance(device_id, str) else ""
            unknown = sorted(set(value) - set(FIELDS))
            if unknown:
                yield InputRow(
                    number, shown, error=f"unknown field {unknown[0]!r}; expected {', '.join(FIELDS)}"
                )
                continue
            not_text = [key for key, item in value.items() if item is not None and not isinstance(item, str)]
            if not_text:
                yield InputRow(number, shown, error=f"{not_text[0]} must be a string")
                continue
            yield self._parse(number, {key: item or "" for key, item in value.items()})

    def _parse(self, row: int, values: dict[str, str]) -> InputRow:
        fields = {key: value.strip() for key, value in values.items()}
        device_id = fields.get("device_id", "")
        try:
            for name in _REQUIRED:
                if not fields.get(name):
                    raise ValueError(f"{name} is missing")
            secret = self._secret(fields.get("secret", ""), fields.get("secret_file", ""))
            ecies = fields.get("ecies_public_key", "")
            registration = DeviceRegistration(
                device_id=device_id,
                chip=fields["chip"].lower().replace("-", ""),
                secret=secret,
                ecies_public_key=_hex(ecies, "ecies_public_key") if ecies else None,
                row=row,
            )
        except ValueError as error:
            return InputRow(row, device_id, error=str(error))
        return InputRow(row, device_id, registration=registration)

    def _secret(self, text: str, file_name: str) -> bytes:
        if text and file_name:
            raise ValueError("give secret or secret_file, not both")
        if text:
            if len(text) != 2 * SECRET_SIZE:
                raise ValueError(
                    f"secret must be {2 * SECRET_SIZE} hexadecimal characters ({SECRET_SIZE} bytes), "
                    f"not {len(text)}"
                )
            return _hex(text, "secret")
        if not file_name:
            raise ValueError("secret (hex) or secret_file is missing")
        path = self.path.parent / file_name
        try:
            secret = path.read_bytes()
        except OSError as error:
            raise ValueError(f"secret_file {file_name}: {error.strerror or error}") from None
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"secret_file {file_name} holds {len(secret)} bytes, not {SECRET_SIZE}")
        return secret


def _csv_columns(file: io.TextIOBase) -> tuple[str, ...]:
    header = next(csv.reader(file), None)
    if header is None:
        raise InputError("the CSV file is empty; its first line must name the columns")
    columns = tuple(column.strip().lower() for column in header)
    unknown = [column for column in columns if column not in FIELDS]
    if unknown:
        raise InputError(f"unknown CSV column {unknown[0]!r}; the columns are {', '.join(FIELDS)}")
    missing = [column for column in _REQUIRED if column not in columns]
    if missing:
        raise InputError(f"the CSV header has no {missing[0]} column")
    if "secret" not in columns and "secret_file" not in columns:
        raise InputError("the CSV header has neither a secret nor a secret_file column")
    if len(set(columns)) != len(columns):
        raise InputError("the CSV header names a column twice")
    return columns


def _hex(text: str, name: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{name} is not hexadecimal") from None


@dataclass
class RegisterState:
    """Progress of ``devices register`` over one input file, as the state file records it."""

    product: str
    input: str
    input_sha256: str
    last_row: int = 0
    created: int = 0
    unchanged: int = 0
    reprovisioned: int = 0  # registered before; a different secret replaced it (officers allowed it)
    invalid: int = 0  # rejected rows other than conflicts, including malformed input rows
    conflicts: int = 0  # ALREADY_EXISTS: registered before with another secret
    rejected: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION

    @classmethod
    def load(cls, path: Path) -> RegisterState | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            if data.get("version") != STATE_VERSION:
                raise InputError(f"{path} was written by another version of kmsctl; delete it to start over")
            return cls(**data)
        except (ValueError, TypeError, AttributeError) as error:
            raise InputError(
                f"{path} is not a kmsctl progress file ({error}); delete it to start over"
            ) from None

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=1).encode("utf-8"))

    def record(self, row: int, device_id: str, code: str, message: str) -> dict[str, Any]:
        """Count a rejected row; keep its details while the list is short. Returns them."""
        entry = {"row": row, "device_id": device_id, "code": code, "message": message}
        if code == "ALREADY_EXISTS":
            self.conflicts += 1
        else:
            self.invalid += 1
        if len(self.rejected) < STATE_REJECTED_LIMIT:
            self.rejected.append(entry)
        return entry
