"""``kms``: the server's command line (operators on the server host).

    kms init  [--state-dir DIR] [--demo]        development setup: PKI, SoftHSM2 token, config, database
    kms serve --config FILE [--ready-file F]     run the gRPC service until SIGTERM/SIGINT
    kms keys create --config FILE ...            generate a key inside the HSM and record it
    kms keys list   --config FILE [--json]
    kms policy reset --config FILE --reason TEXT [--json]
                                                 break glass: install the [policy] file (or no policy) as
                                                 the authorization policy, without dual control

Exit codes: 0 success, 1 unexpected error, 2 usage error, 3 invalid input or configuration, 4 not found,
5 refused by a rule (already exists, failed precondition), 7 HSM unavailable, 9 (policy reset) the policy
was installed but its audit record could not be written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from kms.domain import errors, sbv2
from kms.domain.keys import Algorithm, Key, KeyPurpose
from kms.server.config import Config, load_config
from kms.server.pki import create_dev_pki
from kms.service.keys import KeyAdministration

DEFAULT_STATE_DIR = Path(".kms")
EXIT_INSTALLED_UNAUDITED = 9
"""``kms policy reset``: the policy was installed, but its audit record failed (do not run it again)."""
SETUP_SOFTHSM = Path(__file__).resolve().parent.parent / "hsm" / "setup-softhsm.sh"

EXIT_CODES: list[tuple[type[errors.KmsError], int]] = [
    (errors.InvalidArgument, 3),
    (errors.NotFound, 4),
    (errors.AlreadyExists, 5),
    (errors.FailedPrecondition, 5),
    (errors.HsmUnavailable, 7),
]

CONFIG_TEMPLATE = """\
# Firmware KMS configuration (development defaults written by `kms init`).
# Relative paths are resolved against this file's directory. Reference: README.md, "Configuration".

[server]
listen = "{listen}"
workers = 16
max_concurrent_rpcs = 64
max_message_bytes = 1048576
max_image_bytes = 16777216
shutdown_grace_seconds = 30
health_probe_seconds = 5

[tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"

[hsm]
uri = "{hsm_uri}"
softhsm2_conf = "{softhsm2_conf}"

[store]
database = "kms.db"
releases = "releases"
"""

DEMO_KEYS = (
    # key id, product, algorithm, SBv2 slot: an RSA product for ESP32-S3/C3 and an ECDSA one for C6/H2/C5.
    ("thermostat-sbv2-0", "thermostat", Algorithm.RSA_3072_PSS_SHA256, 0),
    ("sensor-sbv2-0", "sensor", Algorithm.ECDSA_P256_SHA256, 0),
)


def _setup_softhsm(state_dir: Path) -> dict[str, str]:
    if not SETUP_SOFTHSM.exists():
        raise errors.FailedPrecondition(
            f"{SETUP_SOFTHSM} not found: run `kms init` from a source checkout, or pass --hsm-uri"
        )
    result = subprocess.run(
        ["bash", str(SETUP_SOFTHSM), str(state_dir)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise errors.FailedPrecondition(f"SoftHSM2 setup failed: {result.stderr.strip()}")
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return values


def cmd_init(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    create_dev_pki(state_dir / "pki")
    config_path = state_dir / "kms.toml"
    if not config_path.exists():
        if args.hsm_uri:
            hsm_uri, softhsm2_conf = args.hsm_uri, ""
        else:
            values = _setup_softhsm(state_dir)
            hsm_uri, softhsm2_conf = values["PKCS11_URI"], values["SOFTHSM2_CONF"]
        text = CONFIG_TEMPLATE.format(listen=args.listen, hsm_uri=hsm_uri, softhsm2_conf=softhsm2_conf)
        if not softhsm2_conf:
            text = text.replace('softhsm2_conf = ""\n', "")
        config_path.write_text(text, encoding="utf-8")
    config = load_config(config_path)
    if args.demo:
        _create_demo_keys(config)
    print(f"state directory: {state_dir}")
    print(f"configuration:   {config_path}")
    print(f"client certificates: {state_dir / 'pki' / 'clients'}")
    return 0


def _create_demo_keys(config: Config) -> None:
    from kms.server.app import open_components
    from kms.service.keys import KeyAdministration

    components = open_components(config)
    try:
        admin = KeyAdministration(components.hsm, components.keys)
        for key_id, product, algorithm, slot in DEMO_KEYS:
            try:
                components.keys.get_key(key_id)
            except errors.NotFound:
                admin.create_key(key_id, product, KeyPurpose.SECURE_BOOT_V2, algorithm, slot)
                print(f"created keys/{key_id} ({algorithm.value}, product {product}, SBv2 slot {slot})")
            for key in admin.create_product_set(product)[0]:
                print(f"created {key.name} ({key.purpose.value}, {key.algorithm.value})")
    finally:
        components.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from kms.server.app import serve

    serve(load_config(args.config), args.ready_file)
    return 0


def _key_json(key: Key) -> dict[str, object]:
    return {
        "name": key.name,
        "product": key.product,
        "purpose": key.purpose.value,
        "algorithm": key.algorithm.value,
        "sbv2_slot": key.sbv2_slot,
        "primary_version": key.version().name,
        "versions": [
            {
                "name": v.name,
                "state": v.state.value,
                "sbv2_key_digest": (
                    sbv2.key_digest(v.algorithm, v.public_key_der).hex() if v.algorithm.is_signing else None
                ),
            }
            for v in key.versions
        ],
    }


def cmd_keys_create(args: argparse.Namespace) -> int:
    from kms.server.app import open_components
    from kms.service.keys import KeyAdministration

    purpose = KeyPurpose(args.purpose)
    components = open_components(load_config(args.config))
    try:
        key = KeyAdministration(components.hsm, components.keys).create_key(
            args.key_id, args.product, purpose, Algorithm.parse(args.algorithm), args.slot
        )
    finally:
        components.close()
    if args.json:
        print(json.dumps(_key_json(key)))
    else:
        print(f"created {key.name} ({key.algorithm.value}) for product {key.product}")
    return 0


def cmd_keys_create_product_set(args: argparse.Namespace) -> int:
    from kms.server.app import open_components

    components = open_components(load_config(args.config))
    try:
        admin = KeyAdministration(components.hsm, components.keys)
        created = admin.create_product_set(args.product)[0]
    finally:
        components.close()
    if args.json:
        print(json.dumps([_key_json(k) for k in created]))
    else:
        for key in created:
            print(f"created {key.name} ({key.purpose.value}, {key.algorithm.value})")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from kms.server.app import open_components

    components = open_components(load_config(args.config))
    try:
        keys = components.keys.list_keys(args.product)
    finally:
        components.close()
    if args.json:
        print(json.dumps([_key_json(k) for k in keys]))
    else:
        for key in keys:
            slot = "-" if key.sbv2_slot is None else str(key.sbv2_slot)
            print(
                f"{key.name:40} {key.product:16} {key.purpose.value:15} {key.algorithm.value:12} slot {slot}"
            )
    return 0


def _local_operator() -> str:
    """``local:`` and the OS user running this command, by user id (not from the environment)."""
    uid = os.getuid()
    try:
        return f"local:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"local:uid-{uid}"


def cmd_policy_reset(args: argparse.Namespace) -> int:
    """Break glass (docs/authorization.md): the ``[policy]`` file's text, or no policy, becomes the next
    version of the authorization policy without dual control. It takes what ``kms serve`` takes (the
    configuration, the database, the HSM for the audit log), so only someone with the server host's access
    can run it; it is recorded in the version itself, the service log and the audit log."""
    from kms.domain.audit import AuditEvent
    from kms.domain.keys import SYSTEM_PRODUCT
    from kms.server.app import open_components
    from kms.server.policy_file import read_policy_file
    from kms.server.policy_servicers import POLICY_TARGET
    from kms.service.policy import BREAK_GLASS, AuthorizationPolicies
    from kms.store.policy import SqlitePolicyRepository

    config = load_config(args.config)
    file_text = read_policy_file(config.policy_file)  # a malformed file stops here, before any write
    operator = _local_operator()
    components = open_components(config)
    try:
        policies = AuthorizationPolicies(
            SqlitePolicyRepository(components.database),
            file_text,
            officers_needed=config.dual_control.required_approvals + 1,
        )
        reset = policies.reset(operator, args.reason)
        installed = reset.installed
        assert installed.created_at is not None
        audit_error: Exception | None = None
        try:
            components.audit_log.append(
                AuditEvent(
                    time=installed.created_at,
                    caller=installed.created_by,
                    role="local",
                    operation="kms policy reset",
                    outcome="OK",
                    request_id=f"{BREAK_GLASS}-{uuid.uuid4().hex}",
                    product=SYSTEM_PRODUCT,
                    resource=POLICY_TARGET,
                )
            )
        except Exception as error:  # noqa: BLE001 - the version is in force: say so rather than fail blind
            audit_error = error
    finally:
        components.close()
    source = (
        f"the [policy] file {config.policy_file}"
        if file_text
        else "no policy (no [policy] file): every identity acts for every product"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "version": installed.version,
                    "sha256": installed.sha256.hex(),
                    "created_by": installed.created_by,
                    "approval_id": installed.approval_id,
                    "policy_file": str(config.policy_file) if file_text else None,
                    "lockout": reset.lockout,
                }
            )
        )
    else:
        print(f"installed authorization policy version {installed.version}: {source}")
        print(f"sha256 {installed.sha256.hex()}")
        print(
            f"recorded as installed by {installed.created_by} ({BREAK_GLASS}) in the policy versions, the "
            "service log and the audit log; running servers apply it within about a second"
        )
    if reset.lockout is not None:
        print(f"kms: warning: installed anyway, but {reset.lockout}", file=sys.stderr)
    if audit_error is not None:
        print(
            f"kms: error: version {installed.version} IS installed and in force, but its audit record could "
            f"not be written ({audit_error}); do not run the reset again: record it by hand (it is in the "
            "policy versions and the service log)",
            file=sys.stderr,
        )
        return EXIT_INSTALLED_UNAUDITED
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kms", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default=os.environ.get("KMS_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser(
        "init", help="create a development setup (PKI, SoftHSM2 token, config, database)"
    )
    init.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("KMS_STATE_DIR", DEFAULT_STATE_DIR))
    )
    init.add_argument("--listen", default="127.0.0.1:50051")
    init.add_argument("--hsm-uri", help="use this PKCS#11 token instead of creating a SoftHSM2 one")
    init.add_argument("--demo", action="store_true", help="also create demo Secure Boot V2 keys")
    init.set_defaults(func=cmd_init)

    serve = commands.add_parser("serve", help="run the gRPC service")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--ready-file", type=Path, help="write the bound port here once serving")
    serve.set_defaults(func=cmd_serve)

    keys = commands.add_parser("keys", help="manage keys on this host").add_subparsers(
        dest="keys", required=True
    )
    create = keys.add_parser("create", help="generate a key inside the HSM")
    create.add_argument("--config", type=Path, required=True)
    create.add_argument("--key-id", required=True)
    create.add_argument("--product", required=True)
    create.add_argument(
        "--purpose", choices=[p.value for p in KeyPurpose], default=KeyPurpose.SECURE_BOOT_V2.value
    )
    create.add_argument("--algorithm", choices=[a.value for a in Algorithm], required=True)
    create.add_argument("--slot", type=int, help="Secure Boot V2 signature-block slot: 0, 1 or 2")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_keys_create)
    product_set = keys.add_parser(
        "create-product-set", help="create a product's manifest, KEK, registration and payload-seed keys"
    )
    product_set.add_argument("--config", type=Path, required=True)
    product_set.add_argument("--product", required=True)
    product_set.add_argument("--json", action="store_true")
    product_set.set_defaults(func=cmd_keys_create_product_set)
    listing = keys.add_parser("list", help="list keys")
    listing.add_argument("--config", type=Path, required=True)
    listing.add_argument("--product")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_keys_list)

    policy = commands.add_parser("policy", help="the authorization policy, on this host").add_subparsers(
        dest="policy", required=True
    )
    reset = policy.add_parser(
        "reset",
        help="break glass: install the [policy] file (or no policy) as the next version, without dual "
        "control (docs/authorization.md)",
    )
    reset.add_argument("--config", type=Path, required=True)
    reset.add_argument("--reason", required=True, help="why: recorded in the installed version's text")
    reset.add_argument("--json", action="store_true")
    reset.set_defaults(func=cmd_policy_reset)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args)
    except errors.KmsError as e:
        print(f"kms: error: {e}", file=sys.stderr)
        return next((code for cls, code in EXIT_CODES if isinstance(e, cls)), 1)
    except OSError as e:  # e.g. the listen address is taken (kms.server.app.KmsServer)
        print(f"kms: error: {e}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
