"""The OpenAI-compatible server, through the real `openai` client and plain HTTP: responses
against `generate` on the same ids, streaming, stop strings, n and seeds, usage, 400s naming the
bad field, a client that disconnects, and 64 concurrent clients."""

import http.client
import json
import socket
import threading
import time

import openai
import pytest

from jaxlm import sample
from jaxlm.data import ByteTokenizer
from jaxlm.data.chat import get_template, stop_ids
from jaxlm.serve.engine import Engine
from jaxlm.serve.http import Server
from jaxlm.tasks.sft import chat_prompt
from tests.serve.conftest import CFG

TOK = ByteTokenizer()
TEMPLATE = get_template("plain", TOK)
EOS = [TOK.eos_id]


@pytest.fixture(scope="module")
def server(params):
    engine = Engine(CFG, params, slots=4).start()
    srv = Server(
        engine,
        TOK,
        "tiny",
        template=TEMPLATE,
        stop_ids=EOS,
        chat_stop_ids=stop_ids(TEMPLATE, TOK),
        bos_id=TOK.bos_id,
        port=0,
    ).start()
    yield srv
    srv.shutdown(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def _expected(params, ids, max_tokens, stop=EOS, seed=0, temperature=0.0):
    """(text, finish_reason, completion tokens) of `generate` on these ids alone."""
    chain = sample.strategies(temperature)
    out = sample.generate(CFG, params, [ids], max_tokens, key=seed, chain=chain, stop_tokens=stop)
    out = out[0]
    stopped = out[-1] in stop
    text = TOK.decode([t for t in out if t not in stop], errors="replace")
    return text, "stop" if stopped else "length", len(out)


def test_completions_equal_generate_and_count_tokens(client, params):
    prompt = "def add(a, b):"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    ids = [TOK.bos_id, *TOK.encode(prompt)]
    text, why, n = _expected(params, ids, 20)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, why)
    assert r.object == "text_completion" and r.model == "tiny"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    assert r.usage.total_tokens == len(ids) + n
    # Streamed: the same text in pieces, the finish reason last, then the usage.
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == why
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_token_id_prompts_and_batches_of_prompts(client, params):
    prompts = [[1, 40, 41], [1, 50]]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [_expected(params, p, 6)[0] for p in prompts]
    assert r.usage.prompt_tokens == 5


def test_chat_uses_the_template_and_streams_the_same_reply(client, params):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = chat_prompt(messages, TOK, TEMPLATE)
    text, why, n = _expected(params, ids, 12, stop=stop_ids(TEMPLATE, TOK))
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, why)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == why


def test_n_choices_with_a_seed_are_generate_with_seed_plus_index(client, params):
    ids = [TOK.bos_id, *TOK.encode("x = ")]
    kwargs = dict(model="tiny", prompt="x = ", max_tokens=8, temperature=0.8, seed=11)
    r = client.completions.create(n=3, **kwargs)
    want = [_expected(params, ids, 8, seed=11 + j, temperature=0.8)[0] for j in range(3)]
    assert [c.text for c in r.choices] == want
    assert len(set(want)) == 3  # the choices really differ
    again = client.completions.create(n=1, **kwargs)
    assert again.choices[0].text == want[0]


