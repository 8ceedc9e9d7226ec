"""Model files are untrusted input: a malformed or tampered version is refused with a one-line
reason, alone, whatever is wrong with it; the reload and the start-up go on, and no public answer
shows where the repository lives on disk."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtrank import store_keys
from mtrank.bench.server import RemoteServer
from mtrank.export.store_loader import load_embeddings
from mtrank.manifest import MANIFEST, ManifestError, load_manifest, version_dir, write_manifest
from tests.server import build_toy_version, rank_body

ADMIN_TOKEN = "model-files-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model-files-repo")
    build_toy_version(repo, "toy", 1)
    return repo


def _copy(toy_repo: Path, repo: Path, model: str = "toy", version: int = 1) -> Path:
    """Version 1 of the toy model published as ``repo/model/version`` (manifest rewritten to match)."""
    vdir = shutil.copytree(toy_repo / "toy" / "1", repo / model / str(version))
    manifest = load_manifest(vdir)
    manifest.name, manifest.version = model, version
    write_manifest(vdir, manifest)
    return vdir


def _edit_manifest(vdir: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite ``vdir``'s manifest as ``edit`` changes it (or as what it returns, when not None)."""
    raw = json.loads((vdir / MANIFEST).read_text())
    changed = edit(raw)
    (vdir / MANIFEST).write_text(json.dumps(raw if changed is None else changed))


def _samples(server: RemoteServer, name: str) -> list:
    return [s for fam in text_string_to_metric_families(server.metrics()) for s in fam.samples if s.name == name]


# -- the manifest, read as untrusted JSON ------------------------------------------------------

