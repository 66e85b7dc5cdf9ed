"""Two real server processes sharing one Redis prefix and one PostgreSQL database: a key's
requests-per-minute limit holds across both (the combined admitted count equals the limit)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.server.conftest import MODEL, database_url

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT = 5
LAUNCH = (
    "import sys, uvicorn\n"
    "from talkloop.server import Settings, create_app\n"
    "uvicorn.run(create_app(Settings()), host='127.0.0.1', port=int(sys.argv[1]),"
    " log_level='warning')\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(process: subprocess.Popen[bytes], base_url: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base_url} not ready after {timeout_s}s")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"talkloop-test:{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def two_servers(
    request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str
) -> Iterator[tuple[list[str], str]]:
    """Base URLs of two server processes, and their shared admin key."""
    admin_key = "tl-" + secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "TALKLOOP_DATABASE_URL": database_url("postgresql", tmp_path, request),
        "TALKLOOP_REDIS_URL": REDIS_URL,
        "TALKLOOP_REDIS_PREFIX": redis_prefix,
        "TALKLOOP_ADMIN_KEY": admin_key,
        "TALKLOOP_DATA_DIR": str(tmp_path),
        "TALKLOOP_SERVED_MODEL_NAME": MODEL,
        "TALKLOOP_NUM_THREADS": "1",
    }
    processes: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for _ in range(2):  # one after the other: the first migrates and bootstraps
            port = free_port()
            process = subprocess.Popen([sys.executable, "-c", LAUNCH, str(port)], env=env)
            processes.append(process)
            urls.append(f"http://127.0.0.1:{port}")
            wait_ready(process, urls[-1])
        yield urls, admin_key
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


def test_two_replicas_admit_exactly_the_shared_limit(two_servers: tuple[list[str], str]) -> None:
    urls, admin_key = two_servers
    admin = {"Authorization": f"Bearer {admin_key}"}
    tenant = httpx.post(f"{urls[0]}/admin/tenants", json={"name": "shared"}, headers=admin)
    tenant_id = tenant.json()["id"]
    key = httpx.post(f"{urls[0]}/admin/tenants/{tenant_id}/keys", json={}, headers=admin)
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    limits = {"tenant_id": tenant_id, "requests_per_minute": LIMIT}
    assert httpx.put(f"{urls[1]}/api/admin/rate-limits", json=limits, headers=admin).is_success
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}

    def call(index: int) -> int:
        url = f"{urls[index % 2]}/v1/chat/completions"
        return httpx.post(url, json=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(call, range(16)))
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == 16 - LIMIT
    assert {statuses[i] for i in range(0, 16, 2)} >= {429}  # both replicas refused some
    assert {statuses[i] for i in range(1, 16, 2)} >= {429}
