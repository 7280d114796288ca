"""HsmConfig from URIs and fields; PIN sources and the PIN file's permission check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kms.domain.errors import InvalidArgument
from kms.hsm.config import (
    PIN_FILE_MAX_BYTES,
    HsmConfig,
    PinEnv,
    PinFile,
    PinValue,
    parse_pin_source,
    read_pin,
)

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def write_pin(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


# -- from a URI ------------------------------------------------------------------------------------------


def test_from_uri_with_a_pin_file() -> None:
    config = HsmConfig.from_uri(f"pkcs11:token=kms-dev?module-path={MODULE}&pin-source=file:/etc/kms/pin")
    assert config == HsmConfig(
        module_path=Path(MODULE), pin_source=PinFile(Path("/etc/kms/pin")), token_label="kms-dev"
    )


def test_from_uri_with_every_token_selector() -> None:
    config = HsmConfig.from_uri(
        "pkcs11:token=Prod%20Signing;serial=5143f6b72a09c3c7;manufacturer=SoftHSM%20project;"
        f"model=SoftHSM%20v2;slot-id=7?module-path={MODULE}&pin-source=env:KMS_HSM_PIN"
    )
    assert config.token_label == "Prod Signing"
    assert config.token_serial == "5143f6b72a09c3c7"
    assert config.token_manufacturer == "SoftHSM project"
    assert config.token_model == "SoftHSM v2"
    assert config.slot_id == 7
    assert config.pin_source == PinEnv("KMS_HSM_PIN")


def test_serial_alone_selects_a_token() -> None:
    config = HsmConfig.from_uri(f"pkcs11:serial=abc?module-path={MODULE}&pin-source=env:PIN")
    assert config.token_serial == "abc"
    assert config.token_label is None


def test_pin_value_needs_explicit_permission() -> None:
    uri = f"pkcs11:token=t?module-path={MODULE}&pin-value=1234"
    with pytest.raises(InvalidArgument, match="'pin-value' is refused"):
        HsmConfig.from_uri(uri)
    config = HsmConfig.from_uri(uri, allow_pin_value=True)
    assert config.pin_source == PinValue("1234")
    assert "1234" not in repr(config)
    assert config.read_pin() == "1234"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("pkcs11:token=t?pin-source=env:P", "must name the module"),
        ("pkcs11:token=t?module-name=softhsm2&pin-source=env:P", "'module-name' is not supported"),
        (f"pkcs11:token=t?module-path={MODULE}", "must say where the PIN is"),
        (f"pkcs11:model=m?module-path={MODULE}&pin-source=env:P", "by label"),
        (f"pkcs11:token=t;object=k?module-path={MODULE}&pin-source=env:P", "not an object: remove 'object'"),
        (f"pkcs11:token=t;id=%01?module-path={MODULE}&pin-source=env:P", "not an object: remove 'id'"),
        (f"pkcs11:token=t;type=private?module-path={MODULE}&pin-source=env:P", "not an object"),
        (f"pkcs11:token=t;library-version=2?module-path={MODULE}&pin-source=env:P", "'library-version'"),
        (f"pkcs11:token=t;slot-description=s?module-path={MODULE}&pin-source=env:P", "'slot-description'"),
        (f"pkcs11:token=t?module-path={MODULE}&pin-source=pin.txt", "file:/absolute/path"),
        ("pkcs11:token=t;x-vendor=1?module-path=/m.so&pin-source=env:P", "unsupported"),
    ],
)
def test_from_uri_refusals(uri: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        HsmConfig.from_uri(uri)


def test_explicit_fields_are_checked() -> None:
    with pytest.raises(InvalidArgument, match="absolute"):
        HsmConfig(module_path=Path("libsofthsm2.so"), pin_source=PinEnv("P"), token_label="t")
    with pytest.raises(InvalidArgument, match="by label"):
        HsmConfig(module_path=Path(MODULE), pin_source=PinEnv("P"))


# -- PIN sources -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("file:/etc/kms/pin", PinFile(Path("/etc/kms/pin"))),
        ("file:///etc/kms/pin", PinFile(Path("/etc/kms/pin"))),
        ("/etc/kms/pin", PinFile(Path("/etc/kms/pin"))),
        ("env:KMS_HSM_PIN", PinEnv("KMS_HSM_PIN")),
        ("env:_x9", PinEnv("_x9")),
    ],
)
def test_pin_sources(text: str, expected: object) -> None:
    assert parse_pin_source(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("|/usr/bin/get-pin", "not supported"),
        ("file:pin.txt", "absolute"),
        ("pin.txt", "absolute"),
        ("file://host/etc/pin", "no host"),
        ("env:", "environment variable name"),
        ("env:9X", "environment variable name"),
        ("env:A-B", "environment variable name"),
        ("https://example.com/pin", "absolute"),
    ],
)
def test_pin_source_refusals(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_pin_source(text)


@pytest.mark.parametrize(
    ("content", "pin"),
    [(b"1234\n", "1234"), (b"1234", "1234"), (b"1234\r\n", "1234"), (b" spaced pin \n", " spaced pin ")],
)
def test_read_pin_from_an_owner_only_file(tmp_path: Path, content: bytes, pin: str) -> None:
    path = write_pin(tmp_path / "pin", content)
    assert read_pin(PinFile(path)) == pin


def test_read_only_owner_file_is_fine(tmp_path: Path) -> None:
    path = write_pin(tmp_path / "pin", b"1234\n", 0o400)
    assert read_pin(PinFile(path)) == "1234"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o666])
def test_pin_file_accessible_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_pin(tmp_path / "pin", b"1234\n", mode)
    with pytest.raises(InvalidArgument, match=f"mode {mode:04o}.*chmod 600") as caught:
        read_pin(PinFile(path))
    assert str(tmp_path) not in str(caught.value)
    assert "1234" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (b"12\n34\n", "single line"),
        (b"\xff\xfe", "not UTF-8"),
        (b"1" * (PIN_FILE_MAX_BYTES + 1), "larger than"),
    ],
)
def test_bad_pin_file_contents(tmp_path: Path, content: bytes, message: str) -> None:
    path = write_pin(tmp_path / "pin", content)
    with pytest.raises(InvalidArgument, match=message):
        read_pin(PinFile(path))


def test_largest_pin_file_is_accepted(tmp_path: Path) -> None:
    path = write_pin(tmp_path / "pin", b"1" * PIN_FILE_MAX_BYTES)
    assert len(read_pin(PinFile(path))) == PIN_FILE_MAX_BYTES


def test_missing_pin_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot open") as caught:
        read_pin(PinFile(tmp_path / "absent"))
    assert str(tmp_path) not in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


def test_directory_is_not_a_pin_file(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        read_pin(PinFile(directory))


def test_symlink_to_an_owner_only_file_is_followed(tmp_path: Path) -> None:
    # Kubernetes mounts secrets as symbolic links; what counts is the file they lead to.
    target = write_pin(tmp_path / "target", b"1234\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_pin(PinFile(link)) == "1234"


def test_read_pin_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_TEST_PIN", "4321")
    assert read_pin(PinEnv("KMS_TEST_PIN")) == "4321"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_or_empty_environment_variable(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("KMS_TEST_PIN", raising=False)
    else:
        monkeypatch.setenv("KMS_TEST_PIN", value)
    with pytest.raises(InvalidArgument, match="KMS_TEST_PIN is not set or is empty"):
        read_pin(PinEnv("KMS_TEST_PIN"))


def test_config_reads_the_pin_each_time(tmp_path: Path) -> None:
    path = write_pin(tmp_path / "pin", b"1111\n")
    config = HsmConfig(module_path=Path(MODULE), pin_source=PinFile(path), token_label="t")
    assert config.read_pin() == "1111"
    path.chmod(0o600)
    path.write_bytes(b"2222\n")
    assert config.read_pin() == "2222"
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_relative_pin_file_needs_a_base_directory(tmp_path: Path) -> None:
    uri = f"pkcs11:token=t?module-path={MODULE}&pin-source=file:state/hsm-pin"
    with pytest.raises(InvalidArgument, match="absolute"):
        HsmConfig.from_uri(uri)
    config = HsmConfig.from_uri(uri, relative_to=tmp_path)
    assert config.pin_source == PinFile(tmp_path / "state" / "hsm-pin")
    with pytest.raises(InvalidArgument, match="absolute"):
        parse_pin_source("file:hsm-pin", relative_to=Path("relative/base"))
    with pytest.raises(InvalidArgument, match="absolute"):
        parse_pin_source("https://example.com/pin", relative_to=tmp_path)
    assert parse_pin_source("file:/abs/pin", relative_to=tmp_path) == PinFile(Path("/abs/pin"))