MALFORMED = {
    "a JSON list": (lambda m: [m], "manifest.json: expected a JSON object, got a list"),
    "graphs as a list": (lambda m: m.update(graphs=list(m["graphs"].values())), "graphs: Input should be an object"),
    "a non-integer width": (lambda m: m["tables"]["user_id"].update(dim=8.5),
                            "tables.user_id.dim: Input should be a valid integer (got 8.5)"),
    "a width as a string": (lambda m: m["tables"]["user_id"].update(dim="8"),
                            "tables.user_id.dim: Input should be a valid integer (got '8')"),
    "rows as a boolean": (lambda m: m["tables"]["item_id"].update(rows=True), "tables.item_id.rows"),
    "a zero width": (lambda m: m["tables"]["item_id"].update(dim=0), "rows and dim must be positive"),
    "tasks as an object": (lambda m: m.update(tasks={"vtr": 1}), "tasks: Input should be a valid array"),
    "a task without a name": (lambda m: m["tasks"][0].pop("name") and None, "tasks[0]: needs a string name and type"),
    "a shape with a float": (lambda m: m["graphs"]["all"]["inputs"][0].update(shape=["batch", 4.5]),
                             "graphs.all.inputs[0].shape[1]"),
    "a mean as a string": (lambda m: m["dense"][0].update(mean="4.0"), "dense[0].mean: Input should be a valid number"),
    "an unknown location": (lambda m: m["sparse"][0].update(location="disk"), "sparse[0].location"),
    "a user-group rule of the wrong type": (lambda m: m["user_groups"].update(column=5), "user_groups"),
    "an unknown key": (lambda m: m.update(weights="x"), "weights: unknown key"),
    "a string version": (lambda m: m.update(version="1"), "version: Input should be a valid integer"),
    "files as a list": (lambda m: m.update(files=sorted(m["files"])), "files: Input should be an object"),
    "a checksum that is not one": (lambda m: m["files"].update({"graphs/all.onnx": 1}), "files.graphs/all.onnx"),
    "an absolute graph path": (lambda m: m["graphs"]["all"].update(file="/etc/hostname"),
                               "graphs.all.file: file name '/etc/hostname' is not a relative path inside"),
    "a graph path out of the directory": (lambda m: m["graphs"]["all"].update(file="../../toy/1/graphs/all.onnx"),
                                          "graphs.all.file: file name '../../toy/1/graphs/all.onnx' is not a relative"),
    "a listed file out of the directory": (lambda m: m["files"].update({"../1/manifest.json": "0" * 64}),
                                           "files: file name '../1/manifest.json' is not a relative path"),
    "another model's name": (lambda m: m.update(name="other"), "manifest names model 'other' version 2, the directory "
                                                                "is toy/2"),
    "another version number": (lambda m: m.update(version=1), "manifest names model 'toy' version 1, the directory "
                                                              "is toy/2"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_refused_in_one_line(toy_repo, tmp_path, case):
    edit, expected = MALFORMED[case]
    vdir = _copy(toy_repo, tmp_path, version=2)
    _edit_manifest(vdir, edit)
    with pytest.raises(ManifestError) as refused:
        load_manifest(vdir, located=True)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_a_file_the_manifest_does_not_list_is_refused(toy_repo, tmp_path):
    vdir = _copy(toy_repo, tmp_path)
    (vdir / "graphs" / "extra.onnx").write_bytes(b"not checked by anything")
    with pytest.raises(ManifestError, match=r"files the manifest does not list: \['graphs/extra.onnx'\]"):
        load_manifest(vdir)


@pytest.mark.parametrize("what", ["a file", "a directory"])
def test_a_symbolic_link_in_a_version_is_refused_even_to_identical_content(toy_repo, tmp_path, what):
    vdir = _copy(toy_repo, tmp_path)
    outside = tmp_path / "outside"
    if what == "a file":
        shutil.move(vdir / "tables" / "user_id.ids", outside)
        (vdir / "tables" / "user_id.ids").symlink_to(outside)
        link = "tables/user_id.ids"
    else:
        shutil.move(vdir / "tables", outside)
        (vdir / "tables").symlink_to(outside, target_is_directory=True)
        link = "tables"
    with pytest.raises(ManifestError, match=f"{link} is a symbolic link"):
        load_manifest(vdir)


def test_an_exported_version_passes_every_check(exported_repo):
    vdir = version_dir(exported_repo("ple"), "ple")
    manifest = load_manifest(vdir, located=True)
    assert (manifest.name, manifest.version) == ("ple", 1) and manifest.files


# -- a real `mtrank serve` ----------------------------------------------------------------------


def test_a_reload_with_a_malformed_version_and_a_good_new_model_loads_one_and_refuses_the_other(toy_repo, tmp_path):
    repo = tmp_path / "repo"
    _copy(toy_repo, repo)
    with RemoteServer(repo, env={"MTRANK_ADMIN_TOKEN": ADMIN_TOKEN}) as s:
        _edit_manifest(_copy(toy_repo, repo, version=2), lambda m: [m])  # a JSON list
        _copy(toy_repo, repo, model="toy_b")  # sorts after "toy": the default bucket keeps "toy"
        r = s.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["served"] == {"toy": [1], "toy_b": [1]} and report["loaded"] == ["toy_b v1"]
        assert list(report["refused"]) == ["toy v2"] and report["errors"] == {}
        assert report["refused"]["toy v2"].endswith("manifest.json: expected a JSON object, got a list")
        assert s.post("/v1/rank", json=rank_body(n=5)).json()["model"] == {"name": "toy", "version": 1}
        models = {m["name"]: m for m in s.get("/v1/models").json()["models"]}
        assert [v["version"] for v in models["toy_b"]["versions"]] == [1]
        assert models["toy"]["refused"] == [{"version": 2, "reason": report["refused"]["toy v2"]}]
        refused = {(x.labels["model"], x.labels["version"]): x.value
                   for x in _samples(s, "mtrank_model_versions_refused")}
        assert refused == {("toy", "2"): 1.0}
        ready = s.get("/readyz")
        assert ready.status_code == 200 and "toy v2 refused" in ready.json()["reason"], ready.text


def test_malformed_newest_versions_at_start_up_are_refused_and_the_previous_ones_served(toy_repo, tmp_path):
    repo = tmp_path / "repo"
    broken = {  # model → what is wrong with its version 2
        "toy": lambda vdir: _edit_manifest(vdir, lambda m: m.update(graphs=list(m["graphs"].values()))),
        "toy_b": lambda vdir: _edit_manifest(vdir, lambda m: m["tables"]["user_id"].update(dim="8")),
        "toy_c": lambda vdir: (vdir / "notes.txt").write_text("unlisted"),
        "toy_d": lambda vdir: _edit_manifest(vdir, lambda m: m.update(name="toy")),
    }
    for model, breaks in broken.items():
        _copy(toy_repo, repo, model=model)
        breaks(_copy(toy_repo, repo, model=model, version=2))
    with RemoteServer(repo) as s:
        assert s.post("/v1/rank", json=rank_body(n=5)).json()["model"] == {"name": "toy", "version": 1}
        models = {m["name"]: m for m in s.get("/v1/models").json()["models"]}
        assert {name: [v["version"] for v in m["versions"]] for name, m in models.items()} == {
            name: [1] for name in broken}
        reasons = {name: [(x["version"], x["reason"]) for x in m["refused"]] for name, m in models.items()}
        assert reasons.pop("toy")[0][1].startswith("toy/2: manifest.json: graphs: Input should be an object (got [")
        assert reasons == {
            "toy_b": [(2, "toy_b/2: manifest.json: tables.user_id.dim: Input should be a valid integer (got '8')")],
            "toy_c": [(2, "toy_c/2: files the manifest does not list: ['notes.txt']")],
            "toy_d": [(2, "toy_d/2: manifest names model 'toy' version 2, the directory is toy_d/2")],
        }
        refused = {(x.labels["model"], x.labels["version"]) for x in _samples(s, "mtrank_model_versions_refused")}
        assert refused == {(name, "2") for name in broken}


def _graph_with_outside_weights(path: Path, outside: Path) -> None:
    """An ONNX graph whose weights are external data at ``outside``, named by a ``../`` path."""
    from onnx import TensorProto, helper

    outside.write_bytes(bytes(16))
    weights = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    weights.ClearField("float_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", os.path.relpath(outside, path.parent)), ("offset", "0"), ("length", "16")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Add", ["dense", "w"], ["vtr"])
    graph = helper.make_graph([node], "outside", [helper.make_tensor_value_info("dense", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("vtr", TensorProto.FLOAT, [4])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


def _unloadable_versions(toy_repo: Path, repo: Path) -> None:
    """Versions that fail in every way whose reason may carry a path: a graph ONNX Runtime cannot
    parse (checksums right), a graph whose weights lie outside the repository, a changed file, a
    missing file, a manifest that is not JSON."""
    garbage = _copy(toy_repo, repo, version=2)
    (garbage / "graphs" / "all.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    write_manifest(garbage, load_manifest(garbage, verify=False))
    escaping = _copy(toy_repo, repo, version=5)
    _graph_with_outside_weights(escaping / "graphs" / "all.onnx", repo.parent / "outside.bin")
    write_manifest(escaping, load_manifest(escaping, verify=False))
    changed = _copy(toy_repo, repo, version=3)
    (changed / "tables" / "item_id.npy").write_bytes(b"changed")
    missing = _copy(toy_repo, repo, version=4)
    (missing / "tables" / "author_id.ids").unlink()
    (_copy(toy_repo, repo, model="toy_b") / MANIFEST).write_text("{not json")


def _wait_up(s: RemoteServer, timeout_s: float = 60.0) -> None:
    """Until the server answers (its start-up load done), ready or not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert s.proc.poll() is None, "the server exited"
        try:
            if s.get("/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError("the server did not answer /healthz")


def _public_answers(s: RemoteServer) -> dict[str, str]:
    return {
        "/readyz": s.get("/readyz").text,
        "/v1/models": s.get("/v1/models").text,
        "/v1/rank": s.post("/v1/rank", json=rank_body(n=5)).text,
        "/v1/rank (invalid)": s.post("/v1/rank", json={"user": {}}).text,
    }


@pytest.mark.parametrize("with_good_version", [True, False], ids=["a good version served", "nothing servable"])
def test_no_public_answer_shows_the_repository_path_whatever_the_failure(toy_repo, tmp_path, with_good_version):
    repo = tmp_path / "repo"
    if with_good_version:
        _copy(toy_repo, repo)
    _unloadable_versions(toy_repo, repo)
    s = RemoteServer(repo, wait_ready=with_good_version)
    try:
        if not with_good_version:
            _wait_up(s)
        answers = _public_answers(s)
    finally:
        s.stop()
    reasons = answers["/v1/models"] + answers["/readyz"]
    assert "toy/2: InvalidProtobuf: [ONNXRuntimeError]" in reasons, reasons
    assert "External data path escapes model directory" in reasons and 'resolved path: \\"<path>\\"' in reasons
    assert "checksum mismatch for tables/item_id.npy" in reasons and "not valid JSON" in reasons, reasons
    if not with_good_version:
        assert "no model version loaded from the model repository" in answers["/v1/rank"], answers["/v1/rank"]
    for where in {str(repo), str(repo.resolve()), str(tmp_path.resolve())}:
        leaks = {route: body for route, body in answers.items() if where in body}
        assert leaks == {}, where
    assert str(repo) in s.output(), "the log keeps the details"


# -- a table's meta key in Redis, read as untrusted JSON -----------------------------------------


def _set_meta(redis_url: str, prefix: str, version: int, field: str, **changes: Any) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    key = store_keys.meta_key(prefix, "toy", version, field)
    client.set(key, json.dumps({**json.loads(client.get(key)), **changes}))


@pytest.mark.redis
def test_a_non_integer_width_in_a_redis_meta_key_refuses_that_version_at_reload(toy_repo, tmp_path, redis_url,
                                                                               redis_prefix):
    repo = tmp_path / "repo"
    _copy(toy_repo, repo)
    load_embeddings(repo, "toy", redis_url, prefix=redis_prefix, progress=False)
    env = {"MTRANK_STORE_URL": redis_url, "MTRANK_STORE_PREFIX": redis_prefix, "MTRANK_ADMIN_TOKEN": ADMIN_TOKEN}
    with RemoteServer(repo, env=env) as s:
        _copy(toy_repo, repo, version=2)
        load_embeddings(repo, "toy", redis_url, prefix=redis_prefix, progress=False)
        _set_meta(redis_url, redis_prefix, 2, "user_id", width=8.5)
        r = s.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200 and r.json()["served"] == {"toy": [1]}, r.text
        assert r.json()["refused"] == {
            "toy v2": "table 'user_id' in Redis has rows=201 width=8.5, the repository has rows=201 width=8"}
        assert s.post("/v1/rank", json=rank_body(n=5)).json()["model"] == {"name": "toy", "version": 1}


@pytest.mark.redis
def test_a_meta_key_whose_width_turns_into_a_word_marks_the_table_incomplete_without_an_error(
    toy_repo, tmp_path, redis_url, redis_prefix
):
    repo = tmp_path / "repo"
    _copy(toy_repo, repo)
    load_embeddings(repo, "toy", redis_url, prefix=redis_prefix, progress=False)
    env = {"MTRANK_STORE_URL": redis_url, "MTRANK_STORE_PREFIX": redis_prefix, "MTRANK_STORE_RETRY_S": "0.2"}
    with RemoteServer(repo, env=env) as s:
        _set_meta(redis_url, redis_prefix, 1, "item_id", width="eight")
        unknown = rank_body(n=5, offset=10_000)  # ids the table does not hold: their misses re-check the meta key
        for _ in range(6):
            time.sleep(0.25)
            assert s.post("/v1/rank", json=unknown).status_code == 200
    log = s.output()
    assert "table toy v1 item_id in Redis has rows=501 width=eight" in log, log
    assert "Traceback" not in log and "never retrieved" not in log, log


def test_a_reload_that_leaves_a_bucket_without_a_servable_version_answers_409_naming_the_bucket(toy_repo, tmp_path):
    repo = tmp_path / "repo"
    _edit_manifest(_copy(toy_repo, repo), lambda m: m.update(version=3))
    s = RemoteServer(repo, env={"MTRANK_ADMIN_TOKEN": ADMIN_TOKEN}, wait_ready=False)
    try:
        _wait_up(s)
        r = s.post("/admin/reload", headers=AUTH)
        assert r.status_code == 409, r.text
        assert r.json() == {
            "served": {}, "loaded": [],
            "refused": {"toy v1": "toy/1: manifest names model 'toy' version 3, the directory is toy/1"},
            "errors": {"default": "bucket 'default': no servable version of model toy"},
        }
        assert s.get("/readyz").status_code == 503
    finally:
        s.stop()
