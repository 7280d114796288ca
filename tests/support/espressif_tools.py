"""Espressif's own tools (esptool, espsecure) as external oracles for the domain's image code.

They are GPL-2.0 test dependencies, never imported by the service: tests run them as separate programs and
compare what they print or whether they accept a file (a few tests also read their tables: chip ids, flash
frequency names, eFuse field widths).

- ``run``/``run_all``: the installed console scripts, one process per command (about 0.15 s each),
  ``run_all`` concurrently on all cores.
- ``exit_codes``: many commands of one tool in a few processes, for tests that need hundreds of verdicts.
  Each command goes through the tool's ``main(argv)`` (what its console script calls); the exit code is 0
  if it returns, the ``SystemExit`` code if it exits, 2 for the tool's ``FatalError`` (as its console script
  reports it) and 1 for any other exception.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

_WORKERS = max(2, os.cpu_count() or 2)

_BATCH_RUNNER = """
import contextlib, importlib, json, os, sys
tool = importlib.import_module(sys.argv[1])
fatal = importlib.import_module("esptool").FatalError
commands = json.loads(open(sys.argv[2]).read())
codes = []
with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
    for argv in commands:
        try:
            tool.main(argv)
            codes.append(0)
        except SystemExit as e:
            codes.append(e.code if isinstance(e.code, int) else 1)
        except fatal:
            codes.append(2)
        except Exception:
            codes.append(1)
open(sys.argv[3], "w").write(json.dumps(codes))
"""


def tool(name: str) -> str:
    """Path of an installed console script (``esptool``, ``espsecure``), next to the running Python first."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it is a dev dependency (pip install -e '.[dev]')")
    return found


def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one tool with ``args``; never raises for a non-zero exit."""
    return subprocess.run(
        [tool(name), *args], capture_output=True, text=True, timeout=120, check=False, env=_quiet_env()
    )


def run_all(commands: Sequence[Sequence[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run ``(tool, *args)`` commands concurrently; results in the order given."""
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        return list(pool.map(lambda command: run(command[0], *command[1:]), commands))


def exit_codes(module: str, commands: Sequence[Sequence[str]]) -> list[int]:
    """Exit codes of ``module`` (``espsecure``, ``esptool``) on each argv, batched over a few processes."""
    tool(module)  # fail early, with the install hint, if the tool is missing
    chunks = [list(commands[i::_WORKERS]) for i in range(_WORKERS)]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        results = list(pool.map(lambda n: _run_chunk(module, chunks[n], Path(scratch), n), range(_WORKERS)))
    codes = [0] * len(commands)
    for n, chunk_codes in enumerate(results):
        codes[n::_WORKERS] = chunk_codes
    return codes


def _run_chunk(module: str, commands: list[Sequence[str]], scratch: Path, n: int) -> list[int]:
    if not commands:
        return []
    given, verdicts = scratch / f"commands-{n}.json", scratch / f"codes-{n}.json"
    given.write_text(json.dumps([list(c) for c in commands]))
    process = subprocess.run(
        [sys.executable, "-c", _BATCH_RUNNER, module, str(given), str(verdicts)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=_quiet_env(),
    )
    assert process.returncode == 0, process.stderr
    codes: list[int] = json.loads(verdicts.read_text())
    assert len(codes) == len(commands)
    return codes


def _quiet_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"})
    return env
