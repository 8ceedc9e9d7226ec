"""Deploy defaults an operator can run as they are: Redis in Kubernetes requires a password from a
Secret and admits only the ranker and the load Job; no store URL sits in a ConfigMap or in
arguments; compose publishes on 127.0.0.1 only and has no built-in Grafana password; the release
steps deploy images by digest."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from mtrank.bench.server import free_port
from tests.test_deploy import (
    COMPOSE,
    DEPLOY_README,
    K8S,
    REDIS_SECRET_ENV,
    TEST_REDIS_PASSWORD,
    _configmap,
    _k8s,
    _kubernetes_validate,
    _load_yaml,
    _parse_cli,
    _ranker,
    _redis_container,
    _render,
    _render_tree,
    _run,
    _start_k8s_redis,
    _tool,
)

SECRET = "mtrank-redis"


def _pod_templates(docs: list[dict]) -> dict[str, dict[str, str]]:
    """``kind/name`` → pod labels of every workload in ``docs``."""
    return {f"{d['kind']}/{d['metadata'].get('name') or d['metadata']['generateName']}":
            d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")}


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return selector["matchLabels"].items() <= labels.items()


def _secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    """Variable → (Secret, key) of the container's variables read from Secrets."""
    return {e["name"]: (ref["name"], ref["key"]) for e in container.get("env", [])
            if (ref := e.get("valueFrom", {}).get("secretKeyRef"))}


@pytest.mark.parametrize("overlay", ["", "gpu"])
def test_the_render_holds_the_redis_secret_and_every_reference_to_it_resolves(overlay):
    docs = _render(overlay)
    [secret] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == SECRET]
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert values == {"password": TEST_REDIS_PASSWORD,
                      "url": f"redis://:{TEST_REDIS_PASSWORD}@mtrank-redis:6379/0"}
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    [ranker] = [c for c in by_name["mtrank"]["spec"]["template"]["spec"]["containers"] if c["name"] == "ranker"]
    [store] = by_name["mtrank-redis"]["spec"]["template"]["spec"]["containers"]
    assert _secret_refs(ranker)["MTRANK_STORE_URL"] == (SECRET, "url")
    assert _secret_refs(store) == {"REDIS_PASSWORD": (SECRET, "password")}
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["name"] == "mtrank-redis"


def test_without_its_secret_file_the_render_fails_instead_of_using_a_default_password():
    result = _render_tree("", None)
    assert result.returncode != 0 and REDIS_SECRET_ENV in result.stderr, result.stderr
    assert not (K8S / "base" / REDIS_SECRET_ENV).exists() or os.environ.get("CI") != "true", \
        "a redis-secret.env in the checkout would hide this (it is in .gitignore)"


def test_only_the_ranker_and_the_load_job_may_reach_redis():
    docs = _render("")
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    [job] = _k8s("Job")
    pods = _pod_templates([*docs, job])
    protected = {name for name, labels in pods.items() if _selects(policy["spec"]["podSelector"], labels)}
    assert protected == {"Deployment/mtrank-redis"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"]), "no namespace or address ranges"
    admitted = {name for name, labels in pods.items() if any(_selects(p["podSelector"], labels) for p in rule["from"])}
    assert admitted == {"Deployment/mtrank", f"Job/{job['metadata']['generateName']}"}
    redis_ports = {p["name"]: p["containerPort"] for p in _redis_container()["ports"]}
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}] and "redis" in redis_ports


def test_the_store_url_is_in_no_configmap_and_in_no_argument():
    assert not {"MTRANK_STORE_URL", "MTRANK_REDIS_URL"} & set(_configmap())
    [job] = _k8s("Job")
    [loader] = job["spec"]["template"]["spec"]["containers"]
    assert _secret_refs(loader) == {"MTRANK_STORE_URL": (SECRET, "url")}
    assert not [a for a in loader["args"] if "redis" in a or "STORE" in a or a in ("--store", "--redis")]
    _parse_cli(loader["args"])  # load-embeddings takes its URL from MTRANK_STORE_URL
    _, ranker = _ranker()
    assert _secret_refs(ranker)["MTRANK_STORE_URL"] == (SECRET, "url")
    assert not [a for a in ranker["args"] if "redis" in a]


