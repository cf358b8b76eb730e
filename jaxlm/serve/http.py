"""An OpenAI-compatible HTTP server over the engine (standard library only; never touches arrays).

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both streamable as server-sent
events), `GET /v1/models`, `GET /v1/models/{id}` and `GET /health`. A thread per connection
turns text into token ids, submits one engine request per choice and turns the tokens back
into text. A client that disconnects cancels its requests, freeing their rows. `shutdown`
stops accepting connections, lets every accepted request finish, then stops the engine.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import Empty, Queue
from typing import Any

from jaxlm.serve import protocol
from jaxlm.serve.engine import Engine, EngineStopped, Finished, Request
from jaxlm.serve.protocol import BadRequest

MAX_BODY = 16 << 20
POLL_S = 0.05  # how often a waiting handler checks that its client is still there


class _Gone(Exception):
    """The client closed its connection."""


class _Failed(Exception):
    """The engine failed while decoding (an XLA error): a 500 for the request, not a crash."""


class _HTTPServer(ThreadingHTTPServer):
    # Connections waiting to be accepted: the standard library's 5 resets a burst of clients.
    request_queue_size = 1024


class Server:
    """Serve `engine` as model `name` on `host`:`port` (0 picks a free port; see `.port`).

    `tokenizer` turns text into ids and back; `template` (a `jaxlm.data.chat.Template`) renders
    chat messages, and `chat_stop_ids` end an assistant turn; plain completions get
    `bos_id` first (when not None) and stop at `stop_ids`.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        name: str,
        *,
        template: Any = None,
        stop_ids: Sequence[int] = (),
        chat_stop_ids: Sequence[int] = (),
        bos_id: int | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        log: bool = False,
    ) -> None:
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.template, self.stop_ids, self.chat_stop_ids = template, tuple(stop_ids), chat_stop_ids
        self.bos_id, self.api_key, self.log = bos_id, api_key, log
        self.created = int(time.time())
        self._busy = 0  # generation requests being answered
        self._idle = threading.Condition()
        self._draining = False
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = _HTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}/v1"

    def start(self) -> Server:
        """Serve from a background thread (the engine must be started)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="jaxlm-http")
        self._thread.daemon = True
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, finish every request already accepted, stop the engine."""
        self._draining = True
        self.httpd.shutdown()  # no new connections are served
        self.httpd.server_close()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout)
        self.engine.stop(drain=True, timeout=timeout)

    # --- a generation request, from body to response ------------------------------------------

    def prompt_ids(self, parsed: protocol.Parsed) -> tuple[list[list[int]], tuple[int, ...]]:
        """Token ids of each prompt, and the ids that end a choice."""
        if parsed.chat:
            from jaxlm.tasks.sft import chat_prompt

            try:
                ids = chat_prompt(parsed.prompts[0], self.tokenizer, self.template)
            except ValueError as e:
                raise BadRequest(f"messages: {e}", "messages") from None
            return [ids], tuple(self.chat_stop_ids)
        bos = [self.bos_id] if self.bos_id is not None else []
        ids = [bos + self.tokenizer.encode(p) if isinstance(p, str) else p for p in parsed.prompts]
        return ids, self.stop_ids

    def requests(self, parsed: protocol.Parsed) -> tuple[list[Request], list[int], tuple[int, ...]]:
        """One engine request per choice (prompt-major), checked; and each prompt's length."""
        prompts, stop_ids = self.prompt_ids(parsed)
        s, context = parsed.sampling, self.engine.context
        where = "messages" if parsed.chat else "prompt"
        out: list[Request] = []
        events: Queue = Queue()
        for i, ids in enumerate(prompts):
            if len(ids) >= context:
                raise BadRequest(
                    f"{where} {i} has {len(ids)} tokens; this model's context is {context} "
                    f"tokens, prompt and completion together: shorten it to at most "
                    f"{context - 1}",
                    where,
                    code="context_length_exceeded",
                )
            max_tokens = s.max_tokens if s.max_tokens is not None else context - len(ids)
            if len(ids) + max_tokens > context:
                name = "max_tokens"
                raise BadRequest(
                    f"{name}={max_tokens} with a prompt of {len(ids)} tokens is more than this "
                    f"model's context of {context} tokens; ask for at most "
                    f"{context - len(ids)}",
                    name,
                    code="context_length_exceeded",
                )
            base = s.seed if s.seed is not None else secrets.randbits(62)
            for j in range(s.n):
                r = Request(
                    prompt=ids,
                    max_tokens=max_tokens,
                    stop_ids=stop_ids,
                    temperature=s.temperature,
                    top_k=s.top_k,
                    top_p=s.top_p,
                    seed=(base + j) % 2**63,
                    events=events,
                )
                try:
                    self.engine.check(r)
                except ValueError as e:
                    raise BadRequest(f"{where} {i}: {e}", where) from None
                out.append(r)
        return out, [len(p) for p in prompts], stop_ids


