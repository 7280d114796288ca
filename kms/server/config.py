"""Server configuration, read from one TOML file.

Relative paths are resolved against the directory of the configuration file. Every limit has a default
documented here and in the README's configuration reference::

    [server]
    listen = "127.0.0.1:50051"     # host:port; port 0 picks a free port (printed at start)
    workers = 16                   # threads serving RPCs
    max_concurrent_rpcs = 64       # more concurrent calls are refused with RESOURCE_EXHAUSTED
    max_message_bytes = 1048576    # largest single gRPC message accepted (chunks are at most 256 KiB)
    max_image_bytes = 16777216     # largest app image accepted for signing (16 MiB)
    shutdown_grace_seconds = 30    # on SIGTERM, in-flight calls get this long to finish
    health_probe_seconds = 5       # how often the HSM is probed for the health service
    cpu_slots = 2                  # unary signing calls running at once (about the number of cores)

    [tls]                          # mutual TLS is mandatory
    cert = "pki/server.pem"
    key = "pki/server.key"
    client_ca = "pki/ca.pem"       # only clients with a certificate from this CA connect

    [hsm]
    uri = "pkcs11:token=kms-dev?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:hsm-pin"
    softhsm2_conf = "softhsm/softhsm2.conf"   # optional: sets SOFTHSM2_CONF for SoftHSM2

    [store]
    database = "kms.db"
    releases = "releases"

    [policy]                       # optional: without it every identity acts for every product
    file = "policy.toml"           # product scope of each identity (kms.server.policy_file)

    [dual_control]                 # optional: acts that destroy or weaken (kms.domain.approvals)
    required_approvals = 2         # M: distinct officers other than the requester who must approve
    ttl_seconds = 86400            # a request not executed within this time expires
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms.domain.errors import InvalidArgument


@dataclass(frozen=True)
class ServerLimits:
    workers: int = 16
    max_concurrent_rpcs: int = 64
    max_message_bytes: int = 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    shutdown_grace_seconds: float = 30.0
    health_probe_seconds: float = 5.0
    cpu_slots: int = 2


@dataclass(frozen=True)
class DualControlConfig:
    required_approvals: int = 2
    ttl_seconds: int = 24 * 3600


@dataclass(frozen=True)
class Config:
    listen: str
    limits: ServerLimits
    tls_cert: Path
    tls_key: Path
    tls_client_ca: Path
    hsm_uri: str
    softhsm2_conf: Path | None
    database: Path
    releases: Path
    base_dir: Path
    policy_file: Path | None = None
    dual_control: DualControlConfig = DualControlConfig()


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise InvalidArgument(f"configuration: [{name}] must be a table")
    return value


def _get(table: dict[str, Any], section: str, key: str, kind: type, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is None:
        raise InvalidArgument(f"configuration: [{section}] {key} is required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidArgument(f"configuration: [{section}] {key} must be a {kind.__name__}, got {value!r}")
    return value


def load_config(path: Path) -> Config:
    """Read and validate a configuration file; ``InvalidArgument`` names the bad key."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidArgument(f"cannot read configuration {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"configuration {path} is not valid TOML: {e}") from e
    base = path.resolve().parent
    sections = ("server", "tls", "hsm", "store", "policy", "dual_control")
    server, tls, hsm, store, policy, dual = (_table(doc, n) for n in sections)
    unknown = set(doc) - set(sections)
    if unknown:
        raise InvalidArgument(f"configuration: unknown section(s) {sorted(unknown)}")

    defaults = ServerLimits()
    limits = ServerLimits(
        **{
            field: _get(server, "server", field, type(getattr(defaults, field)), getattr(defaults, field))
            for field in ServerLimits.__dataclass_fields__
        }
    )
    for field in ("workers", "max_concurrent_rpcs", "max_message_bytes", "max_image_bytes", "cpu_slots"):
        if getattr(limits, field) < 1:
            raise InvalidArgument(f"configuration: [server] {field} must be positive")

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    dual_defaults = DualControlConfig()
    dual_control = DualControlConfig(
        required_approvals=_get(
            dual, "dual_control", "required_approvals", int, dual_defaults.required_approvals
        ),
        ttl_seconds=_get(dual, "dual_control", "ttl_seconds", int, dual_defaults.ttl_seconds),
    )
    for field in ("required_approvals", "ttl_seconds"):
        if getattr(dual_control, field) < 1:
            raise InvalidArgument(f"configuration: [dual_control] {field} must be positive")
    unknown_dual = set(dual) - {"required_approvals", "ttl_seconds"}
    if unknown_dual:
        raise InvalidArgument(f"configuration: [dual_control] unknown key(s) {sorted(unknown_dual)}")

    conf = hsm.get("softhsm2_conf")
    policy_file = policy.get("file")
    if policy_file is not None and not isinstance(policy_file, str):
        raise InvalidArgument(f"configuration: [policy] file must be a str, got {policy_file!r}")
    return Config(
        listen=_get(server, "server", "listen", str, "127.0.0.1:50051"),
        limits=limits,
        tls_cert=resolve(_get(tls, "tls", "cert", str)),
        tls_key=resolve(_get(tls, "tls", "key", str)),
        tls_client_ca=resolve(_get(tls, "tls", "client_ca", str)),
        hsm_uri=_get(hsm, "hsm", "uri", str),
        softhsm2_conf=resolve(conf) if isinstance(conf, str) else None,
        database=resolve(_get(store, "store", "database", str, "kms.db")),
        releases=resolve(_get(store, "store", "releases", str, "releases")),
        base_dir=base,
        policy_file=resolve(policy_file) if policy_file is not None else None,
        dual_control=dual_control,
    )
