"""The security officer's ``kmsctl keys`` commands: create keys, rotate, enable and disable versions, set the
primary, schedule and cancel destruction, set rotation schedules, show a key's history.

Synopsis::

    kmsctl keys create --key-id ID --product PRODUCT --algorithm ALG [--purpose PURPOSE] [--slot N]
    kmsctl keys create-product-set --product PRODUCT
    kmsctl keys rotate KEY
    kmsctl keys disable VERSION [--new-primary N]
    kmsctl keys enable VERSION [--new-primary N]
    kmsctl keys set-primary VERSION
    kmsctl keys schedule-destroy VERSION [--delay DURATION] [--new-primary N]
    kmsctl keys cancel-destroy VERSION
    kmsctl keys set-rotation KEY (--period DURATION [--first-rotation TIME] | --clear)
    kmsctl keys history NAME

KEY is ``keys/ID`` or ``ID``; VERSION is ``keys/ID/versions/N`` or ``ID/versions/N``; NAME either.
``--new-primary`` takes a version number of the same key, or a version name. A DURATION is a number with
an optional unit: ``s`` (the default), ``m``, ``h`` or ``d`` (``90d``, ``24h``). TIME is ISO 8601 with a
time zone (``2026-01-01T00:00:00Z``). Every command's default ``--identity`` is ``security-officer``; the
connection options, ``--json`` and the exit codes are those of every kmsctl command (``kmsctl.cli``).

``cli.build_parser`` registers these with ``add_key_admin_commands(key_commands, [connection, output])``.
This module imports ``kmsctl.cli`` at its top, so ``cli`` imports it inside ``build_parser``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from kmsctl.cli import (
    _EXIT_CODES_HELP,
    SECURITY_OFFICER,
    BadInputError,
    Command,
    Outcome,
    _json_value,
    _key_name,
    _non_negative_int,
    _rows,
)

if TYPE_CHECKING:
    from kmsctl._admin import KeyAdminClient, ManagedKey
    from kmsctl._client import KmsClient

_PURPOSES = (
    "secure-boot-v2",
    "digest-signing",
    "ota-manifest",
    "key-encryption",
    "registration-transport",
    "payload-seed",
    "audit-checkpoint",
)
_ALGORITHMS = ("ecdsa-p256", "ecdsa-p384", "rsa3072-pss", "aes256", "rsa3072-oaep", "hmac-sha256")
_DURATION = re.compile(r"([0-9]+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# -- commands ----------------------------------------------------------------------------------------


def _admin(client: KmsClient) -> KeyAdminClient:
    from kmsctl._admin import KeyAdminClient  # loads gRPC: see cli.main()

    return KeyAdminClient(client)


def _create(args: argparse.Namespace, client: KmsClient) -> Outcome:
    key = _admin(client).create_key(
        args.product, args.key_id, args.purpose, args.algorithm, sbv2_slot=args.slot
    )
    return Outcome(_key_json(key), _key_summary(f"created {key.name}", key))


def _create_product_set(args: argparse.Namespace, client: KmsClient) -> Outcome:
    result = _admin(client).create_product_key_set(args.product)
    data = {"created": [_key_json(key) for key in result.created], "existing": list(result.existing)}
    lines = [f"created {key.name} ({key.purpose}, {key.algorithm})" for key in result.created]
    lines += [f"kept {name} (exists already)" for name in result.existing]
    if not result.created:
        lines.insert(0, f"product {args.product} has every key of the set already; nothing created")
    return Outcome(data, "\n".join(lines))


def _rotate(args: argparse.Namespace, client: KmsClient) -> Outcome:
    rotated = _admin(client).rotate_key(_key_name(args.name))
    data = {"key_version": rotated.key_version, "key": _key_json(rotated.key)}
    title = f"rotated {rotated.key.name}: {rotated.key_version} is new and signs new work"
    return Outcome(data, _key_summary(title, rotated.key))


def _disable(args: argparse.Namespace, client: KmsClient) -> Outcome:
    name = _key_name(args.name)
    key = _admin(client).disable_key_version(name, new_primary=_new_primary(name, args.new_primary))
    return Outcome(
        _key_json(key), _key_summary(f"disabled {name}: it no longer signs, wraps or unwraps", key)
    )


def _enable(args: argparse.Namespace, client: KmsClient) -> Outcome:
    name = _key_name(args.name)
    key = _admin(client).enable_key_version(name, new_primary=_new_primary(name, args.new_primary))
    return Outcome(_key_json(key), _key_summary(f"enabled {name}", key))


def _set_primary(args: argparse.Namespace, client: KmsClient) -> Outcome:
    name = _key_name(args.name)
    key = _admin(client).set_primary_version(name)
    return Outcome(_key_json(key), _key_summary(f"{name} is the primary version of {key.name}", key))


def _schedule_destroy(args: argparse.Namespace, client: KmsClient) -> Outcome:
    name = _key_name(args.name)
    key = _admin(client).schedule_destruction(
        name, delay=args.delay, new_primary=_new_primary(name, args.new_primary)
    )
    version = key.version(name)
    title = (
        f"scheduled the destruction of {name} at {_when(version.destroy_time)}; until then "
        f"`kmsctl keys cancel-destroy {name}` cancels it"
        if version.destroy_time is not None
        else f"{name} is {version.state.value}"
    )
    return Outcome(_key_json(key), _key_summary(title, key))


def _cancel_destroy(args: argparse.Namespace, client: KmsClient) -> Outcome:
    name = _key_name(args.name)
    key = _admin(client).cancel_destruction(name)
    title = f"cancelled the destruction of {name}; it is disabled (`kmsctl keys enable {name}` enables it)"
    return Outcome(_key_json(key), _key_summary(title, key))


def _set_rotation(args: argparse.Namespace, client: KmsClient) -> Outcome:
    name = _key_name(args.name)
    if args.clear and args.first_rotation is not None:
        raise BadInputError("--first-rotation goes with --period, not with --clear")
    period = None if args.clear else args.period
    key = _admin(client).set_rotation_schedule(name, period, first_rotation=args.first_rotation)
    title = (
        f"{key.name} is rotated on demand only"
        if key.rotation_period is None
        else f"{key.name} is rotated every {_duration_text(key.rotation_period)}"
    )
    return Outcome(_key_json(key), _key_summary(title, key))


def _history(args: argparse.Namespace, client: KmsClient) -> Outcome:
    transitions = _admin(client).list_transitions(_key_name(args.name))
    header = ("TIME", "VERSION", "EVENT", "FROM", "TO", "ACTOR")
    rows = [
        (
            _when(t.time),
            t.key_version.rpartition("/")[2],
            t.event.value + (f" (due {_when(t.destroy_time)})" if t.destroy_time else ""),
            t.from_state.value if t.from_state is not None else "-",
            t.to_state.value,
            t.actor,
        )
        for t in transitions
    ]
    return Outcome({"transitions": [_json_value(t) for t in transitions]}, payload=_table(header, rows))


# -- output --------------------------------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else "-"


def _duration_text(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _key_json(key: ManagedKey) -> dict[str, Any]:
    data: dict[str, Any] = _json_value(key)
    period = data.pop("rotation_period")
    data["rotation_period_seconds"] = int(period.total_seconds()) if period is not None else None
    return data


def _key_summary(title: str, key: ManagedKey) -> str:
    versions = []
    for version in key.versions:
        number = version.name.rpartition("/")[2]
        notes = [version.state.value]
        if version.name == key.primary_version:
            notes.append("primary")
        if version.destroy_time is not None:
            notes.append(f"destroyed at {_when(version.destroy_time)}")
        versions.append((f"version {number}", ", ".join(notes)))
    rotation = (
        f"every {_duration_text(key.rotation_period)}, next at {_when(key.next_rotation_time)}"
        if key.rotation_period is not None
        else "on demand"
    )
    return "\n".join(
        [
            title,
            *_rows(
                ("key", key.name),
                ("product", key.product),
                ("purpose", key.purpose),
                ("algorithm", key.algorithm),
                ("sbv2 slot", "" if key.sbv2_slot is None else str(key.sbv2_slot)),
                ("rotation", rotation),
                *versions,
            ),
        ]
    )


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


# -- argument parsing --------------------------------------------------------------------------------


def _new_primary(name: str, text: str | None) -> str | None:
    """A version name from ``--new-primary``: a number (of ``name``'s key) or a version name."""
    if text is None:
        return None
    if text.isdigit():
        return f"{name.partition('/versions/')[0]}/versions/{int(text)}"
    return _key_name(text)


def _duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 3600, 90m, 24h, 30d)")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def _aware_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone, e.g. {text}Z or {text}+02:00")
    return moment


