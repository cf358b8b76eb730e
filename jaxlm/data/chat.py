"""Chat data: conversation records, chat templates (built-in and sandboxed Jinja), token ids with
the mask of the tokens a model is trained to produce (assistant turns and their end-of-turn).

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` (roles system/user/assistant,
any number of turns) or `{"prompt": ..., "completion": ...}` (one user turn, one reply).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from jaxlm.configs.run import CHAT_TEMPLATES as TEMPLATE_NAMES
from jaxlm.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from jaxlm.files import parse_json

ROLES = ("system", "user", "assistant")


def conversation(
    record: Any, where: str = "record", need_reply: bool = True
) -> list[dict[str, str]]:
    """The messages of a record, checked: a clear error naming `where` and the bad value.
    `need_reply=False` accepts a chat without an assistant turn (a prompt to answer)."""
    if isinstance(record, str):
        record = parse_json(record, where)
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}")
    elif "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise ValueError(
                    f"{where}: {key!r} must be a string, got {type(record[key]).__name__}"
                )
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        raise ValueError(
            f"{where}: expected 'messages' or 'prompt' + 'completion', got keys {sorted(record)}"
        )
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{at} needs 'role' and 'content', got {m!r:.100}")
        if m["role"] not in ROLES:
            raise ValueError(f"{at}: unknown role {m['role']!r}; roles are {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{at}: 'content' must be a string, got {type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{at}: empty assistant turn")
        out.append({"role": m["role"], "content": m["content"]})
    if need_reply and not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant message (nothing to train on)")
    return out


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rendered text (or one token id), and whether the model is trained to produce it."""

    text: str | int
    train: bool = False


class Template:
    """A chat template: messages → pieces. `end_of_turn`: text that ends an assistant turn
    (its token is a stop token when it is one token)."""

    name = ""
    end_of_turn: str | None = None

    def render(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool
    ) -> list[Piece]:
        raise NotImplementedError


class _Builtin(Template):
    def __init__(
        self, name: str, start: str, header: str, end: str, prompt: str, eos_id: int | None = None
    ) -> None:
        self.name, self._start, self._header, self._end = name, start, header, end
        self._prompt, self._eos_id = prompt, eos_id
        self.end_of_turn = end.strip() or None

    def render(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool
    ) -> list[Piece]:
        pieces = [Piece(self._start)] if self._start else []
        for m in messages:
            train = m["role"] == "assistant"
            pieces.append(Piece(self._header.format(role=m["role"], Role=m["role"].capitalize())))
            end = self._end.rstrip() if train else self._end
            pieces.append(Piece(m["content"] + end, train))
            if train and self._eos_id is not None:
                pieces.append(Piece(self._eos_id, True))
            if train and self._end != end:
                pieces.append(Piece(self._end[len(end) :]))
        if add_generation_prompt:
            pieces.append(Piece(self._prompt))
        return [p for p in pieces if p.text != ""]


