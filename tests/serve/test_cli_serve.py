"""`jaxlm serve` as a user runs it: a workdir served on a free port; SIGTERM lets the request in
flight finish, then the process exits 0."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from jaxlm.data import ByteTokenizer
from jaxlm.interop.workdir import write_workdir
from tests.serve.conftest import CFG


@pytest.fixture(scope="module")
def workdir(params, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny-run"
    return write_workdir(out, CFG, lambda mesh, rules: params, tokenizer=ByteTokenizer())


def test_sigterm_finishes_the_request_in_flight_then_exits_0(workdir, stdlib_cache):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxlm", "serve", "--workdir", str(workdir), "--port", "0",
           "--slots", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "at http" not in line:
            line = proc.stderr.readline()
            assert line, f"the server exited: {proc.wait()}"
        url = re.search(r"at (http://\S+/v1)", line).group(1)
        assert "model 'tiny-run'" in line
        with urllib.request.urlopen(url.replace("/v1", "/health"), timeout=30) as r:
            assert json.load(r)["status"] == "ok"
        body = {"model": "tiny-run", "prompt": [5, 6, 7], "max_tokens": 100, "stream": True,
                "temperature": 0}  # fmt: skip
        request = urllib.request.Request(
            url + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            first = r.readline()
            assert first.startswith(b"data: {")
            proc.send_signal(signal.SIGTERM)  # mid-request
            rest = r.read().decode().split("\n\n")
        events = [e[len("data: ") :] for e in [first.decode().strip(), *rest] if e.strip()]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_bad_serve_arguments_exit_2_before_loading(tmp_path, capsys):
    from jaxlm import cli

    assert cli.main(["serve", "--workdir", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000 must be in [0, 65535]" in capsys.readouterr().err
    assert cli.main(["serve", "--workdir", str(tmp_path), "--slots", "0"]) == 2
    assert "--slots 0 must be in [1, 4096]" in capsys.readouterr().err
    assert cli.main(["serve", "--workdir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
