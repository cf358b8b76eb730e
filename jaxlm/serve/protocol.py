"""The OpenAI request and response schema, kept apart from the engine: request bodies checked
field by field (a `BadRequest` names the field), text turned into token ids and back, stop
strings found in the text, and the JSON objects of responses and stream chunks.

Fields the OpenAI API defines but this server does not implement (penalties, logprobs, echo,
logit_bias, tools, ...) are accepted at their neutral values and refused otherwise; a field the
API does not know is refused, as the API refuses it ("Unrecognized request argument").
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

MAX_N = 128
MAX_STOP = 4


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status`, an OpenAI-style error body naming `param`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = (
            message,
            param,
            code,
            status,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


# Fields of each endpoint: those used, and those accepted only at a neutral value.
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "top_k",
}
_COMPLETION = _COMMON | {"prompt"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v in (None, 0),
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
    "best_of": lambda v: v in (None, 1),
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,
    "response_format": lambda v: v in (None, {"type": "text"}),
    "metadata": lambda v: True,
    "store": lambda v: v in (None, False),
    "service_tier": lambda v: True,
}


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int | None  # None: the rest of the context
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class Parsed:
    chat: bool
    model: str
    prompts: list[Any]  # completions: str or list[int] each; chat: one list of messages
    sampling: Sampling


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(
    body: dict[str, Any],
    name: str,
    default: float,
    low: float,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite number in [low, high] ((low, high] with `low_open`; no upper bound for None)."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise BadRequest(f"{name}={v!r} must be a finite number", name)
    if (v <= low if low_open else v < low) or (high is not None and v > high):
        lo = "(" if low_open else "["
        where = f"in {lo}{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise BadRequest(f"{name}={v!r} must be {where}", name)
    return float(v)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise BadRequest(f"{name}={v!r} must be an integer", name)
    if v < low or (high is not None and v > high):
        where = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise BadRequest(f"{name}={v} must be {where}", name)
    return v


def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    for name, v in body.items():
        if name in known:
            continue
        if name in _NEUTRAL:
            if not _NEUTRAL[name](v):
                raise BadRequest(
                    f"{name}={v!r:.80} is not supported by this server (leave it out)", name
                )
            continue
        raise BadRequest(f"Unrecognized request argument supplied: {name}", name)


def _prompts(v: Any) -> list[Any]:
    """A completion's `prompt`: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(x, str) for x in v):
            return list(v)
        if all(_is_int(x) for x in v):
            return [list(v)]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in v):
            return [list(x) for x in v]
    raise BadRequest(
        "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
        f"token ids (none empty); got {v!r:.80}",
        "prompt",
    )


