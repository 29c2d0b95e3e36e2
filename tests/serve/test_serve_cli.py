"""`tformer serve` as people start it: the options' checks, and a real uvicorn process on 127.0.0.1 that
answers, and on SIGTERM finishes the stream in flight before it exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tformer.cli import main
from tformer.tasks import TextGenerator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "option, message",
    [
        (["--max-batch", "0"], "--max-batch 0: expected 1 to 1024"),
        (["--max-wait-ms", "-1"], "--max-wait-ms -1.0: expected 0 to 10000"),
        (["--timeout", "0"], "--timeout 0.0: expected seconds"),
        (["--max-body-bytes", "10"], "--max-body-bytes 10: expected 1024"),
        (["--port", "70000"], "--port 70000: expected 0 to 65535"),
    ],
)
def test_bad_options_are_one_line_errors(checkpoint, capsys, option, message):
    assert main(["serve", str(checkpoint("lm")), *option]) == 2
    assert message in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_drains_the_stream_in_flight_then_exits(checkpoint):
    path = checkpoint("lm")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "tformer", "serve", str(path), "--port", str(port), "--max-batch", "2"]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120  # the limit only keeps a broken server from hanging the suite
        while True:
            assert server.poll() is None, server.communicate()[0]
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "tformer serve not ready"
            time.sleep(0.05)
        body = {"prompt": "to be", "max_new_tokens": 400, "greedy": True, "stream": True}  # ~0.5 s of tokens
        with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            server.send_signal(signal.SIGTERM)  # mid-stream: the server drains it, then goes
            rest = list(lines)
        # uvicorn drains, then re-raises the signal it caught: the process ends as killed by SIGTERM
        assert server.wait(60) == -signal.SIGTERM
        log = server.communicate()[0]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert "Waiting for connections to close" in log or "Waiting for background tasks" in log, log
    assert "Finished server process" in log, log
    texts = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: {")]
    assert [line for line in rest if line][-1] == "data: [DONE]"
    whole = TextGenerator.load(path, accel=True).generate("to be", max_new_tokens=400, greedy=True)
    assert "".join(t["text"] for t in texts) == whole
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health")


def test_the_command_line_loads_neither_starlette_nor_torch_until_serve_runs():
    code = "import tformer.cli, sys; print('starlette' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
