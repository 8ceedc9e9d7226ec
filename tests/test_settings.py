"""Settings as the operator meets them: misspelt ``MTRANK_*`` variables are named at start-up with
the closest setting, and the README's configuration table lists every setting."""

from __future__ import annotations

import re
from pathlib import Path

from mtrank.bench.server import RemoteServer
from mtrank.service.settings import (
    DEPRECATED_VARIABLES,
    ENV_PREFIX,
    Settings,
    deprecated_variables,
    load_settings,
    unknown_variables,
)
from tests.server import ROOT, build_toy_version, rank_body


def _variables() -> list[str]:
    return [ENV_PREFIX + name.upper() for name in Settings.model_fields]


def test_a_misspelt_variable_is_named_with_the_closest_setting():
    assert unknown_variables({"MTRANK_MAX_BATCH_ROW": "64"}) == [
        "MTRANK_MAX_BATCH_ROW is not a setting and is ignored; did you mean MTRANK_MAX_BATCH_ROWS?"
    ]
    assert unknown_variables({"MTRANK_STORE_TIMEOUT": "50"}) == [
        "MTRANK_STORE_TIMEOUT is not a setting and is ignored; did you mean MTRANK_STORE_TIMEOUT_MS?"
    ]
    # A misspelt deprecated name: the guess is the new name.
    assert unknown_variables({"MTRANK_REDIS_TIMEOUT": "50"}) == [
        "MTRANK_REDIS_TIMEOUT is not a setting and is ignored; did you mean MTRANK_STORE_TIMEOUT_MS?"
    ]


def test_a_variable_close_to_no_setting_gets_no_guess():
    [message] = unknown_variables({"MTRANK_XYZZY": "1"})
    assert message.startswith("MTRANK_XYZZY is not a setting") and "did you mean" not in message


def test_settings_other_variables_and_tool_variables_are_not_reported():
    environ = {name: "1" for name in _variables()}
    # pydantic-settings reads names case-insensitively; the locust scenario and the tests read their own.
    environ |= {"mtrank_port": "1", "MTRANK_LOCUST_REPO": "/models", "MTRANK_TEST_REDIS_URL": "redis://x",
                "MTRANK_SHARED_DATA": "/data", "PATH": "/bin", "REDIS_URL": "redis://x"}
    assert unknown_variables(environ) == []


def test_serve_warns_about_a_misspelt_variable_at_start_up(tmp_path: Path):
    build_toy_version(tmp_path, "toy", 1)
    server = RemoteServer(tmp_path, env={"MTRANK_MAX_BATCH_ROW": "64", "MTRANK_MAX_BATCH_ROWS": "32"})
    with server:
        assert server.get("/readyz").status_code == 200
    output = server.output()
    lines = [line for line in output.splitlines() if "MTRANK_MAX_BATCH_ROW " in line]
    assert len(lines) == 1, output
    assert "WARNING" in lines[0] and lines[0].endswith("did you mean MTRANK_MAX_BATCH_ROWS?")
    assert "MTRANK_MAX_BATCH_ROWS is not" not in output


def test_readme_configuration_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Configuration\n(.*?)^## ", readme, flags=re.DOTALL | re.MULTILINE)
    assert section is not None
    # One table row per variable: "| `MTRANK_...` | default | meaning |".
    listed = set(re.findall(r"^\| `(MTRANK_[A-Z0-9_]+)` \|", section.group(1), flags=re.MULTILINE))
    assert {"MTRANK_STORE_URL", "MTRANK_STORE_TIMEOUT_MS", "MTRANK_STORE_RETRY_S"} <= listed
    # The deprecated names are named in their new setting's row.
    assert all(f"`{old}`" in section.group(1) for old in DEPRECATED_VARIABLES)
    assert not set(_variables()) - listed, f"missing from README.md's configuration: {set(_variables()) - listed}"
    assert not listed - set(_variables()), f"not settings: {listed - set(_variables())}"


def test_the_deprecated_store_variables_still_set_the_store_settings(monkeypatch):
    for name in [*DEPRECATED_VARIABLES, *DEPRECATED_VARIABLES.values()]:
        monkeypatch.delenv(name, raising=False)
    old = {"MTRANK_REDIS_URL": "redis://h:1/2", "MTRANK_REDIS_PREFIX": "p", "MTRANK_REDIS_TIMEOUT_MS": "250",
           "MTRANK_REDIS_RETRY_S": "3"}
    for name, value in old.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert (s.store_url_text(), s.store_prefix, s.store_timeout_ms, s.store_retry_s) == ("redis://h:1/2", "p", 250, 3)
    assert deprecated_variables(old) == [
        f"{o} is deprecated; use {n} (it still works in this version)" for o, n in DEPRECATED_VARIABLES.items()
    ]
    monkeypatch.setenv("MTRANK_STORE_URL", "redis://new:1/0")
    assert load_settings().store_url_text() == "redis://new:1/0"  # the new name wins
    assert unknown_variables(old) == []


def test_each_deprecated_name_is_warned_about_once_at_start_up_with_several_workers(
    tmp_path: Path, redis_url, redis_prefix
):
    from mtrank.export.store_loader import load_embeddings

    build_toy_version(tmp_path, "toy", 1)
    load_embeddings(tmp_path, "toy", redis_url, prefix=redis_prefix, progress=False)
    env = {"MTRANK_WORKERS": "2", "MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": redis_prefix,
           "MTRANK_REDIS_TIMEOUT_MS": "500", "MTRANK_REDIS_RETRY_S": "0.5"}
    with RemoteServer(tmp_path, env=env, args=["--redis", redis_url]) as server:
        models = server.get("/v1/models").json()
        answer = server.post("/v1/rank", json=rank_body(n=10)).json()
    output = server.output()
    assert models["store"] == {"kind": "redis", "degraded": False} and answer["degraded"] is False
    for old, new in [*DEPRECATED_VARIABLES.items(), ("--redis", "--store")]:
        lines = [line for line in output.splitlines() if f"{old} is deprecated; use {new}" in line]
        assert len(lines) == 1, output
