"""A scripted LLM server on 127.0.0.1: real HTTP, OpenAI chat completions and vLLM ``/generate``.

It lets every layer that talks to a model be tested against a real server with no GPU and no
network: the OpenAI-compatible policy client, atroposlib's ``VLLMServer`` (token ids,
per-token logprobs and finish reasons) and the demo. Replies come from a :data:`Script`,
usually a :class:`ReplayScript` that replays reference solutions with seeded mistakes.

Endpoints: ``POST /v1/chat/completions`` (Hermes ``<tool_call>`` text, or native ``tool_calls``
when started with ``native_tool_calls=True``; ``logprobs`` when asked; vLLM's
``return_token_ids``), ``POST /generate`` (vLLM's native API exactly as atroposlib 0.4.0's
``VLLMServer`` calls it; absent, a 404 as on stock vLLM, with ``generate_endpoint=False``),
``POST /v1/completions`` (stock vLLM's shape for a token-id prompt with ``logprobs``,
``return_tokens_as_token_ids`` and ``return_token_ids``), ``POST /tokenize``, ``GET /health``
and ``GET /v1/models`` (with vLLM's ``root`` and ``max_model_len``). Faults for tests are
queued with :meth:`PolicyServer.inject`.

Logprobs are real numbers from a deterministic pseudo-distribution (a keyed hash of the seed,
the prompt, the position and the token), not a model's probabilities, and never constant.
Tokens come from the tiny byte-level tokenizer (:class:`~structenv.agent.TinyCodec`), so
``/generate`` agrees with a tokenizer directory built by ``build_tiny_tokenizer``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import h11
from anyio.abc import SocketAttribute, SocketStream

from ..agent._parsing import parse_hermes
from ..agent._tokenizer import TinyCodec
from ._replay import ReplayScript as ReplayScript
from ._replay import ReplayStep as ReplayStep
from ._replay import Script as Script
from ._replay import task_marker as task_marker

__all__ = [
    "Fault",
    "PolicyServer",
    "PolicyServerStatistics",
    "ReplayScript",
    "ReplayStep",
    "Script",
    "main",
    "serve_policy_server",
    "task_marker",
]

logger = logging.getLogger(__name__)

_MAX_BODY = 32 << 20
_MAX_CHOICES = 16
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_CHATML = re.compile(r"<\|im_start\|>([^\n<]*)\n(.*?)<\|im_end\|>\n?", re.DOTALL)


# --------------------------------------------------------------------------- faults, stats


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """A misbehaviour served instead of a completion.

    Attributes:
        kind: ``"status"`` (an HTTP error), ``"garbage"`` (200 with a non-JSON body),
            ``"hang"`` (never answer; the connection stays open until the client leaves) or
            ``"disconnect"`` (close the connection without answering).
        status: The HTTP status for ``"status"``.
        retry_after: ``Retry-After`` seconds sent with a ``"status"`` fault.
    """

    kind: Literal["status", "garbage", "hang", "disconnect"]
    status: int = 500
    retry_after: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyServerStatistics:
    """Counters of a :class:`PolicyServer`.

    Attributes:
        requests: HTTP requests received (all endpoints).
        chat_completions: ``/v1/chat/completions`` requests answered with a completion.
        generations: ``/generate`` requests answered with a completion.
        completions: ``/v1/completions`` requests answered with a completion.
        faults: Requests answered with an injected fault.
        open_connections: Client connections open right now.
    """

    requests: int
    chat_completions: int
    generations: int
    faults: int
    open_connections: int
    completions: int = 0


_Headers = list[tuple[str, str]]


def _json(status: int, payload: Any, headers: _Headers | None = None) -> _Response:
    return status, json.dumps(payload).encode(), headers or []


class _Hang:
    pass


class _Disconnect:
    pass


_Response = tuple[int, bytes, _Headers]
_Reply = _Response | _Hang | _Disconnect


# --------------------------------------------------------------------------- the server


class PolicyServer:
    """A running scripted server; get one from :func:`serve_policy_server`.

    Attributes:
        base_url: ``http://127.0.0.1:<port>/v1`` (the OpenAI API root; atroposlib derives the
            ``/generate`` and ``/health`` URLs from it by removing ``/v1``).
        port: The TCP port.
        script: The reply script.
    """

    def __init__(
        self,
        script: Script,
        *,
        port: int,
        model: str,
        seed: int,
        native_tool_calls: bool,
        api_key: str | None,
        emit_eos: bool,
        max_connections: int = 1024,
        generate_endpoint: bool = True,
        root: str | None = None,
        max_model_len: int = 16384,
    ) -> None:
        self.script = script
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.model = model
        self.native_tool_calls = native_tool_calls
        self.codec = TinyCodec()
        self._seed = seed
        self._api_key = api_key
        self._emit_eos = emit_eos
        self._max_connections = max_connections
        self.generate_endpoint = generate_endpoint
        self.root = root or model
        self.max_model_len = max_model_len
        self._completions = 0
        self._faults: collections.deque[list[Any]] = collections.deque()
        self._requests = self._chats = self._generations = self._faults_served = 0
        self._open = 0
        self._changed: anyio.Event | None = None

    def inject(self, fault: Fault, *, times: int | None = 1) -> None:
        """Serve ``fault`` to the next ``times`` completion requests (``None``: forever).

        Faults queue up in order; ``/health`` and ``/v1/models`` are never faulted.
        """
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        self._faults.append([fault, times])

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._faults.clear()

    def statistics(self) -> PolicyServerStatistics:
        """Current counters."""
        return PolicyServerStatistics(
            requests=self._requests,
            chat_completions=self._chats,
            generations=self._generations,
            faults=self._faults_served,
            open_connections=self._open,
            completions=self._completions,
        )

    async def wait_idle(self) -> None:
        """Wait until no client connection is open (the caller bounds it with a deadline).

        Cancellation: nothing to undo; the server is unaffected.
        """
        while self._open:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    async def wait_requests(self, count: int) -> None:
        """Wait until at least ``count`` requests have arrived (fully read, before replying).

        Cancellation: nothing to undo; the server is unaffected.
        """
        while self._requests < count:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _next_fault(self) -> Fault | None:
        if not self._faults:
            return None
        entry = self._faults[0]
        fault: Fault = entry[0]
        if entry[1] is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self._faults.popleft()
        return fault

    # --- HTTP plumbing -------------------------------------------------------------------

    async def handle(self, stream: SocketStream) -> None:
        """Serve one client connection until it closes (keep-alive supported).

        Cancellation: the connection is closed (shielded, bounded); no state is left behind.
        """
        self._open += 1
        try:
            if self._open > self._max_connections:
                await stream.send(_BUSY)
                return
            await self._serve_connection(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, h11.ProtocolError):
            pass
        except Exception:
            logger.exception("policy server: connection handler failed")
        finally:
            with anyio.move_on_after(1.0, shield=True):
                await stream.aclose()
            self._open -= 1
            self._notify()

    async def _next_event(self, conn: h11.Connection, stream: SocketStream) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)

    async def _serve_connection(self, stream: SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await self._next_event(conn, stream)
            if not isinstance(request, h11.Request):
                return
            body = bytearray()
            while True:
                event = await self._next_event(conn, stream)
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > _MAX_BODY:
                        await self._send(conn, stream, *_json(413, {"error": "body too large"}))
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            self._requests += 1
            self._notify()
            reply = self._dispatch(request, bytes(body))
            if isinstance(reply, _Disconnect):
                return
            if isinstance(reply, _Hang):
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:  # answer nothing, but notice when the client goes away
                        await stream.receive()
                return
            await self._send(conn, stream, *reply)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _send(
        self,
        conn: h11.Connection,
        stream: SocketStream,
        status: int,
        body: bytes,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        content_type = "application/json" if body[:1] in (b"{", b"[") else "text/plain"
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            *extra,
        ]
        await stream.send(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        await stream.send(conn.send(h11.Data(data=body)) or b"")
        await stream.send(conn.send(h11.EndOfMessage()) or b"")

    def _dispatch(self, request: h11.Request, body: bytes) -> _Reply:
        method = request.method.decode()
        path = request.target.decode().split("?", 1)[0].rstrip("/")
        if self._api_key is not None:
            auth = dict(request.headers).get(b"authorization", b"").decode()
            if auth != f"Bearer {self._api_key}":
                return _json(401, {"error": {"message": "invalid api key"}})
        if method == "GET" and path == "/health":
            return 200, b"", []
        if method == "GET" and path == "/v1/models":
            model = {
                "id": self.model,
                "object": "model",
                "root": self.root,
                "max_model_len": self.max_model_len,
            }
            return _json(200, {"object": "list", "data": [model]})
        handlers = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completion,
            "/tokenize": self._tokenize,
        }
        if self.generate_endpoint:
            handlers["/generate"] = self._generate
        if path not in handlers:
            return _json(404, {"error": {"message": f"no route {path}"}})
        if method != "POST":
            return _json(405, {"error": {"message": "use POST"}})
        fault = self._next_fault()
        if fault is not None:
            self._faults_served += 1
            if fault.kind == "hang":
                return _Hang()
            if fault.kind == "disconnect":
                return _Disconnect()
            if fault.kind == "garbage":
                return 200, b"<html>this is not JSON {", []
            headers = (
                [] if fault.retry_after is None else [("retry-after", f"{fault.retry_after:g}")]
            )
            return _json(fault.status, {"error": {"message": "injected fault"}}, headers)
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("body must be a JSON object")
            return handlers[path](data)
        except (ValueError, TypeError, KeyError) as exc:
            return _json(400, {"error": {"message": f"bad request: {exc}"}})

    # --- generation ----------------------------------------------------------------------

    def _logprob(self, context: bytes, position: int, token: int) -> float:
        key = context + position.to_bytes(4, "little") + token.to_bytes(4, "little")
        h = hashlib.blake2b(key, digest_size=8, key=self._seed.to_bytes(8, "little")).digest()
        u = (int.from_bytes(h, "little") + 0.5) / 2.0**64
        return math.log(0.02 + 0.98 * u**0.25)  # mostly confident, never exactly 0

    def _generate_one(
        self, messages: Sequence[Mapping[str, Any]], max_tokens: int | None, stop: Sequence[str]
    ) -> tuple[str, list[int], str]:
        text = str(self.script(messages))
        finish = "stop"
        for s in stop:
            if s and s in text:
                text = text[: text.index(s)]
        ids = self.codec.encode(text)
        if max_tokens is not None and len(ids) > max_tokens:
            ids, finish = ids[:max_tokens], "length"
            text = self.codec.decode(ids)
        elif self._emit_eos:
            ids = [*ids, self.codec.eos_token_id]
        return text, ids, finish

    def _chat(self, data: dict[str, Any]) -> _Reply:
        messages = data["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of objects")
        n = min(int(data.get("n") or 1), _MAX_CHOICES)
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        stop = data.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        context = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode()).digest()
        choices = []
        total = 0
        for index in range(n):
            text, ids, finish = self._generate_one(messages, max_tokens, stop)
            ids = [i for i in ids if i != self.codec.eos_token_id]
            total += len(ids)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.native_tool_calls:
                parsed = parse_hermes(text)
                if parsed.calls and not parsed.errors:
                    message["content"] = parsed.content or None
                    message["tool_calls"] = [
                        {
                            "id": f"call_{self._chats}_{index}_{k}",
                            "type": "function",
                            "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                        }
                        for k, c in enumerate(parsed.calls)
                    ]
                    finish = "tool_calls" if finish == "stop" else finish
            choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish}
            choice["logprobs"] = None
            if data.get("logprobs"):
                lctx = context + index.to_bytes(2, "little")
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": self.codec.decode([t]),
                            "logprob": self._logprob(lctx, pos, t),
                            "bytes": self.codec.token_bytes(t),
                            "top_logprobs": [],
                        }
                        for pos, t in enumerate(ids)
                    ]
                }
            if data.get("return_token_ids"):
                choice["token_ids"] = ids
            choices.append(choice)
        self._chats += 1
        prompt_tokens = sum(len(self.codec.encode(str(m.get("content") or ""))) for m in messages)
        extra: dict[str, Any] = {}
        if data.get("return_token_ids"):
            extra["prompt_token_ids"] = self.codec.encode(_render_chatml(messages))
        return _json(
            200,
            {
                **extra,
                "id": f"chatcmpl-{self._chats}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": total,
                    "total_tokens": prompt_tokens + total,
                },
            },
        )

    def _generate(self, data: dict[str, Any]) -> _Reply:
        prompt = data.get("prompt")
        if isinstance(prompt, dict):
            prompt_ids = [int(i) for i in prompt["prompt_token_ids"]]
            prompt_text = self.codec.decode(prompt_ids)
        elif isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.codec.encode(prompt)
        else:
            raise ValueError("prompt must be text or {'prompt_token_ids': [...]}")
        messages = _parse_chatml(prompt_text)
        n = min(int(data.get("n") or 1), _MAX_CHOICES)
        stop = data.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        context = hashlib.blake2b(prompt_text.encode()).digest()
        texts, finishes, token_ids, logprobs = [], [], [], []
        for index in range(n):
            text, ids, finish = self._generate_one(messages, data.get("max_tokens"), stop)
            lctx = context + index.to_bytes(2, "little")
            texts.append(text)
            finishes.append(finish)
            token_ids.append(ids)
            # vLLM's shape: per token a one-element list holding {token_id: logprob}.
            logprobs.append([[{str(t): self._logprob(lctx, p, t)}] for p, t in enumerate(ids)])
        self._generations += 1
        reply: dict[str, Any] = {"text": texts, "prompt": prompt_text, "finish_reasons": finishes}
        if data.get("logprobs") is not None:
            reply.update(logprobs=logprobs, prompt_token_ids=prompt_ids, token_ids=token_ids)
        if data.get("prompt_logprobs") is not None:
            reply["prompt_logprobs"] = [None] + [
                {str(t): self._logprob(context, p, t)} for p, t in enumerate(prompt_ids[1:], 1)
            ]
        return _json(200, reply)

    def _tokenize(self, data: dict[str, Any]) -> _Reply:
        if "messages" in data:
            text = _render_chatml(
                data["messages"], generation=bool(data.get("add_generation_prompt"))
            )
        else:
            text = str(data["prompt"])
        tokens = self.codec.encode(text)
        return _json(
            200, {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens}
        )

    def _completion(self, data: dict[str, Any]) -> _Reply:
        # Stock vLLM's /v1/completions for a token-id prompt: token ids as "token_id:<id>"
        # strings (return_tokens_as_token_ids), the sampled end-of-turn token included.
        prompt = data.get("prompt")
        if not isinstance(prompt, list) or not all(isinstance(i, int) for i in prompt):
            raise ValueError("this server takes token-id prompts only")
        max_tokens = int(data.get("max_tokens") or 16)
        if len(prompt) + max_tokens > self.max_model_len:
            return _json(
                400,
                {
                    "error": {
                        "message": f"This model's maximum context length is "
                        f"{self.max_model_len} tokens. However, you requested "
                        f"{len(prompt) + max_tokens} tokens."
                    }
                },
            )
        prompt_text = self.codec.decode(prompt)
        text, ids, finish = self._generate_one(_parse_chatml(prompt_text), max_tokens, [])
        if finish == "stop" and (not ids or ids[-1] != self.codec.eos_token_id):
            ids = [*ids, self.codec.eos_token_id]
        context = hashlib.blake2b(bytes(str(prompt), "ascii")).digest()
        logprobs = [self._logprob(context, p, t) for p, t in enumerate(ids)]
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
        if data.get("logprobs") is not None:
            tokens = (
                [f"token_id:{t}" for t in ids]
                if data.get("return_tokens_as_token_ids")
                else [self.codec.decode([t]) for t in ids]
            )
            choice["logprobs"] = {
                "tokens": tokens,
                "token_logprobs": logprobs,
                "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, logprobs, strict=True)],
                "text_offset": [0] * len(ids),
            }
        else:
            choice["logprobs"] = None
        if data.get("return_token_ids"):
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = list(prompt)
        self._completions += 1
        return _json(
            200,
            {
                "id": f"cmpl-{self._completions}",
                "object": "text_completion",
                "model": self.model,
                "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids)},
            },
        )


def _render_chatml(messages: Any, *, generation: bool = True) -> str:
    """ChatML as the tiny tokenizer's template renders plain role/content messages."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    text = "".join(
        f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages
    )
    return text + ("<|im_start|>assistant\n" if generation else "")


