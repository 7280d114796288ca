import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from kmsapi.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignImageRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SignImageHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[SignImageHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SignImageHeader(_message.Message):
    __slots__ = ("product", "image_size", "image_sha256")
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    product: str
    image_size: int
    image_sha256: bytes
    def __init__(self, product: _Optional[str] = ..., image_size: _Optional[int] = ..., image_sha256: _Optional[bytes] = ...) -> None: ...

class SignImageResponse(_message.Message):
    __slots__ = ("release", "chunk")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    release: Release
    chunk: bytes
    def __init__(self, release: _Optional[_Union[Release, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("name", "product", "chip", "version", "secure_version", "project_name", "input_sha256", "output_sha256", "output_size", "key_versions", "signed_by", "create_time", "reused")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SECURE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROJECT_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    product: str
    chip: str
    version: str
    secure_version: int
    project_name: str
    input_sha256: bytes
    output_sha256: bytes
    output_size: int
    key_versions: _containers.RepeatedScalarFieldContainer[str]
    signed_by: str
    create_time: _timestamp_pb2.Timestamp
    reused: bool
    def __init__(self, name: _Optional[str] = ..., product: _Optional[str] = ..., chip: _Optional[str] = ..., version: _Optional[str] = ..., secure_version: _Optional[int] = ..., project_name: _Optional[str] = ..., input_sha256: _Optional[bytes] = ..., output_sha256: _Optional[bytes] = ..., output_size: _Optional[int] = ..., key_versions: _Optional[_Iterable[str]] = ..., signed_by: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reused: _Optional[bool] = ...) -> None: ...

class SignDigestRequest(_message.Message):
    __slots__ = ("name", "digest", "encoding", "digest_crc32c")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DIGEST_CRC32C_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: _common_pb2.Digest
    encoding: _common_pb2.SignatureEncoding
    digest_crc32c: int
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[_Union[_common_pb2.Digest, _Mapping]] = ..., encoding: _Optional[_Union[_common_pb2.SignatureEncoding, str]] = ..., digest_crc32c: _Optional[int] = ...) -> None: ...

class SignDigestResponse(_message.Message):
    __slots__ = ("signature", "signature_crc32c", "verified_digest_crc32c", "key_version", "algorithm", "encoding")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_CRC32C_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_DIGEST_CRC32C_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    signature_crc32c: int
    verified_digest_crc32c: bool
    key_version: str
    algorithm: _common_pb2.SignatureAlgorithm
    encoding: _common_pb2.SignatureEncoding
    def __init__(self, signature: _Optional[bytes] = ..., signature_crc32c: _Optional[int] = ..., verified_digest_crc32c: _Optional[bool] = ..., key_version: _Optional[str] = ..., algorithm: _Optional[_Union[_common_pb2.SignatureAlgorithm, str]] = ..., encoding: _Optional[_Union[_common_pb2.SignatureEncoding, str]] = ...) -> None: ...
