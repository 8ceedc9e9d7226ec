"""The embedding store's connection and its secrets (issue 31, items 1, 2 and 5), against real
``redis-server`` processes the tests start with TLS, a password or a unix socket (and stop by pid):
every Redis URL form reaches the server the way it asks for, the password never appears in an
answer or a log line, and poisoned vectors are served as missing ids."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from mtrank import store_keys
from mtrank.bench.server import RemoteServer, free_port
from mtrank.export.store_loader import load_embeddings
from mtrank.manifest import load_manifest
from mtrank.service import metrics
from mtrank.service.settings import ConfigError, load_settings
from mtrank.service.stores import LocalTable, open_store
from tests.cluster import redis_binaries, wait_for
from tests.conftest import _need
from tests.server import TOY_ITEMS, build_toy_version, rank_body

pytestmark = pytest.mark.redis
PASSWORD = "Sup3r-S3cret-pw"
PREFIX = "mtrank-security"


def _make_certificates(root: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        _need("openssl not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=root, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=mtrank-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (root / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")
    return root / "ca.crt"


class SecuredRedis:
    """A ``redis-server`` with a password, listening on a TLS port or a unix socket only (its
    plain TCP port disabled with ``--port 0``); stopped by its pid."""

    def __init__(self, root: Path, tls: bool):
        self.root = root
        self.tls = tls
        self.port = free_port() if tls else 0
        self.socket = root / "redis.sock"
        self.ca = _make_certificates(root) if tls else None
        server, _ = redis_binaries()
        args = [server, "--port", "0", "--bind", "127.0.0.1", "--dir", str(root), "--save", "", "--appendonly", "no",
                "--requirepass", PASSWORD, "--logfile", str(root / "redis.log")]
        if tls:
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(root / "server.crt"),
                     "--tls-key-file", str(root / "server.key"), "--tls-ca-cert-file", str(self.ca),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.admin().ping(), what="secured redis-server")

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"
        return f"unix://:{PASSWORD}@{self.socket}?db=0"

    def admin(self) -> redis.Redis:
        if self.tls:
            return redis.Redis(port=self.port, password=PASSWORD, ssl=True, ssl_ca_certs=str(self.ca),
                               socket_connect_timeout=1)
        return redis.Redis(unix_socket_path=str(self.socket), password=PASSWORD, socket_connect_timeout=1)

    def clients(self) -> list[dict]:
        admin = self.admin()
        try:
            return admin.client_list()
        finally:
            admin.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def short_dir():
    """A short temporary directory (a unix socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mtrank-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def toy_repo(tmp_path):
    repo = tmp_path / "repo"
    build_toy_version(repo, "toy", 1)
    return repo


@pytest.mark.parametrize("tls", [True, False], ids=["rediss-tls-port-only", "unix-socket"])
def test_the_service_reaches_a_password_protected_redis_over_tls_or_a_unix_socket(short_dir, toy_repo, tls):
    node = SecuredRedis(short_dir, tls=tls)
    try:
        load_embeddings(toy_repo, "toy", node.url, prefix=PREFIX, progress=False)
        env = {"MTRANK_STORE_URL": node.url, "MTRANK_STORE_PREFIX": PREFIX}
        with RemoteServer(toy_repo, env=env) as s:
            answer = s.post("/v1/rank", json=rank_body(n=20)).json()
            ready = s.get("/readyz").json()
            clients = node.clients()
    finally:
        node.stop()
    assert answer["degraded"] is False and len(answer["items"]) == 20
    assert ready == {"ready": True}
    # The plain port is off: every client (the service's and ours) came in through TLS or the socket.
    assert len(clients) >= 2
    if tls:
        assert {c["laddr"] for c in clients} == {f"127.0.0.1:{node.port}"}
    else:
        assert {c["laddr"] for c in clients} == {f"{node.socket}:0"}


def test_a_rediss_url_with_certificate_options_serves_vectors_from_the_store(short_dir, toy_repo):
    """``?ssl_ca_certs=`` used to raise TypeError in every lookup (a plain connection class)."""
    node = SecuredRedis(short_dir, tls=True)
    vdir = toy_repo / "toy" / "1"
    tables = {f: LocalTable("toy", 1, info, vdir) for f, info in load_manifest(vdir).tables.items()}
    settings = load_settings(store_url=node.url, store_prefix=PREFIX, store_timeout_ms=2000)

    async def main():
        store = open_store(settings)
        try:
            problem = await store.version_problem(list(tables.values()))
            (result,), degraded = await store.lookup_many([(tables["item_id"], TOY_ITEMS[:10])])
            return problem, result, degraded
        finally:
            await store.close()

    try:
        load_embeddings(toy_repo, "toy", node.url, prefix=PREFIX, progress=False)
        problem, result, degraded = asyncio.run(main())
    finally:
        node.stop()
    assert problem is None and not degraded and result.defaults == 0
    item = tables["item_id"]
    np.testing.assert_array_equal(result.vectors, item.vectors[[item.index[i] for i in TOY_ITEMS[:10]]])


def _wait_alive(s: RemoteServer, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if s.get("/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            if time.monotonic() > deadline or s.proc.poll() is not None:
                raise
        time.sleep(0.1)


def test_no_answer_and_no_log_line_shows_the_store_password(toy_repo):
    """A password-bearing URL to a Redis that is not there: /readyz, /v1/models, the 503 of
    /v1/rank and the logs say where the store is, without the password."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    env = {"MTRANK_STORE_URL": url, "MTRANK_STORE_RETRY_S": "0.2", "MTRANK_LOG_LEVEL": "info"}
    s = RemoteServer(toy_repo, env=env, wait_ready=False)
    try:
        _wait_alive(s)
        bodies = [s.get("/readyz"), s.get("/v1/models"), s.post("/v1/rank", json=rank_body(n=5))]
        time.sleep(0.5)  # a probe or two more, logged
    finally:
        s.stop()
    log = s.output()
    assert [r.status_code for r in bodies] == [503, 200, 503]
    texts = [r.text for r in bodies] + [log]
    assert [PASSWORD in t for t in texts] == [False] * 4, texts
    # Still useful: the reason names the store, password hidden.
    assert store_keys.redacted_url(url) in bodies[0].text and ":***@" in log


def test_a_bad_store_url_is_reported_without_its_password(monkeypatch):
    monkeypatch.setenv("MTRANK_STORE_URL", f"http://:{PASSWORD}@example.org/0")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value).startswith("MTRANK_STORE_URL:") and PASSWORD not in str(e.value)
    assert "http://:***@example.org/0" in str(e.value)


def test_store_urls_are_redacted_wherever_the_password_is():
    assert store_keys.redacted_url("rediss://u:p%40ss@h:6380/0?ssl_ca_certs=/c.crt") == (
        "rediss://u:***@h:6380/0?ssl_ca_certs=/c.crt")
    assert store_keys.redacted_url("redis://h:1/0?password=zz&db=2") == "redis://h:1/0?password=***&db=2"
    assert store_keys.redacted_url("redis+cluster://:x@h:1") == "redis+cluster://:***@h:1"
    assert store_keys.url_secrets("unix://:pw@/tmp/r.sock?db=0") == ["pw"]


def _invalid_total(field: str) -> float:
    return metrics.INVALID_VECTORS.labels(field)._value.get()


def test_vectors_with_nan_or_infinities_are_served_as_missing_ids(tmp_path, redis_url, redis_prefix):
    repo = tmp_path / "repo"
    vdir = build_toy_version(repo, "toy", 1)
    tables = {f: LocalTable("toy", 1, info, vdir) for f, info in load_manifest(vdir).tables.items()}
    item = tables["item_id"]
    load_embeddings(repo, "toy", redis_url, prefix=redis_prefix, progress=False)
    poisoned = {"v1": np.nan, "v2": np.inf, "v3": -np.inf}
    client = redis.Redis.from_url(redis_url)
    for item_id, bad in poisoned.items():
        row = item.vectors[item.index[item_id]].copy()
        row[1] = bad
        client.set(store_keys.id_key_prefix(redis_prefix, "toy", 1, "item_id") + item_id, row.astype("<f4").tobytes())
    client.close()
    ids = ["v0", "v1", "v2", "v3", "v1", "v4"]
    settings = load_settings(store_url=redis_url, store_prefix=redis_prefix, store_timeout_ms=1000)

    async def main():
        store = open_store(settings)
        try:
            assert await store.version_problem(list(tables.values())) is None
            return await store.lookup_many([(item, ids)])
        finally:
            await store.close()

    before = _invalid_total("item_id")
    (result,), _ = asyncio.run(main())
    assert np.isfinite(result.vectors).all()
    for j, item_id in enumerate(ids):
        expected = item.default if item_id in poisoned else item.vectors[item.index[item_id]]
        np.testing.assert_array_equal(result.vectors[j], expected)
    assert result.missing == 4 and _invalid_total("item_id") - before == 4
