from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SignatureAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNATURE_ALGORITHM_UNSPECIFIED: _ClassVar[SignatureAlgorithm]
    ECDSA_P256_SHA256: _ClassVar[SignatureAlgorithm]
    ECDSA_P384_SHA384: _ClassVar[SignatureAlgorithm]
    RSA_3072_PSS_SHA256: _ClassVar[SignatureAlgorithm]

class SignatureEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNATURE_ENCODING_UNSPECIFIED: _ClassVar[SignatureEncoding]
    RAW: _ClassVar[SignatureEncoding]
    DER: _ClassVar[SignatureEncoding]

class KeyVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_VERSION_STATE_UNSPECIFIED: _ClassVar[KeyVersionState]
    ENABLED: _ClassVar[KeyVersionState]
    DISABLED: _ClassVar[KeyVersionState]
    DESTROY_SCHEDULED: _ClassVar[KeyVersionState]
    DESTROYED: _ClassVar[KeyVersionState]

class KeyPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_PURPOSE_UNSPECIFIED: _ClassVar[KeyPurpose]
    SECURE_BOOT_V2: _ClassVar[KeyPurpose]
    DIGEST_SIGNING: _ClassVar[KeyPurpose]
SIGNATURE_ALGORITHM_UNSPECIFIED: SignatureAlgorithm
ECDSA_P256_SHA256: SignatureAlgorithm
ECDSA_P384_SHA384: SignatureAlgorithm
RSA_3072_PSS_SHA256: SignatureAlgorithm
SIGNATURE_ENCODING_UNSPECIFIED: SignatureEncoding
RAW: SignatureEncoding
DER: SignatureEncoding
KEY_VERSION_STATE_UNSPECIFIED: KeyVersionState
ENABLED: KeyVersionState
DISABLED: KeyVersionState
DESTROY_SCHEDULED: KeyVersionState
DESTROYED: KeyVersionState
KEY_PURPOSE_UNSPECIFIED: KeyPurpose
SECURE_BOOT_V2: KeyPurpose
DIGEST_SIGNING: KeyPurpose

class Digest(_message.Message):
    __slots__ = ("sha256", "sha384")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SHA384_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    sha384: bytes
    def __init__(self, sha256: _Optional[bytes] = ..., sha384: _Optional[bytes] = ...) -> None: ...
