"""``DeviceReprovisioning``: opening a registered device for a new eFuse secret, under dual control.

An officer requests it (``ApprovalService.RequestDeviceReprovisioning``; ``check_request``), M other officers
approve, and executing the request opens the device until the request's expiry (``open``). The new secret
itself never passes here: a factory registrar sends it with ``RegisterDevices`` while the window is open, and
the registry replaces the stored secret then (``kms.domain.devices.registration_outcome``). Both steps are
scoped to the device's product and refused for a revoked device.
"""

from __future__ import annotations

from datetime import datetime

from kms.domain.devices import (
    Device,
    ReprovisioningRepository,
    check_reprovisionable,
    validate_device_id,
)
from kms.domain.identity import Caller
from kms.domain.policy import require_product


class DeviceReprovisioning:
    def __init__(self, devices: ReprovisioningRepository) -> None:
        self._devices = devices

    def check_request(self, caller: Caller, device_id: str) -> Device:
        """The device, if ``caller`` may request its re-provisioning now (registered, in scope, active)."""
        device = self._devices.get(validate_device_id(device_id))
        require_product(caller, device.product)
        return check_reprovisionable(device)

    def open(self, caller: Caller, device_id: str, until: datetime, request_id: str) -> Device:
        """Open the device for re-provisioning until ``until`` (the approved request's expiry)."""
        self.check_request(caller, device_id)
        return self._devices.open_reprovisioning(device_id, until, request_id)
