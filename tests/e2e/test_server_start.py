"""Starting a second server on a port that is in use fails with a clear message (no SO_REUSEPORT sharing)."""

from __future__ import annotations

import re
import subprocess

from tests.support.kms_server import KMS, RunningKms


def test_a_second_server_on_a_busy_port_refuses_to_start(kms_server: RunningKms) -> None:
    config = kms_server.config.read_text(encoding="utf-8")
    busy = f"127.0.0.1:{kms_server.port}"  # where the server listens ("localhost" would also try ::1)
    same_port = re.sub(r"(?m)^listen\s*=.*$", f'listen = "{busy}"', config, count=1)
    assert same_port != config
    clone = kms_server.config.with_name("kms-same-port.toml")  # same directory: relative paths still resolve
    clone.write_text(same_port, encoding="utf-8")
    try:
        second = subprocess.run(
            [*KMS, "serve", "--config", str(clone)], capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        clone.unlink()
    assert second.returncode == 1, second.stderr
    assert f"cannot listen on {busy}" in second.stderr
    assert "Change [server] listen in kms.toml" in second.stderr
    assert "Traceback" not in second.stderr