def test_a_stop_string_ends_the_text_before_it(client, params):
    ids = [TOK.bos_id, *TOK.encode("abc")]
    full, _, _ = _expected(params, ids, 24)
    stop = full[5:8]  # a string the greedy text is known to contain
    cut = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(
            model="tiny", prompt="abc", max_tokens=24, temperature=0, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            why = chunks[-1].choices[0].finish_reason
        else:
            text, why = r.choices[0].text, r.choices[0].finish_reason
        assert (text, why) == (cut, "stop")


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/health")
    health = conn.getresponse()
    assert health.status == 200
    assert json.loads(health.read()) == {"status": "ok", "running": 0, "waiting": 0, "slots": 4}


def _post(port, path, body, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"model": "gpt-4", "prompt": "x"}, "model", "does not exist"),
        ({"prompt": "x"}, "model", "required"),
        ({"model": "tiny"}, "prompt", "required"),
        ({"model": "tiny", "prompt": []}, "prompt", "must be a string"),
        ({"model": "tiny", "prompt": [[1], []]}, "prompt", "none empty"),
        ({"model": "tiny", "prompt": [1, 999]}, "prompt", "outside the vocabulary"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 2.5}, "max_tokens", "integer"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 127}, "max_tokens", "at most 126"),
        ({"model": "tiny", "prompt": "y" * 130}, "prompt", "context is 128"),
        ({"model": "tiny", "prompt": "x", "temperature": -0.1}, "temperature", ">= 0"),
        ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature", "number"),
        ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
        ({"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p", "(0, 1]"),
        ({"model": "tiny", "prompt": "x", "n": 0}, "n", "[1, 128]"),
        ({"model": "tiny", "prompt": "x", "stop": ["a"] * 5}, "stop", "at most 4"),
        ({"model": "tiny", "prompt": "x", "stop": 3}, "stop", "string"),
        ({"model": "tiny", "prompt": "x", "stream": "yes"}, "stream", "true or false"),
        ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of", "not supported"),
        ({"model": "tiny", "prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
        ({"model": "tiny", "prompt": "x", "frobnicate": 1}, "frobnicate", "Unrecognized"),
        ({"model": "tiny", "messages": []}, "messages", "Unrecognized"),
    ],
)
def test_bad_completion_requests_get_a_400_naming_the_field(server, body, param, words):
    status, reply = _post(server.port, "/v1/completions", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and words in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"model": "tiny", "messages": "hi"}, "messages", "non-empty list"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
         "must be system"),
        ({"model": "tiny", "messages": [{"role": "user"}]}, "messages[0]", "string"),
        ({"model": "tiny", "prompt": "x", "messages": []}, "prompt", "Unrecognized"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
         "tools", "not supported"),
    ],
)  # fmt: skip
def test_bad_chat_requests_get_a_400_naming_the_field(server, body, param, words):
    status, reply = _post(server.port, "/v1/chat/completions", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and words in reply["error"]["message"]


def test_malformed_bodies_never_hurt_the_server(server, client):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"', b""):
        status, reply = _post(server.port, "/v1/completions", None, raw=raw)
        assert status == 400 and "error" in reply, raw
    status, _ = _post(server.port, "/v1/nowhere", {})
    assert status == 404
    # Still serving.
    r = client.completions.create(model="tiny", prompt="ok", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_a_client_that_disconnects_frees_its_row(server, monkeypatch):
    # Handlers look for a gone client every POLL_S (50 ms); this tiny model decodes its 120
    # tokens in about that long on a fast machine, so look far more often here.
    monkeypatch.setattr("jaxlm.serve.http.POLL_S", 0.002)
    for stream in (True, False):
        request = {"model": "tiny", "prompt": "z", "max_tokens": 120, "temperature": 0}
        body = json.dumps({**request, "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        steps = server.engine.steps
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 60
        while server.engine.load["running"] == 0:  # it started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()
        while server.engine.load["running"]:
            assert time.monotonic() < deadline, "the row was never freed"
            time.sleep(0.01)
        assert server.engine.steps - steps < 100  # freed long before its 120 tokens


def test_64_concurrent_clients_each_get_their_own_answer(client, params):
    """Mixed prompt lengths, budgets, greedy and seeded sampling, streaming and not, through 4
    rows: every request answered with what it gets alone, none lost or mixed up."""
    cases = []
    for i in range(64):
        prompt = f"{i}: " + "ab" * (i % 9)
        cases.append((prompt, 1 + (i * 7) % 16, (0.0, 0.9)[i % 2], i % 3 == 0))
    results = [None] * len(cases)

    def run(i):
        prompt, max_tokens, temperature, stream = cases[i]
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=max_tokens,
                      temperature=temperature, seed=i)  # fmt: skip
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            results[i] = "".join(c.choices[0].text for c in chunks)
        else:
            results[i] = client.completions.create(**kwargs).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, (prompt, max_tokens, temperature, _) in enumerate(cases):
        ids = [TOK.bos_id, *TOK.encode(prompt)]
        want = _expected(params, ids, max_tokens, seed=i, temperature=temperature)[0]
        assert results[i] == want, i