def _parse_chatml(text: str) -> list[dict[str, Any]]:
    """Messages of a ChatML prompt; a prompt that is not ChatML is one user message."""
    messages = [{"role": m.group(1), "content": m.group(2)} for m in _CHATML.finditer(text)]
    return messages or [{"role": "user", "content": text}]


@asynccontextmanager
async def serve_policy_server(
    script: Script,
    *,
    port: int = 0,
    model: str = "scripted",
    seed: int = 0,
    native_tool_calls: bool = False,
    api_key: str | None = None,
    emit_eos: bool = False,
    max_connections: int = 1024,
    generate_endpoint: bool = True,
    root: str | None = None,
    max_model_len: int = 16384,
) -> AsyncIterator[PolicyServer]:
    """Run a scripted policy server on 127.0.0.1 for the duration of the block.

    Args:
        script: Produces each assistant reply from the conversation.
        port: TCP port (0: an ephemeral one; read :attr:`PolicyServer.port`).
        model: Model name reported in responses.
        seed: Seed of the logprob pseudo-distribution.
        native_tool_calls: Return OpenAI ``tool_calls`` instead of leaving ``<tool_call>``
            blocks in the chat completion text.
        api_key: Require this bearer token when set.
        emit_eos: End ``/generate`` token ids with ``<|im_end|>`` as vLLM does. Off by default:
            atroposlib's ManagedServer extends sequences by text prefix and would then count
            the end-of-turn token twice.
        max_connections: Connections served at once; more are answered 503 and closed.
        generate_endpoint: Serve ``/generate``; ``False`` answers it 404 like stock vLLM's
            OpenAI server.
        root: The ``root`` of the ``/v1/models`` entry (vLLM: where the model was loaded
            from; default: ``model``).
        max_model_len: The context length ``/v1/models`` reports and ``/v1/completions``
            enforces (HTTP 400 beyond it, as vLLM).

    Cancellation: the listener and every connection are closed; nothing outlives the block.
    """
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    server = PolicyServer(
        script,
        port=listener.extra(SocketAttribute.local_port),
        model=model,
        seed=seed,
        native_tool_calls=native_tool_calls,
        api_key=api_key,
        emit_eos=emit_eos,
        max_connections=max_connections,
        generate_endpoint=generate_endpoint,
        root=root,
        max_model_len=max_model_len,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, server.handle)
            try:
                yield server
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.move_on_after(1.0, shield=True):
            await listener.aclose()


async def _serve_forever(args: argparse.Namespace) -> None:
    script: Script
    if args.solutions:
        script = ReplayScript.from_json(
            args.solutions, mistake_rate=args.mistake_rate, seed=args.seed
        )
    else:
        script = ReplayScript({}, seed=args.seed)
    async with serve_policy_server(
        script,
        port=args.port,
        model=args.model,
        seed=args.seed,
        native_tool_calls=args.native_tool_calls,
        api_key=args.api_key,
    ) as server:
        print(server.base_url, flush=True)
        await anyio.sleep_forever()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: serve until interrupted; prints the base URL when ready."""
    parser = argparse.ArgumentParser(
        prog="structenv policy-server", description="Scripted OpenAI/vLLM-compatible test server"
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--solutions", help="JSON file: task id -> list of assistant turns")
    parser.add_argument("--mistake-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="scripted")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--native-tool-calls", action="store_true")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    try:
        anyio.run(_serve_forever, args, backend=args.backend)
    except KeyboardInterrupt:
        print("policy server stopped", file=sys.stderr)
    return 0
