"""The device side of FKSP v1 sealed payloads, in Python: a reference decoder and a simulated ESP32.

``decode_stream`` is the specification's second implementation (``docs/sealed-payload-v1.md``), written
from the spec alone and importing nothing from the service (``kms``); ``DeviceModel`` wraps it in what a
device adds around it: the eFuse HMAC, the anti-rollback floor, an A/B flash that must survive a power
cut at any point, and trusted manifest keys that move by rollover statements (``rollover``). The C
reference decoder (``client/device-c``) is checked against the same vectors (``tests/vectors/sealed``) and
tamper matrix (``tests/support/sealed_tamper.py``).
"""

from kmsctl.device.decoder import (
    DecodedManifest,
    DeviceContext,
    PayloadRejected,
    Sink,
    Verdict,
    aes256gcm_open,
    decode_stream,
    hmac_sha256,
    manifest_key_id,
    payload_key_info,
    segment_nonce,
    verify_p256_signature,
)
from kmsctl.device.model import (
    BootState,
    DeviceModel,
    Flash,
    FlashVerifyError,
    ImageTooLarge,
    OtaEntry,
    PowerCut,
    PowerSupply,
    RolloverResult,
    UpdateResult,
    cut_stream,
)
from kmsctl.device.rollover import (
    RolloverRejected,
    RolloverVerdict,
    parse_statement,
    split_statements,
    verify_chain,
    verify_statement,
)

__all__ = [
    "BootState",
    "DecodedManifest",
    "DeviceContext",
    "DeviceModel",
    "Flash",
    "FlashVerifyError",
    "ImageTooLarge",
    "OtaEntry",
    "PayloadRejected",
    "PowerCut",
    "PowerSupply",
    "RolloverRejected",
    "RolloverResult",
    "RolloverVerdict",
    "Sink",
    "UpdateResult",
    "Verdict",
    "aes256gcm_open",
    "cut_stream",
    "decode_stream",
    "hmac_sha256",
    "manifest_key_id",
    "parse_statement",
    "payload_key_info",
    "segment_nonce",
    "split_statements",
    "verify_chain",
    "verify_p256_signature",
    "verify_statement",
]