def test_load_embeddings_reads_the_store_url_from_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    command = [sys.executable, "-m", "mtrank.cli", "load-embeddings", "--repo", str(tmp_path), "--model", "ple"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no store URL: pass --store or set MTRANK_STORE_URL" in result.stderr
    unreachable = "redis://:secret-password@127.0.0.1:1/0"
    result = subprocess.run(command, env={**env, "MTRANK_STORE_URL": unreachable}, capture_output=True, text=True,
                            timeout=60)
    # It got past the URL: the repository holds no model "ple".
    assert result.returncode != 0 and "no store URL" not in result.stderr and "ple" in result.stderr, result.stderr


def test_k8s_redis_refuses_clients_without_its_password(tmp_path):
    proc, client = _start_k8s_redis(64, tmp_path)
    try:
        assert client.ping()
        anonymous = redis.Redis(port=client.connection_pool.connection_kwargs["port"], socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=client.connection_pool.connection_kwargs["port"], password="wrong").ping()
    finally:
        proc.kill()
        proc.wait()


def test_k8s_redis_does_not_start_with_an_empty_password(tmp_path):
    [script] = _redis_container()["args"]
    env = {**os.environ, "MEMORY_LIMIT_MIB": "64", "REDIS_PASSWORD": ""}
    result = subprocess.run(["/bin/sh", "-c", script.replace("exec redis-server", "exec false", 1)], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 1 and "REDIS_PASSWORD is empty" in result.stderr, result.stderr


def test_compose_publishes_every_port_on_loopback_only():
    published = {name: service["ports"] for name, service in _load_yaml(COMPOSE)["services"].items()
                 if "ports" in service}
    assert {"ranker", "prometheus", "grafana"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str) and port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)


def test_compose_grafana_needs_an_admin_password_from_the_environment():
    env = _load_yaml(COMPOSE)["services"]["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GF_ADMIN_PASSWORD:\?[^}]+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert "GF_SECURITY_ADMIN_USER" not in env and "GF_ADMIN_PASSWORD" in DEPLOY_README.read_text()


def test_the_release_steps_deploy_images_by_digest():
    text = DEPLOY_README.read_text()
    steps = text[text.index("### Kubernetes"):text.index("What the manifests set up:")]
    set_image = [line for line in steps.splitlines() if "kustomize edit set image" in line]
    assert set_image, "the release steps set the images"
    for line in set_image:
        images = re.findall(r"(\w[\w.-]*)=(\S+)", line.split("set image", 1)[1])
        assert {name for name, _ in images} == {"mtrank", "redis"}
        assert all(re.search(r"@(sha256:[0-9a-f]{64}|\$\w+)\)?$", ref) for _, ref in images), line
    job_image = [line for line in steps.splitlines() if "load-embeddings-job.yaml" in line and "image:" in line]
    assert job_image and all("@$" in line for line in job_image)


# -- components/redis-tls ---------------------------------------------------------------------

TLS_COMPONENT = K8S / "components" / "redis-tls"


def _tls_patch(name: str) -> dict:
    [patch] = [yaml.safe_load(p["patch"]) for p in _load_yaml(TLS_COMPONENT / "kustomization.yaml")["patches"]
               if p["target"]["name"] == name]
    [container] = patch["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overlay", ["", "gpu"])
def test_the_redis_tls_component_renders_into_valid_manifests(overlay, tmp_path):
    tree = Path(shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns(REDIS_SECRET_ENV)))
    (tree / "base" / REDIS_SECRET_ENV).write_text(
        "password=p\nurl=rediss://:p@mtrank-redis:6379/0?ssl_ca_certs=/etc/mtrank/redis-tls/ca.crt\n")
    kustomization = tree / overlay / "kustomization.yaml"
    component = "components/redis-tls" if not overlay else "../components/redis-tls"
    kustomization.write_text(kustomization.read_text() + f"\ncomponents:\n  - {component}\n")
    result = _run(_tool("kubectl"), "kustomize", str(tree / overlay))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    validated = _kubernetes_validate(docs, tmp_path)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    by_name = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}
    [store] = by_name["mtrank-redis"]["containers"]
    assert "--tls-port 6379" in {e["name"]: e.get("value") for e in store["env"]}["REDIS_TLS_ARGS"]
    assert {"name": "tls", "mountPath": "/etc/redis/tls", "readOnly": True} in store["volumeMounts"]
    [ranker] = [c for c in by_name["mtrank"]["containers"] if c["name"] == "ranker"]
    assert {"name": "redis-tls", "mountPath": "/etc/mtrank/redis-tls", "readOnly": True} in ranker["volumeMounts"]
    secrets = {v["secret"]["secretName"] for spec in by_name.values() for v in spec["volumes"] if "secret" in v}
    assert secrets == {"mtrank-redis-tls"}


def test_k8s_redis_with_the_tls_component_speaks_tls_only_and_its_probe_passes(tmp_path):
    from tests.test_store_security import _make_certificates

    ca = _make_certificates(tmp_path)
    shutil.copy(tmp_path / "server.crt", tmp_path / "tls.crt")
    shutil.copy(tmp_path / "server.key", tmp_path / "tls.key")
    port = free_port()
    container = _tls_patch("mtrank-redis")
    [tls_args] = [e["value"] for e in container["env"] if e["name"] == "REDIS_TLS_ARGS"]
    tls_args = tls_args.replace("/etc/redis/tls/", f"{tmp_path}/").replace("--tls-port 6379", f"--tls-port {port}")
    [script] = _redis_container()["args"]
    script = script.replace("exec redis-server", f"exec {_tool('redis-server')} --bind 127.0.0.1", 1)
    env = {**os.environ, "MEMORY_LIMIT_MIB": "64", "REDIS_PASSWORD": TEST_REDIS_PASSWORD, "REDIS_TLS_ARGS": tls_args}
    proc = subprocess.Popen(["/bin/sh", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        client = redis.Redis.from_url(f"rediss://:{TEST_REDIS_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}",
                                      socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "Redis did not come up on its TLS port"
                time.sleep(0.05)
        with pytest.raises(redis.ConnectionError):  # plain TCP on the TLS port
            redis.Redis(port=port, password=TEST_REDIS_PASSWORD, socket_timeout=2).ping()
        probe = [a.replace("/etc/redis/tls/", f"{tmp_path}/") for a in container["readinessProbe"]["exec"]["command"]]
        # The probe runs in the container with the variables of base/redis.yaml: REDISCLI_AUTH is the password.
        answer = subprocess.run([*probe[:-1], "-p", str(port), probe[-1]], capture_output=True, text=True, timeout=10,
                                env={**os.environ, "REDISCLI_AUTH": TEST_REDIS_PASSWORD})
        assert answer.stdout.strip() == "PONG", answer.stdout + answer.stderr
    finally:
        proc.kill()
        proc.wait()
