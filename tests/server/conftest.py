"""One real server for the server tests: uvicorn in a thread on a loopback socket, the embedded model on CPU,
an API key, a running batch of 32 and a KV pool sized so every request fits."""
from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("fastapi")

from quantkit.config import EngineConfig
from quantkit.engine.async_engine import AsyncLLMEngine
from quantkit.engine.llm_engine import LLMEngine
from quantkit.server.app import make_server

API_KEY = "test-key"
MODEL = "smollm2-135m"


def loopback_socket() -> socket.socket:
    """A bound loopback socket on a free port, handed to uvicorn (no race for the port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def metric(text: str, name: str) -> float:
    """The value of an unlabelled-by-us Prometheus sample (labels ignored; first match)."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="session")
def server():
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(MODEL, device="cpu", max_model_len=512, num_kv_blocks=256,
                                                   max_num_seqs=32)), max_queue=512)
    sock = loopback_socket()
    srv = make_server(engine, MODEL, api_key=API_KEY, shutdown_timeout=2, log_level="warning")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    host, port = sock.getsockname()
    url = f"http://{host}:{port}"
    yield SimpleNamespace(url=url, key=API_KEY, engine=engine,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        yield client


@pytest.fixture
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=60)