def builtin_template(name: str, tokenizer: Tokenizer) -> Template:
    """One of the built-in templates: "chatml", "llama3", "plain" (the byte tokenizer's: turns
    as "### Role:" blocks, the tokenizer's EOS id after each assistant turn) or "raw" (no
    markers: a prompt is its text as is and the reply follows it directly, then EOS; for base
    models and completion-style data)."""
    if name == "chatml":
        return _Builtin(name, "", "<|im_start|>{role}\n", "<|im_end|>\n", "<|im_start|>assistant\n")
    if name == "llama3":
        return _Builtin(
            name,
            "<|begin_of_text|>",
            "<|start_header_id|>{role}<|end_header_id|>\n\n",
            "<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        )
    if name == "raw":  # no markers: the turns' text back to back, EOS after the assistant's
        return _Builtin(name, "", "", "", "", tokenizer.eos_id)
    if name == "plain":
        return _Builtin(name, "", "### {Role}:\n", "\n\n", "### Assistant:\n", tokenizer.eos_id)
    raise ValueError(f"unknown chat template {name!r}; choose one of {TEMPLATE_NAMES}")


# Private-use characters mark where each message's content lands in a Jinja rendering.
_OPEN, _SEP, _CLOSE = "\ue000", "\ue001", "\ue002"


class JinjaTemplate(Template):
    """A Hugging Face `chat_template` (Jinja), rendered in a sandbox the way transformers does
    (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`)."""

    name = "tokenizer"

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def strftime_now(fmt: str) -> str:
            import datetime

            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, indent=indent, ensure_ascii=False
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        self._args = (source, special_tokens)
        # transformers' {% generation %} marks are for its own mask; jaxlm finds the spans itself.
        source = source.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        source = source.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the tokenizer's chat template does not parse: {e}") from None
        self._special = dict(special_tokens or {})
        # What the template writes after an assistant turn (found on a probe conversation).
        probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
        try:
            piece = next(p for p in self.render(probe, False) if p.train)
            self.end_of_turn = str(piece.text)[1:] or None
        except (ValueError, StopIteration):
            self.end_of_turn = None

    def __reduce__(self) -> tuple[Any, ...]:  # compiled Jinja does not pickle: rebuild it
        return (JinjaTemplate, self._args)

    def _text(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **self._special,
            )
        except Exception as e:  # a template's raise_exception, or any Jinja error
            raise ValueError(f"the chat template failed on this conversation: {e}") from None

    def _marked(self, messages: Sequence[dict[str, str]]) -> tuple[str, dict[int, tuple[int, int]]]:
        marked = [
            {**m, "content": f"{_OPEN}{i}{_SEP}{m['content']}{_CLOSE}"}
            for i, m in enumerate(messages)
        ]
        text = self._text(marked, False)
        clean, spans, i = [], {}, 0
        while i < len(text):
            if text[i] == _OPEN:
                j = text.index(_SEP, i)
                k = text.index(_CLOSE, j)
                start = sum(map(len, clean))
                clean.append(text[j + 1 : k])
                spans[int(text[i + 1 : j])] = (start, start + k - j - 1)
                i = k + 1
            else:
                clean.append(text[i])
                i += 1
        return "".join(clean), spans

    def render(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool
    ) -> list[Piece]:
        text, spans = self._marked(messages)
        if add_generation_prompt:
            full = self._text(messages, True)
            if not full.startswith(text):
                raise ValueError("the chat template's generation prompt changes earlier turns")
            text = full
        train = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i not in spans:
                raise ValueError(f"the chat template does not render assistant message {i}")
            # The turn's end-of-turn text (what the template writes after the content when the
            # conversation stops there), without trailing whitespace, is trained on too.
            head, head_spans = self._marked(messages[: i + 1])
            suffix = head[head_spans[i][1] :].rstrip()
            start, end = spans[i]
            if not text.startswith(suffix, end):
                raise ValueError(f"the chat template ends assistant message {i} inconsistently")
            train.append((start, end + len(suffix)))
        pieces, at = [], 0
        for start, end in train:
            pieces += [Piece(text[at:start]), Piece(text[start:end], True)]
            at = end
        pieces.append(Piece(text[at:]))
        return [p for p in pieces if p.text != ""]


def get_template(name: str, tokenizer: Tokenizer) -> Template:
    """`name` from `TEMPLATE_NAMES`: "tokenizer" = the tokenizer's own `chat_template`; "auto" =
    that when it has one, else "plain" for the byte tokenizer and "chatml" otherwise."""
    own = getattr(tokenizer, "chat_template", None)
    if name == "tokenizer" or (name == "auto" and own):
        if not own:
            raise ValueError(
                "task.chat_template='tokenizer' but the tokenizer has no chat_template"
            )
        return JinjaTemplate(own, getattr(tokenizer, "special_tokens", None))
    if name == "auto":
        name = "plain" if isinstance(tokenizer, ByteTokenizer) else "chatml"
    return builtin_template(name, tokenizer)


def _encode_with_offsets(
    tokenizer: Tokenizer, text: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (special tokens that the template wrote are parsed) and each token's
    [start, end) character span."""
    if isinstance(tokenizer, ByteTokenizer):
        ids, offsets = [], []
        for c, char in enumerate(text):
            for b in char.encode("utf-8", errors="surrogateescape"):
                ids.append(b + tokenizer.offset)
                offsets.append((c, c + 1))
        return ids, offsets
    if isinstance(tokenizer, HFTokenizer):
        enc = tokenizer.encode_template(text)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    raise TypeError  # handled piecewise by the caller


def encode_chat(
    messages: Sequence[dict[str, str]],
    tokenizer: Tokenizer,
    template: Template,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """(token ids, trained-on mask) of a rendered conversation.

    Text is tokenized as one string per run of text pieces (as transformers tokenizes a rendered
    chat); a token is trained on when its characters overlap an assistant piece.
    """
    pieces = template.render(messages, add_generation_prompt)
    ids: list[int] = []
    mask: list[bool] = []
    run: list[Piece] = []

    def flush() -> None:
        if not run:
            return
        text = "".join(str(p.text) for p in run)
        spans, at = [], 0
        for p in run:
            if p.train:
                spans.append((at, at + len(str(p.text))))
            at += len(str(p.text))
        try:
            run_ids, offsets = _encode_with_offsets(tokenizer, text)
        except TypeError:  # no offsets (SentencePiece): piece by piece
            for p in run:
                piece_ids = tokenizer.encode(str(p.text))
                ids.extend(piece_ids)
                mask.extend([p.train] * len(piece_ids))
            run.clear()
            return
        for i, (a, b) in zip(run_ids, offsets, strict=True):
            ids.append(i)
            mask.append(any(a < e and b > s for s, e in spans))
        run.clear()

    for p in pieces:
        if isinstance(p.text, int):
            flush()
            ids.append(p.text)
            mask.append(p.train)
        else:
            run.append(p)
    flush()
    return ids, mask


def stop_ids(template: Template, tokenizer: Tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token (when it is one
    token) and the tokenizer's EOS."""
    out = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    if template.end_of_turn:
        try:
            ids, _ = _encode_with_offsets(tokenizer, template.end_of_turn)
        except TypeError:
            ids = tokenizer.encode(template.end_of_turn)
        if len(ids) == 1 and ids[0] not in out:
            out.append(ids[0])
    return out
