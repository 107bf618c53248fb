"""The slot worker's start-up: a cold slot is mostly one interpreter start plus the worker's
imports, so the worker imports no module that pulls in ``re``, ``enum`` or ``ctypes``, and its
hand-picked C-level replacements behave like the modules they replace."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from structenv.sandbox import _worker

#: What a worker must not import at start-up: each costs a cold slot milliseconds (tens on a
#: loaded machine). ``json`` and ``signal`` pull in ``re``/``enum``/``functools``.
HEAVY = ("json", "re", "enum", "functools", "collections", "ctypes", "typing", "signal")

VALUES: list[object] = [
    {},
    {"hello": True, "pid": 12},
    {"id": 3, "op": "exec", "cmd": "echo 'é' \"x\"\n\t\\", "env": {"A": "1"}, "timeout": 2.5},
    {"nested": [1, -2, 3.25, 1e300, -0.0, None, False, [], {"k": ""}]},
    {"unicode": "\u2603 \U0001f600 \x00\x1f", "big": 2**70},
]


@pytest.mark.parametrize("value", VALUES)
def test_frame_codec_matches_json(value: object) -> None:
    text = json.dumps(value, separators=(",", ":"))
    assert _worker._encode(value) == text
    assert _worker._decode(text) == value
    assert _worker._decode(f" {json.dumps(value)}\n") == value


@pytest.mark.parametrize("bad", ["", "{", '{"a":1} x', "[1,]", "nul"])
def test_frame_codec_refuses_malformed_frames(bad: str) -> None:
    with pytest.raises(ValueError, match=r"(?i)json|expecting|extra"):
        _worker._decode(bad)


def test_libc_calls_through_ctypes_core() -> None:
    assert _worker._libc("prctl", 3, 0, 0, 0, 0) in (0, 1, 2)  # PR_GET_DUMPABLE
    assert _worker._libc("getpid") > 0


def test_worker_starts_without_heavy_imports(tmp_path: object) -> None:
    config = {
        "pid1": False, "shell": "/bin/sh", "workdir": None, "uid": None,
        "workspace": str(tmp_path), "tag": "t", "env": {},
        "limits": {"as": 0, "fsize": 0, "cpu": 0, "nofile": 1024, "nproc": 0},
    }  # fmt: skip
    # stdin at end-of-file: the worker says hello, then exits (its server is gone).
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", _worker.__file__, json.dumps(config)],
        input=b"",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b'"hello":true' in proc.stdout
    imported = {
        line.split("|")[-1].strip()
        for line in proc.stderr.decode().splitlines()
        if line.startswith("import time:")
    }
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
