"""Extra security officers for tests of dual control (``kms.domain.approvals``).

The dev PKI has one officer certificate; ``issue_officers`` issues more with the dev CA (``STATE/pki/ca.key``)
as ``STATE/pki/clients/security-officer-NAME.{pem,key}``, identity ``spiffe://kms.dev/security-officer/NAME``,
so ``RunningKms.client("security-officer-alice")`` and ``kmsctl --identity security-officer-alice`` use them.
``approved_destruction`` makes a key version destruction request that alice asked for and bob and carol
approved (enough for the default of two approvals), ready for ``ExecuteRequest``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from kms.domain.identity import Role
from kms.server.pki import issue_dev_client
from kmsapi.v1 import approvals_pb2, approvals_pb2_grpc
from tests.support.kms_server import RunningKms

OFFICERS = ("alice", "bob", "carol")


def issue_officers(state_dir: Path, names: Sequence[str] = OFFICERS) -> None:
    """Issue a client certificate for each officer NAME that has none yet."""
    for name in names:
        issue_dev_client(state_dir / "pki", Role.SECURITY_OFFICER, name)


def officer_channel(server: RunningKms, identity: str) -> grpc.Channel:
    """An mTLS channel to ``server`` as ``identity`` (a file stem under ``pki/clients``)."""
    files = server.credentials(identity)
    credentials = grpc.ssl_channel_credentials(
        files["ca"].read_bytes(), files["key"].read_bytes(), files["cert"].read_bytes()
    )
    return grpc.secure_channel(server.target, credentials)


def approved_destruction(server: RunningKms, version: str, new_primary_version: str = "") -> str:
    """The id of a destruction request of ``version`` made by alice and approved by bob and carol."""
    issue_officers(server.state_dir)
    request_id = ""
    for name in OFFICERS:
        with officer_channel(server, f"security-officer-{name}") as channel:
            stub = approvals_pb2_grpc.ApprovalServiceStub(channel)
            if name == "alice":
                request_id = stub.RequestKeyVersionDestruction(
                    approvals_pb2.RequestKeyVersionDestructionRequest(
                        name=version, new_primary_version=new_primary_version
                    ),
                    timeout=30,
                ).id
            else:
                stub.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=request_id), timeout=30)
    return request_id