def _messages(v: Any) -> list[dict[str, str]]:
    """Chat messages as {"role", "content"} with text content (text parts joined)."""
    if not isinstance(v, list) or not v:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"{where} must be an object with a string role", where)
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise BadRequest(
                f"{where}.role={m['role']!r} must be system, developer, user or assistant",
                f"{where}.role",
            )
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"{where}.content: only text parts are supported", where)
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string or a list of text parts", where)
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def parse(body: Any, chat: bool, models: Sequence[str]) -> Parsed:
    """Check a request body of /v1/completions (`chat` False) or /v1/chat/completions."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _check_fields(body, _CHAT if chat else _COMPLETION)
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("model is required: the name of a served model", "model")
    if model not in models:
        raise BadRequest(
            f"The model {model!r} does not exist; this server serves {list(models)}",
            "model",
            code="model_not_found",
        )
    if chat:
        if "messages" not in body:
            raise BadRequest("messages is required", "messages")
        prompts: list[Any] = [_messages(body["messages"])]
    else:
        if "prompt" not in body:
            raise BadRequest("prompt is required", "prompt")
        prompts = _prompts(body["prompt"])
    max_name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, max_name, 1)
    if max_tokens is None and not chat:
        max_tokens = 16  # the API's default for completions
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest(f"stop={stop!r:.80} must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise BadRequest(f"stop must hold at most {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest(f"stream={stream!r} must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise BadRequest("stream_options may hold only include_usage", "stream_options")
    if options is not None and not stream:
        raise BadRequest("stream_options goes with stream: true", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    top_k = _integer(body, "top_k", -1)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest("user must be a string", "user")
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k or 0, 0),
        n=_integer(body, "n", 1, MAX_N) or 1,
        stop=stops,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
    )
    return Parsed(chat=chat, model=model, prompts=prompts, sampling=sampling)


# --- text out --------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Text for JSON: bytes that are not valid UTF-8 (lone surrogates) as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _incomplete(text: str) -> int:
    """How many trailing characters may still change as more tokens arrive (a partial UTF-8
    sequence decodes to lone surrogates or U+FFFD)."""
    n = 0
    while n < len(text) and (text[-1 - n] == "\ufffd" or "\udc80" <= text[-1 - n] <= "\udcff"):
        n += 1
    return min(n, 4) if n < len(text) else n


class TextStream:
    """One choice's text as its tokens arrive: what may be sent now, and stop strings.

    The text is printable (bytes that are not UTF-8 as U+FFFD), and stop strings are looked
    for in it. Stop ids end a choice and are not part of its text; a stop string ends it too,
    and neither it nor anything after it is part of the text. Text that could still become a
    stop string, or that ends inside a UTF-8 character, is held back until it cannot.
    """

    def __init__(
        self, decode: Callable[[Sequence[int]], str], stop: Sequence[str], stop_ids: Sequence[int]
    ) -> None:
        self.decode, self.stop, self.stop_ids = decode, tuple(stop), set(stop_ids)
        self.ids: list[int] = []
        self.tokens = 0  # tokens consumed (a stop token counts)
        self.sent = 0  # characters of the text already sent
        self.text = ""
        self.stopped = False  # a stop string was found

    def add(self, token: int) -> str:
        """Take one token; the text that can be sent now ("" when none)."""
        self.tokens += 1
        if token in self.stop_ids:
            return ""
        self.ids.append(token)
        self.text = printable(self.decode(self.ids))
        if self.stop:
            hits = [
                i
                for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop)
                if i >= 0
            ]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                return self.flush()
        hold = _incomplete(self.text)
        for s in self.stop:  # a suffix that may grow into a stop string
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        ready = len(self.text) - hold
        if ready <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : ready], ready
        return out

    def flush(self) -> str:
        """All the text not sent yet (at the end of the choice)."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


# --- responses -------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(
    request_id: str, parsed: Parsed, choices: list[tuple[str, str]], use: dict[str, int]
) -> dict[str, Any]:
    """A whole (non-streamed) response; `choices` are (text, finish_reason) in index order."""
    if parsed.chat:
        items = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": why,
            }
            for i, (text, why) in enumerate(choices)
        ]
    else:
        items = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": why}
            for i, (text, why) in enumerate(choices)
        ]
    return {
        "id": request_id,
        "object": "chat.completion" if parsed.chat else "text_completion",
        "created": int(time.time()),
        "model": parsed.model,
        "choices": items,
        "usage": use,
    }


def chunk(
    request_id: str,
    parsed: Parsed,
    index: int,
    text: str | None,
    finish: str | None = None,
    role: bool = False,
) -> dict[str, Any]:
    """One stream event for choice `index`: new text, or (with `finish`) its end."""
    if parsed.chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta}
    else:
        choice = {"index": index, "text": text or ""}
    choice.update(logprobs=None, finish_reason=finish)
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if parsed.chat else "text_completion",
        "created": int(time.time()),
        "model": parsed.model,
        "choices": [choice],
    }


def usage_chunk(request_id: str, parsed: Parsed, use: dict[str, int]) -> dict[str, Any]:
    """The last stream event with `stream_options.include_usage`: no choices, the usage."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if parsed.chat else "text_completion",
        "created": int(time.time()),
        "model": parsed.model,
        "choices": [],
        "usage": use,
    }
