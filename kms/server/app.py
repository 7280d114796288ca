"""The composition root: the one place where adapters, use cases and servicers are wired together.

``open_components`` opens the HSM and the database; ``KmsServer`` builds the gRPC server with mutual TLS,
limits, the authorization interceptor, health and reflection; ``serve`` runs it until SIGTERM or SIGINT and
shuts down gracefully (health goes NOT_SERVING, new calls are refused, in-flight calls get the grace period).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kms.domain.approvals import Action, DualControlPolicy
from kms.hsm.config import HsmConfig
from kms.hsm.pkcs11_hsm import Pkcs11Hsm
from kms.server.admin_servicers import add_key_admin
from kms.server.approval_servicers import DestroyKeyVersion, GatedAct, add_approvals
from kms.server.audit_interceptor import AuditInterceptor
from kms.server.audit_servicers import add_audit
from kms.server.audit_setup import open_audit_log
from kms.server.auth import AuthorizationInterceptor, use_policy_source
from kms.server.config import Config
from kms.server.devices_servicers import DeviceRegistryServicer, DistributionServicer, ReprovisionDevice
from kms.server.health import HsmHealth
from kms.server.kek_rotation_runner import KekRotationRunner
from kms.server.kek_servicers import add_kek_rotation
from kms.server.lifecycle_scheduler import LifecycleScheduler
from kms.server.policy_file import read_policy_file
from kms.server.policy_servicers import ChangePolicy, add_policy
from kms.server.rollback_servicers import LowerFloor, add_rollback_floor
from kms.server.servicers import KeyServicer, SigningServicer
from kms.server.slots_servicers import RevokeSlot, add_secure_boot_slots
from kms.service.approvals import DualControl
from kms.service.distribution import Distribution
from kms.service.kek_rotation import KekRotationService, destroy_guard
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import KeyLifecycle
from kms.service.policy import AuthorizationPolicies
from kms.service.registry import DeviceRegistry
from kms.service.reprovisioning import DeviceReprovisioning
from kms.service.rollback import RollbackFloors
from kms.service.rollover import ManifestKeyRollovers
from kms.service.sbv2_slots import SecureBootSlots
from kms.service.signing import SigningService
from kms.store.approvals import SqliteApprovalRepository
from kms.store.audit import SqliteAuditLog
from kms.store.blobs import BlobStore
from kms.store.database import Database
from kms.store.devices import SqliteDeviceRepository
from kms.store.kek_rotations import SqliteKekRotationRepository
from kms.store.keys import SqliteKeyRepository
from kms.store.policy import SqlitePolicyRepository
from kms.store.releases import SqliteReleaseRepository
from kms.store.rollovers import SqliteRolloverRepository
from kms.store.sbv2_slots import SqliteSlotRevocationRepository
from kms.store.signature_log import SqliteSignatureLog
from kmsapi.v1 import (
    admin_pb2,
    approvals_pb2,
    audit_pb2,
    devices_pb2,
    devices_pb2_grpc,
    kek_pb2,
    keys_pb2,
    keys_pb2_grpc,
    policy_pb2,
    rollback_pb2,
    signing_pb2,
    signing_pb2_grpc,
    slots_pb2,
)

log = logging.getLogger("kms.server")

SERVICE_NAMES = (
    signing_pb2.DESCRIPTOR.services_by_name["SigningService"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
    devices_pb2.DESCRIPTOR.services_by_name["DeviceRegistryService"].full_name,
    devices_pb2.DESCRIPTOR.services_by_name["DistributionService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["KeyAdminService"].full_name,
    approvals_pb2.DESCRIPTOR.services_by_name["ApprovalService"].full_name,
    rollback_pb2.DESCRIPTOR.services_by_name["RollbackFloorService"].full_name,
    slots_pb2.DESCRIPTOR.services_by_name["SecureBootSlotService"].full_name,
    policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    kek_pb2.DESCRIPTOR.services_by_name["KekRotationService"].full_name,
)


@dataclass
class Components:
    hsm: Pkcs11Hsm
    database: Database
    keys: SqliteKeyRepository
    releases: SqliteReleaseRepository
    devices: SqliteDeviceRepository
    signature_log: SqliteSignatureLog
    audit_log: SqliteAuditLog
    kek_rotations: SqliteKekRotationRepository

    def close(self) -> None:
        self.audit_log.close()  # signs a final checkpoint: before the database and the HSM close
        self.signature_log.close()
        self.database.close()
        self.hsm.close()


def open_hsm(config: Config) -> Pkcs11Hsm:
    if config.softhsm2_conf is not None:
        os.environ["SOFTHSM2_CONF"] = str(config.softhsm2_conf)
    hsm = Pkcs11Hsm(HsmConfig.from_uri(config.hsm_uri))
    hsm.open()
    return hsm


def open_components(config: Config) -> Components:
    hsm = open_hsm(config)
    try:
        database = Database.open(config.database)
    except BaseException:
        hsm.close()
        raise
    keys = SqliteKeyRepository(database)
    try:
        audit_log = open_audit_log(hsm, keys, database)
    except BaseException:
        database.close()
        hsm.close()
        raise
    return Components(
        hsm=hsm,
        database=database,
        keys=keys,
        audit_log=audit_log,
        releases=SqliteReleaseRepository(database, BlobStore(config.releases)),
        devices=SqliteDeviceRepository(database),
        signature_log=SqliteSignatureLog(database),
        kek_rotations=SqliteKekRotationRepository(database),
    )


def _server_options(config: Config) -> list[tuple[str, int]]:
    limit = config.limits.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_concurrent_streams", 100),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.server_handshake_timeout_ms", 10_000),
        ("grpc.max_connection_idle_ms", 15 * 60_000),
        ("grpc.max_connection_age_ms", 60 * 60_000),
        ("grpc.max_connection_age_grace_ms", 5 * 60_000),
        # gRPC sets SO_REUSEPORT by default: a second server on a busy port would start "fine" and the kernel
        # would split connections between two servers (perhaps with different CAs). Refuse the bind instead.
        ("grpc.so_reuseport", 0),
    ]


class KmsServer:
    def __init__(self, config: Config, components: Components) -> None:
        self.config = config
        self.components = components
        limits = config.limits
        # The product policy in force: the newest version installed under dual control, else the file.
        self.policies = AuthorizationPolicies(
            SqlitePolicyRepository(components.database),
            read_policy_file(config.policy_file),
            officers_needed=config.dual_control.required_approvals + 1,
            request_ttl=timedelta(seconds=config.dual_control.ttl_seconds),
        )
        use_policy_source(self.policies.current)
        slot_revocations = SqliteSlotRevocationRepository(components.database)
        self.signing = SigningService(
            components.hsm,
            components.keys,
            components.releases,
            components.signature_log,
            max_image_size=limits.max_image_bytes,
            cpu_slots=limits.cpu_slots,
            slot_revocations=slot_revocations,
        )
        self.health = HsmHealth(components.hsm.is_available, SERVICE_NAMES, limits.health_probe_seconds)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="rpc"),
            # Audit first (outermost), so that calls the authorization check refuses are recorded too.
            interceptors=[AuditInterceptor(components.audit_log), AuthorizationInterceptor()],
            options=_server_options(config),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        signing_pb2_grpc.add_SigningServiceServicer_to_server(SigningServicer(self.signing), self.server)
        rollovers = ManifestKeyRollovers(components.keys, SqliteRolloverRepository(components.database))
        keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(self.signing, rollovers), self.server)
        self.registry = DeviceRegistry(
            components.hsm, components.keys, components.devices, components.signature_log
        )
        self.distribution = Distribution(
            components.hsm,
            components.keys,
            components.devices,
            components.releases,
            components.releases,
            components.signature_log,
        )
        devices_pb2_grpc.add_DeviceRegistryServiceServicer_to_server(
            DeviceRegistryServicer(self.registry), self.server
        )
        devices_pb2_grpc.add_DistributionServiceServicer_to_server(
            DistributionServicer(self.distribution), self.server
        )
        self.lifecycle = KeyLifecycle(
            components.hsm,
            components.keys,
            changed=self.signing.key_changed,
            destroy_guard=destroy_guard(components.kek_rotations),
            signature_log=components.signature_log,
        )
        add_key_admin(
            self.server,
            self.lifecycle,
            KeyAdministration(components.hsm, components.keys),
            components.keys,
            require_dual_control=True,
        )
        self.dual_control = DualControl(
            SqliteApprovalRepository(components.database),
            policy=DualControlPolicy(
                required=config.dual_control.required_approvals,
                ttl=timedelta(seconds=config.dual_control.ttl_seconds),
            ),
        )
        acts: dict[Action, GatedAct] = {Action.DESTROY_KEY_VERSION: DestroyKeyVersion(self.lifecycle)}
        self.slots = SecureBootSlots(components.keys, slot_revocations, changed=self.signing.slots_changed)
        add_secure_boot_slots(self.server, self.slots)
        acts[Action.REVOKE_SBV2_SLOT] = RevokeSlot(self.slots)
        self.floors = RollbackFloors(components.releases, keys=components.keys)
        add_rollback_floor(self.server, self.floors)
        acts[Action.LOWER_ROLLBACK_FLOOR] = LowerFloor(self.floors)
        acts[Action.REPROVISION_DEVICE_SECRET] = ReprovisionDevice(DeviceReprovisioning(components.devices))
        acts[Action.CHANGE_AUTHORIZATION_POLICY] = ChangePolicy(self.policies)
        add_policy(self.server, self.policies)
        add_approvals(self.server, self.dual_control, acts)
        self.scheduler = LifecycleScheduler(self.lifecycle)
        self.kek_rotation = KekRotationService(
            components.hsm,
            components.keys,
            components.kek_rotations,
            self.lifecycle,
            components.signature_log,
        )
        self.kek_runner = KekRotationRunner(self.kek_rotation)
        add_kek_rotation(self.server, self.kek_rotation, self.kek_runner.wake)
        add_audit(self.server, components.audit_log, components.database)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
            root_certificates=config.tls_client_ca.read_bytes(),
            require_client_auth=True,
        )
        try:
            self.port = self.server.add_secure_port(config.listen, credentials)
        except RuntimeError as error:  # grpcio raises rather than returning 0 for some bind failures
            self.port = 0
            cause = f" ({error})"
        else:
            cause = ""
        if self.port == 0:
            raise OSError(
                f"cannot listen on {config.listen}{cause}: is another server using the port? "
                "Change [server] listen in kms.toml"
            )

    def start(self) -> None:
        self.health.start()
        self.scheduler.start()
        self.kek_runner.start()
        self.server.start()

    def stop(self) -> None:
        """Graceful: NOT_SERVING first, then refuse new calls and let in-flight ones finish."""
        self.health.shutdown()
        self.server.stop(self.config.limits.shutdown_grace_seconds).wait()
        self.scheduler.stop()
        self.kek_runner.stop()
        self.components.close()


def serve(config: Config, ready_file: Path | None = None) -> None:
    """Run until SIGTERM or SIGINT. Prints the bound port; writes it to ``ready_file`` once serving."""
    server = KmsServer(config, open_components(config))
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down gracefully", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    host = config.listen.rsplit(":", 1)[0]
    log.info("firmware KMS serving on %s:%d (mutual TLS)", host, server.port)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(f"{server.port}\n", encoding="ascii")
        tmp.replace(ready_file)
    stopping.wait()
    server.stop()
    log.info("stopped")
