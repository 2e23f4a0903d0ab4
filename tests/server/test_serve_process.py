"""`quantkit serve` as a real process: binds 127.0.0.1 by default and logs what it serves, answers 503 with
Retry-After when the queue is full, and on SIGTERM ends the open streams (final chunk + [DONE]) and exits 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL, loopback_socket


@pytest.fixture
def process(tmp_path):
    sock = loopback_socket()
    port = sock.getsockname()[1]
    sock.close()  # the server binds it again; nothing else on this machine races for a fresh ephemeral port
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "quantkit.cli", "serve", MODEL, "--device", "cpu", "--port", str(port),
           "--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "1", "--max-queue", "1",
           "--shutdown-timeout", "2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"quantkit serve did not start:\n{log.read_text()}")
        time.sleep(0.2)
    yield proc, url, port, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) of TCP sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


def _read_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line]


def test_default_bind_queue_full_and_graceful_sigterm(process):
    proc, url, port, log = process
    assert _listeners(port) == ["0100007F"]  # 127.0.0.1 only, no 0.0.0.0 or ::
    text = log.read_text()
    assert f"http://127.0.0.1:{port}/v1" in text and "kernels: attention=torch" in text and "64 blocks" in text

    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as client:
        # max_num_seqs=1 + max_queue=1: one running, one waiting, the third is refused
        streams = [client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
                   for _ in range(2)]
        assert [r.status_code for r in streams] == [200, 200]
        full = client.post("/v1/completions", json={**body, "stream": False})
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        assert full.json()["error"]["code"] == "queue_full"

        proc.send_signal(signal.SIGTERM)
        for r in streams:
            events = _read_events(r)
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])["choices"][0]
            assert last["finish_reason"] == "abort"  # 200 tokens cannot finish inside the 2 s grace period
            r.close()
    assert proc.wait(timeout=60) == 0
    assert "aborting 2 request(s)" in log.read_text()
