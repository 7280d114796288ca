import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from kmsapi.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetPublicKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PublicKey(_message.Message):
    __slots__ = ("key_version", "algorithm", "pem", "pem_crc32c", "sbv2_key_digest")
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PEM_FIELD_NUMBER: _ClassVar[int]
    PEM_CRC32C_FIELD_NUMBER: _ClassVar[int]
    SBV2_KEY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    key_version: str
    algorithm: _common_pb2.SignatureAlgorithm
    pem: str
    pem_crc32c: int
    sbv2_key_digest: bytes
    def __init__(self, key_version: _Optional[str] = ..., algorithm: _Optional[_Union[_common_pb2.SignatureAlgorithm, str]] = ..., pem: _Optional[str] = ..., pem_crc32c: _Optional[int] = ..., sbv2_key_digest: _Optional[bytes] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("product",)
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    product: str
    def __init__(self, product: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("name", "product", "purpose", "algorithm", "sbv2_slot", "primary_version", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SBV2_SLOT_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    product: str
    purpose: _common_pb2.KeyPurpose
    algorithm: _common_pb2.SignatureAlgorithm
    sbv2_slot: int
    primary_version: str
    versions: _containers.RepeatedCompositeFieldContainer[KeyVersion]
    def __init__(self, name: _Optional[str] = ..., product: _Optional[str] = ..., purpose: _Optional[_Union[_common_pb2.KeyPurpose, str]] = ..., algorithm: _Optional[_Union[_common_pb2.SignatureAlgorithm, str]] = ..., sbv2_slot: _Optional[int] = ..., primary_version: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[KeyVersion, _Mapping]]] = ...) -> None: ...

class KeyVersion(_message.Message):
    __slots__ = ("name", "state", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: _common_pb2.KeyVersionState
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.KeyVersionState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
