"""gRPC side of Secure Boot V2 slots: ``SecureBootSlotService`` (kmsapi/v1/slots.proto) and ``RevokeSlot``,
the act of ``ApprovalService.RequestSlotRevocation`` under dual control.

Both parse the request, call ``SecureBootSlots`` (``kms.service.sbv2_slots``) with the authenticated caller,
note the product and the slot's key for the audit record, and build the response. A revocation request names
its slot ``products/P/sbv2-slots/N`` and records as parameters the product (``product``: dual control scopes
the request by it), the key in the slot (``key``) and its primary version (``primary_version``), so approvers
see what they approve; the act refuses to run if the slot holds another key by then.
"""

from __future__ import annotations

import grpc

from kms.domain.approvals import PRODUCT_PARAMETER, ApprovalRequest
from kms.domain.identity import Caller
from kms.domain.sbv2_slots import SecureBootSlot, SlotState, efuse_digest, parse_slot_target
from kms.server.audit_interceptor import note
from kms.server.auth import caller_of
from kms.server.errors import translate_errors
from kms.server.servicers import ALGORITHMS, STATES
from kms.service.sbv2_slots import SecureBootSlots
from kmsapi.v1 import approvals_pb2, common_pb2, slots_pb2, slots_pb2_grpc

SLOT_STATES = {
    SlotState.EMPTY: slots_pb2.SECURE_BOOT_SLOT_EMPTY,
    SlotState.ACTIVE: slots_pb2.SECURE_BOOT_SLOT_ACTIVE,
    SlotState.REVOKED: slots_pb2.SECURE_BOOT_SLOT_REVOKED,
}
KEY_PARAMETER = "key"
PRIMARY_PARAMETER = "primary_version"


def slot_pb(slot: SecureBootSlot) -> slots_pb2.SecureBootSlot:
    message = slots_pb2.SecureBootSlot(product=slot.product, slot=slot.slot, state=SLOT_STATES[slot.state])
    key, primary = slot.key, slot.primary
    if key is not None and primary is not None:
        message.key = key.name
        message.algorithm = ALGORITHMS.get(key.algorithm, common_pb2.SIGNATURE_ALGORITHM_UNSPECIFIED)
        message.primary_version = primary.name
        message.efuse_digest = slot.efuse_digest
        message.versions.extend(
            slots_pb2.SecureBootSlotVersion(
                name=v.name,
                state=STATES[v.state],
                efuse_digest=efuse_digest(v),
                primary=v.version == primary.version,
            )
            for v in slot.versions
        )
    if slot.revocation is not None:
        message.revoke_time.FromDatetime(slot.revocation.revoked_at)
        message.revoked_by = slot.revocation.revoked_by
        message.revocation_request = f"approvals/{slot.revocation.approval_id}"
    return message


class SecureBootSlotServicer(slots_pb2_grpc.SecureBootSlotServiceServicer):
    def __init__(self, slots: SecureBootSlots) -> None:
        self._slots = slots

    @translate_errors
    def ListSecureBootSlots(  # noqa: N802 - gRPC method name
        self, request: slots_pb2.ListSecureBootSlotsRequest, context: grpc.ServicerContext
    ) -> slots_pb2.ListSecureBootSlotsResponse:
        note(product=request.product)
        slots = self._slots.list(caller_of(context), request.product)
        return slots_pb2.ListSecureBootSlotsResponse(slots=[slot_pb(s) for s in slots])


class RevokeSlot:
    """The act of slot revocation (a ``GatedAct``): ``SecureBootSlots.revoke`` as the executing officer."""

    def __init__(self, slots: SecureBootSlots) -> None:
        self._slots = slots

    def prepare(
        self, caller: Caller, message: approvals_pb2.RequestSlotRevocationRequest
    ) -> tuple[str, dict[str, str]]:
        note(product=message.product)
        slot = self._slots.check_revocable(caller, message.product, message.slot)
        assert slot.key is not None and slot.primary is not None  # a revocable slot is ACTIVE
        note(key_version=slot.key.name)
        return slot.target, {
            PRODUCT_PARAMETER: slot.product,
            KEY_PARAMETER: slot.key.name,
            PRIMARY_PARAMETER: slot.primary.name,
        }

    def execute(self, caller: Caller, request: ApprovalRequest) -> approvals_pb2.ExecuteRequestResponse:
        product, number = parse_slot_target(request.target)
        note(product=product)
        approved_key = request.parameters.get(KEY_PARAMETER)
        if approved_key is not None:
            note(key_version=approved_key)
        revoked = self._slots.revoke(caller, product, number, request.id, approved_key)
        return approvals_pb2.ExecuteRequestResponse(slot=slot_pb(revoked))


def add_secure_boot_slots(server: grpc.Server, slots: SecureBootSlots) -> None:
    """Serve ``SecureBootSlotService`` on ``server`` (the act ``RevokeSlot`` goes into ``add_approvals``)."""
    slots_pb2_grpc.add_SecureBootSlotServiceServicer_to_server(SecureBootSlotServicer(slots), server)
