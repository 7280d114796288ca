"""The committed stubs under client/kmsapi/ are exactly what proto/generate.sh produces from proto/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    if shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent)) is None:
        raise AssertionError("mypy-protobuf is a dev dependency; install requirements.lock")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(
        ["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)], check=True, env=env, capture_output=True
    )
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "kmsapi").rglob("*") if p.is_file())
    committed_dir = ROOT / "client"
    committed = sorted(
        p.relative_to(committed_dir)
        for p in (committed_dir / "kmsapi").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == committed, "run `make proto` and commit the result"
    for relative in fresh:
        assert (tmp_path / relative).read_bytes() == (committed_dir / relative).read_bytes(), (
            f"{relative} is stale: run `make proto` and commit the result"
        )