class _Handler(BaseHTTPRequestHandler):
    server_ref: Server
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection is closed after this long

    def log_message(self, format: str, *args: Any) -> None:
        if self.server_ref.log:
            sys.stderr.write(f"jaxlm serve: {self.address_string()} {format % args}\n")

    # --- plumbing ---------------------------------------------------------------------------

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: BadRequest) -> None:
        self._json(e.status, e.body())

    def _authorized(self) -> bool:
        key = self.server_ref.api_key
        if key is None or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._error(
            BadRequest("Incorrect API key provided", None, "invalid_api_key", 401, "auth_error")
        )
        return False

    def _client_gone(self) -> bool:
        """The client closed its side (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _sse(self, body: dict[str, Any] | str) -> None:
        data = body if isinstance(body, str) else json.dumps(body)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise _Gone from None

    # --- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        srv = self.server_ref
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/health", "/v1/health"):
            status = 503 if srv._draining else 200
            self._json(status, {"status": "draining" if srv._draining else "ok", **srv.engine.load})
            return
        if not self._authorized():
            return
        model = {
            "id": srv.name,
            "object": "model",
            "created": srv.created,
            "owned_by": "jaxlm",
            "max_model_len": srv.engine.context,
        }
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [model]})
        elif path == f"/v1/models/{srv.name}":
            self._json(200, model)
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            self._error(
                BadRequest(f"The model {name!r} does not exist", "model", "model_not_found", 404)
            )
        else:
            self._error(BadRequest(f"no route GET {path}", None, "not_found", 404))

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        self._streaming = False
        try:
            raw = self._read_body()
        except BadRequest as e:
            self.close_connection = True
            self._error(e)
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(BadRequest(f"no route POST {path}", None, "not_found", 404))
            return
        if not self._authorized():
            return
        srv = self.server_ref
        with srv._idle:
            srv._busy += 1
        try:
            self._generate(raw, chat=path.endswith("chat/completions"))
        except BadRequest as e:
            self._error(e)
        except (_Gone, ConnectionError):
            self.close_connection = True
        except _Failed as e:
            self.close_connection = True
            error = BadRequest(
                f"generation failed: {e}", None, "internal_error", 500, "server_error"
            )
            if self._streaming:
                with contextlib.suppress(_Gone):
                    self._sse(error.body())
            else:
                self._error(error)
        finally:
            with srv._idle:
                srv._busy -= 1
                srv._idle.notify_all()

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest(
                "a JSON body with a Content-Length header is required", None, None, 411
            )
        if int(length) > MAX_BODY:
            raise BadRequest(f"the body is over {MAX_BODY} bytes", None, None, 413)
        return self.rfile.read(int(length))

    def _generate(self, raw: bytes, chat: bool) -> None:
        srv = self.server_ref
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        parsed = protocol.parse(body, chat, [srv.name])
        requests, prompt_lengths, stop_ids = srv.requests(parsed)
        try:
            for r in requests:
                srv.engine.submit(r)
        except EngineStopped as e:
            for r in requests:
                r.cancel()
            raise BadRequest(str(e), None, "shutting_down", 503, "server_error") from None
        decode = srv.tokenizer.decode
        texts = [protocol.TextStream(decode, parsed.sampling.stop, stop_ids) for _ in requests]
        index = {id(r): i for i, r in enumerate(requests)}
        finish: list[str | None] = [None] * len(requests)
        rid = protocol.new_id(chat)
        events = requests[0].events
        prompt_tokens = sum(prompt_lengths)  # each prompt once, whatever `n`
        self._streaming = parsed.sampling.stream
        if parsed.sampling.stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if chat:
                for i in range(len(requests)):
                    self._sse(protocol.chunk(rid, parsed, i, "", role=True))
        try:
            checked = time.monotonic()
            while None in finish:
                if time.monotonic() - checked > POLL_S:  # even while tokens keep coming
                    if self._client_gone():
                        raise _Gone
                    if not srv.engine.alive and events.empty():
                        raise _Failed(srv.engine.error or "the engine stopped")
                    checked = time.monotonic()
                try:
                    r, event = events.get(timeout=POLL_S)
                except Empty:
                    continue
                i = index[id(r)]
                if finish[i] is not None:
                    continue  # tokens after a stop string, before the cancel took effect
                if isinstance(event, Finished):
                    if event.reason == "error":
                        raise _Failed(event.error or "the engine failed")
                    finish[i] = "length" if event.reason == "length" else "stop"
                    text = texts[i].flush()
                else:
                    text = texts[i].add(event)
                    if texts[i].stopped:
                        r.cancel()
                        finish[i] = "stop"
                if parsed.sampling.stream:
                    if text:
                        self._sse(protocol.chunk(rid, parsed, i, text))
                    if finish[i] is not None:
                        self._sse(protocol.chunk(rid, parsed, i, None, finish[i]))
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        use = protocol.usage(prompt_tokens, sum(t.tokens for t in texts))
        if parsed.sampling.stream:
            if parsed.sampling.include_usage:
                self._sse(protocol.usage_chunk(rid, parsed, use))
            self._sse("[DONE]")
            return
        choices = [
            (protocol.printable(t.text), f or "stop") for t, f in zip(texts, finish, strict=True)
        ]
        self._json(200, protocol.response(rid, parsed, choices, use))