def _slot(text: str) -> int:
    value = _non_negative_int(text)
    if value > 2:
        raise argparse.ArgumentTypeError("a Secure Boot V2 slot is 0, 1 or 2")
    return value


def add_key_admin_commands(subparsers: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add the officer's commands to ``subparsers`` (those of ``kmsctl keys``); ``common_parents`` are the
    connection and output option parsers every command shares."""

    def add(name: str, summary: str, command: Command, epilog: str = "") -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = subparsers.add_parser(
            name,
            help=summary,
            description=summary,
            parents=common_parents,
            epilog=f"{epilog}default --identity: {SECURITY_OFFICER}\n\n{_EXIT_CODES_HELP}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        sub.set_defaults(command=command, local_command=None, default_identity=SECURITY_OFFICER)
        return sub

    def version_argument(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("name", metavar="VERSION", help="keys/ID/versions/N or ID/versions/N")

    def new_primary_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--new-primary",
            metavar="N",
            help="make this enabled version of the same key primary in the same request (a number or "
            "a version name); needed when VERSION is the primary and other versions are enabled",
        )

    create = add(
        "create",
        "Generate a new key inside the HSM (version 1, enabled and primary).",
        _create,
        epilog="algorithms by purpose: secure-boot-v2 and digest-signing: ecdsa-p256, ecdsa-p384, "
        "rsa3072-pss;\nota-manifest and audit-checkpoint: ecdsa-p256; key-encryption: aes256;\n"
        "registration-transport: rsa3072-oaep; payload-seed: hmac-sha256\n\n",
    )
    create.add_argument("--key-id", required=True, metavar="ID", help="the new key's id (keys/ID)")
    create.add_argument("--product", required=True, help="the product the key belongs to")
    create.add_argument(
        "--purpose",
        choices=_PURPOSES,
        default="secure-boot-v2",
        help="what the key is for (default: %(default)s)",
    )
    create.add_argument("--algorithm", choices=_ALGORITHMS, required=True, help="the key's algorithm")
    create.add_argument(
        "--slot",
        type=_slot,
        metavar="N",
        help="Secure Boot V2 signature-block slot, 0-2 (secure-boot-v2 only)",
    )

    product_set = add(
        "create-product-set",
        "Create the manifest, KEK, registration and payload-seed keys a product lacks.",
        _create_product_set,
    )
    product_set.add_argument("--product", required=True, help="the product")

    rotate = add(
        "rotate",
        "Generate a key's next version and make it the primary (earlier versions keep their states).",
        _rotate,
    )
    rotate.add_argument("name", metavar="KEY", help="keys/ID or ID")

    disable = add(
        "disable", "Disable a key version: it stops signing, wrapping and unwrapping at once.", _disable
    )
    version_argument(disable)
    new_primary_option(disable)

    enable = add("enable", "Enable a disabled key version.", _enable)
    version_argument(enable)
    new_primary_option(enable)

    primary = add("set-primary", "Make an enabled key version its key's primary.", _set_primary)
    version_argument(primary)

    schedule = add(
        "schedule-destroy",
        "Schedule a key version's destruction directly: only on a server without dual control (the default "
        "server refuses it; use 'kmsctl approvals request-destroy').",
        _schedule_destroy,
    )
    version_argument(schedule)
    schedule.add_argument(
        "--delay",
        type=_duration,
        metavar="DURATION",
        help="time until the destruction, 1h to 120d (default: the server's, 24h)",
    )
    new_primary_option(schedule)

    cancel = add(
        "cancel-destroy", "Cancel a scheduled destruction; the version becomes disabled.", _cancel_destroy
    )
    version_argument(cancel)

    rotation = add(
        "set-rotation",
        "Set or clear a key's automatic rotation schedule (not for Secure Boot V2 keys).",
        _set_rotation,
    )
    rotation.add_argument("name", metavar="KEY", help="keys/ID or ID")
    how = rotation.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--period", type=_duration, metavar="DURATION", help="rotate every DURATION, 1d to 36500d"
    )
    how.add_argument("--clear", action="store_true", help="rotate on demand only")
    rotation.add_argument(
        "--first-rotation",
        type=_aware_time,
        metavar="TIME",
        help="when the first scheduled rotation is due (default: now + the period)",
    )

    history = add("history", "Show the lifecycle events of a key or key version: who, what, when.", _history)
    history.add_argument("name", metavar="NAME", help="keys/ID, keys/ID/versions/N, or either without keys/")
