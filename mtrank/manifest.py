"""The model repository contract: ``REPO/<model>/<version>/manifest.json``.

Written by ``export``, read by ``service``; torch-free. A version directory holds the manifest,
one ONNX graph per user group (``graphs["all"]`` for a model without groups) and the embedding
tables of store-held fields. Every file is listed with its SHA-256; :func:`load_manifest` refuses
a version whose files do not match.

Graph inputs (names are part of the contract). Each has a leading dynamic axis: ``batch`` (one row
per candidate) or ``requests`` (one row per request: what belongs to the user enters once, however
many candidates the request ranks). The graph gathers the per-request rows with ``request_index``,
so one batch may mix several requests. :mod:`mtrank.kinds` derives the list from the feature kinds.

- ``request_index``: int64 ``[batch]``, the request (row of every ``requests`` input) of each row;
- ``dense`` / ``user_dense``: float32 ``[batch, n]`` / ``[requests, n]``, the item-side / user-side
  dense fields of ``features.dense`` in that order, normalised as it says;
- ``ids`` / ``user_ids``: int64, vocabulary indices of the item-side / user-side sparse fields with
  ``location == "graph"``, in ``features.sparse`` order (0 = out of vocabulary);
- ``emb.<field>``: float32 ``[batch or requests, width]``, the row of store table ``<field>``;
- ``list.<field>`` and ``len.<field>``: a ``multi`` or ``sequence`` field (``lists``): int64 indices
  ``[batch or requests, max_len]`` padded with 0, and each row's length ``[batch or requests]``; a
  sequence that shares a store table instead takes ``emb.<field>``: float32 ``[requests, max_len,
  width]`` (padding rows 0) beside ``len.<field>``;
- ``item_facet``: int64 ``[batch]``, each row's index into ``item_facet.values`` (three-facet
  models only: each group's graph picks, per row, the heads of the row's item value).

Graph outputs: one float32 ``[batch]`` output per task, named by the task, in label units: a
probability for binary tasks; for regression tasks as the task's ``output`` says (``sigmoid``:
in [0, 1]; ``identity``: standardisation undone; ``softplus`` / ``exp``: positive).

``tasks``: per served task ``{"name", "type", "behaviour", "output", "fusion_range"}``. ``output``
is ``sigmoid`` for binary tasks, else the regression output. ``fusion_range`` ``[lo, hi]`` (label
units) is how the output enters the fusion score (``mtrank.fusion.log_scores``'s ``ranges``):
``clip((y - lo) / (hi - lo), P_MIN, 1)`` before the log. Binary and ``sigmoid`` tasks: ``[0, 1]``
(the clip of a probability); ``identity``: the train labels' 1st and 99th percentiles;
``softplus`` / ``exp``: ``[0, p99]`` of the train labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from mtrank.spec import STRICT, Facet, FeatureSpec, Side, SpecError, validate

FORMAT_VERSION = 2
"""2: user-side inputs per request and list fields. 1 (before them) took the user's side once per
candidate; such a version is refused with a message to re-export its run."""
MANIFEST = "manifest.json"
ALL_GROUPS = "all"

# Graph input names: the one definition the exporter, the service and the tests use.
DENSE_INPUT = "dense"
USER_DENSE_INPUT = "user_dense"
IDS_INPUT = "ids"
USER_IDS_INPUT = "user_ids"
EMB_PREFIX = "emb."
LIST_PREFIX = "list."
LEN_PREFIX = "len."
REQUEST_INDEX_INPUT = "request_index"
BATCH_AXIS = "batch"
REQUESTS_AXIS = "requests"
ITEM_FACET_INPUT = "item_facet"
"""int64 ``[batch]``: each row's item-facet value index (three-facet models only)."""


def emb_input(field: str) -> str:
    """The graph input carrying store field ``field``'s vectors."""
    return EMB_PREFIX + field


_VERSION_RE = re.compile(r"^[1-9][0-9]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A version directory is missing, incomplete, tampered with or of an unknown format."""


# Every dataclass below is validated strictly when read (``mtrank.spec.validate``): types exact
# (``"dim": 8.5`` or ``"8"`` is an error), unknown keys refused. Model files are untrusted input.


@dataclass(frozen=True)
class TensorInfo:
    __pydantic_config__ = STRICT

    name: str
    dtype: str
    """numpy dtype name: float32, float16, int64."""
    shape: list[int | str]
    """``"batch"`` marks the dynamic axis."""


@dataclass(frozen=True)
class GraphInfo:
    __pydantic_config__ = STRICT

    file: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    tasks: list[str]
    """Task (behaviour) name of each output, in output order."""
    fp16_file: str | None = None


@dataclass(frozen=True)
class TableInfo:
    """An embedding table held by the store: row ``i + 1`` is the vector of ``ids[i]``; row 0 is
    the default vector for ids not in the table."""

    __pydantic_config__ = STRICT

    field: str
    ids_file: str
    """UTF-8 text, one id per line."""
    vectors_file: str
    """``.npy``, ``[rows, width]``, memory-mappable."""
    rows: int
    """Including the default row 0."""
    dim: int
    """Width of one view."""
    views: list[str]
    """View names in row order: ``["shared"]`` or ``["shared", "<task>", ...]`` (STEM)."""
    dtype: Literal["float32"] = "float32"

    @property
    def width(self) -> int:
        return self.dim * len(self.views)


@dataclass(frozen=True)
class DenseInfo:
    __pydantic_config__ = STRICT

    """A dense field and its train statistics: model input = clip((t(x) − mean) / std)
    (:mod:`mtrank.transform`)."""

    name: str
    side: Side
    transform: Literal["none", "log1p"]
    mean: float
    std: float
    default: float
    """Raw value used when a row does not carry the feature."""

    def __post_init__(self) -> None:
        if self.transform not in ("none", "log1p"):
            raise ManifestError(f"dense field {self.name!r}: unknown transform {self.transform!r}")


@dataclass(frozen=True)
class SparseInfo:
    __pydantic_config__ = STRICT

    name: str
    side: Side
    location: Literal["graph", "store"]
    """``graph``: indices from ``vocab`` feed the ``ids`` input; ``store``: vectors from ``tables``."""
    vocab: list[str] | None = None
    """Graph fields only: value of index ``i + 1``."""


@dataclass(frozen=True)
class ListInfo:
    """A ``multi`` or ``sequence`` field (:mod:`mtrank.spec`): its entries' vocabulary is ``vocab``
    (own table in the graph), or that of sparse field ``share`` (its graph table, or with
    ``location == "store"`` its store table)."""

    __pydantic_config__ = STRICT

    name: str
    kind: Literal["multi", "sequence"]
    side: Side
    max_len: int
    pooling: Literal["mean", "sum", "attention"]
    share: str | None = None
    location: Literal["graph", "store"] = "graph"
    vocab: list[str] | None = None


@dataclass
class Manifest:
    __pydantic_config__ = STRICT

    name: str
    kind: str
    version: int
    tasks: list[dict[str, Any]]
    """``{"name", "type", "behaviour", "output", "fusion_range"}`` per served task (module docstring)."""
    dense: list[DenseInfo]
    sparse: list[SparseInfo]
    graphs: dict[str, GraphInfo]
    tables: dict[str, TableInfo]
    user_groups: dict[str, Any] | None = None
    item_facet: dict[str, Any] | None = None
    lists: list[ListInfo] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def group_facet(self) -> Facet | None:
        return _facet(self.user_groups)

    def item_facet_rule(self) -> Facet | None:
        return _facet(self.item_facet)

    def graph_key(self, group: str | None) -> str:
        """The key of the graph serving ``group``; models without groups serve everyone from one graph."""
        if group is not None and group in self.graphs:
            return group
        if ALL_GROUPS in self.graphs:
            return ALL_GROUPS
        raise ManifestError(f"model {self.name} v{self.version} has no graph for user group {group!r}")

    def graph_for(self, group: str | None) -> GraphInfo:
        return self.graphs[self.graph_key(group)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = MANIFEST) -> Manifest:
        """A manifest from untrusted JSON values: every type checked before use, every file name a
        relative path inside the version directory; a :class:`ManifestError` of one line otherwise."""
        if not isinstance(d, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {_json_type(d)}")
        if d.get("format_version") == 1:
            raise ManifestError(f"{source}: format_version 1 (exported before per-request user inputs and "
                                "list fields): export the run again with `mtrank export`")
        if d.get("format_version") != FORMAT_VERSION or isinstance(d.get("format_version"), bool):
            raise ManifestError(f"{source}: unsupported manifest format_version {d.get('format_version')!r}")
        try:
            manifest = validate(cls, d, source)
            _facet(manifest.user_groups, f"{source}: user_groups")
            _facet(manifest.item_facet, f"{source}: item_facet")
        except SpecError as e:
            message = str(e)  # its "(got ...)" may quote a whole section of the file
            raise ManifestError(message if len(message) <= 300 else message[:297] + "...") from None
        manifest._check_contents(source)
        return manifest

    def _check_contents(self, source: str) -> None:
        """What types cannot say: positive sizes, task entries, confined file names, checksums."""

        def refuse(where: str, problem: str) -> None:
            raise ManifestError(f"{source}: {where}: {problem}")

        if self.version < 1:
            refuse("version", f"must be a positive integer (got {self.version})")
        for i, task in enumerate(self.tasks):
            if not isinstance(task.get("name"), str) or not isinstance(task.get("type"), str):
                refuse(f"tasks[{i}]", "needs a string name and type")
            bounds = task.get("fusion_range")
            if bounds is not None and not (
                isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x) for x in bounds)
                and bounds[0] < bounds[1]
            ):
                refuse(f"tasks[{i}].fusion_range", f"expected [lo, hi] with lo < hi (got {bounds!r})")
        for key, graph in self.graphs.items():
            if len(graph.tasks) != len(graph.outputs):
                refuse(f"graphs.{key}", f"{len(graph.outputs)} outputs but {len(graph.tasks)} tasks")
            _check_file_name(graph.file, f"{source}: graphs.{key}.file")
            if graph.fp16_file is not None:
                _check_file_name(graph.fp16_file, f"{source}: graphs.{key}.fp16_file")
        for key, table in self.tables.items():
            if key != table.field:
                refuse(f"tables.{key}", f"holds the table of field {table.field!r}")
            if table.rows < 1 or table.dim < 1 or not table.views:
                refuse(f"tables.{key}", "rows and dim must be positive and views not empty")
            _check_file_name(table.ids_file, f"{source}: tables.{key}.ids_file")
            _check_file_name(table.vectors_file, f"{source}: tables.{key}.vectors_file")
        for name, digest in self.files.items():
            _check_file_name(name, f"{source}: files")
            if not _SHA256_RE.match(digest):
                refuse(f"files[{name!r}]", "not a lowercase hex SHA-256")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _check_file_name(name: str, where: str) -> None:
    """A file name in a manifest is a relative POSIX path below the version directory: no absolute
    path, no ``..`` or ``.`` component, no empty component, no backslash or NUL."""
    parts = name.split("/")
    if (not name or PurePosixPath(name).is_absolute() or "\\" in name or "\0" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise ManifestError(f"{where}: file name {name[:80]!r} is not a relative path inside the version directory")


def facet_dict(facet: Facet | None) -> dict[str, Any] | None:
    return None if facet is None else asdict(facet)


def _facet(d: dict[str, Any] | None, source: str = "facet") -> Facet | None:
    if not d:
        return None
    return FeatureSpec.from_dict({"tasks": [{"name": "_"}], "user_groups": d}, source).user_groups


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(version_dir: Path, manifest: Manifest) -> None:
    """Checksum every file under ``version_dir`` (but the manifest) and write the manifest."""
    manifest.files = {
        p.relative_to(version_dir).as_posix(): sha256_file(p)
        for p in sorted(version_dir.rglob("*"))
        if p.is_file() and p != version_dir / MANIFEST
    }
    (version_dir / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))


def load_manifest(version_dir: str | Path, verify: bool = True, located: bool = False) -> Manifest:
    """Read a version's manifest. With ``verify``, refuse symlinks, files the manifest does not list
    and missing or changed files; with ``located``, also a name or version that differs from the
    directory's ``<model>/<version>``."""
    version_dir = Path(version_dir)
    path = version_dir / MANIFEST
    if version_dir.is_symlink() or path.is_symlink():
        raise ManifestError(f"{version_dir}: symbolic links are not allowed in a model version")
    if not path.is_file():
        raise ManifestError(f"{version_dir}: no {MANIFEST} (not an exported model version)")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    try:
        manifest = Manifest.from_dict(raw)
    except ManifestError as e:
        raise ManifestError(f"{version_dir}: {e}") from None
    if located and (manifest.name != version_dir.parent.name or str(manifest.version) != version_dir.name):
        raise ManifestError(f"{version_dir}: manifest names model {manifest.name[:80]!r} version "
                            f"{manifest.version}, the directory is {version_dir.parent.name}/{version_dir.name}")
    if verify:
        verify_files(version_dir, manifest)
    return manifest


def version_files(version_dir: Path) -> set[str]:
    """Relative POSIX names of the regular files under ``version_dir``, the manifest excepted.
    A symbolic link or a special file (FIFO, socket, device) anywhere below it is refused."""
    found: set[str] = set()
    for top, dirs, files in os.walk(version_dir, onerror=_raise):
        for name in dirs + files:
            p = Path(top, name)
            rel = p.relative_to(version_dir).as_posix()
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ManifestError(f"{version_dir}: {rel} is a symbolic link (not allowed in a model version)")
            if name in files and not stat.S_ISREG(mode):
                raise ManifestError(f"{version_dir}: {rel} is not a regular file")
            if name in files:
                found.add(rel)
    found.discard(MANIFEST)
    return found


def _raise(e: OSError) -> None:
    raise e


def verify_files(version_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest uses has a checksum, every file present is listed, and every
    listed file is present with its checksum."""
    if not manifest.files:
        raise ManifestError(f"{version_dir}: manifest lists no files")
    referenced = {g.file for g in manifest.graphs.values()} | {
        g.fp16_file for g in manifest.graphs.values() if g.fp16_file is not None
    } | {f for t in manifest.tables.values() for f in (t.ids_file, t.vectors_file)}
    unlisted = sorted(referenced - set(manifest.files))
    if unlisted:
        raise ManifestError(f"{version_dir}: files without a checksum in the manifest: {unlisted}")
    present = version_files(version_dir)
    extra = sorted(present - set(manifest.files))
    if extra:
        raise ManifestError(f"{version_dir}: files the manifest does not list: {extra[:5]}"
                            + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    for rel, digest in manifest.files.items():
        if rel not in present:
            raise ManifestError(f"{version_dir}: missing file {rel}")
        if sha256_file(version_dir / rel) != digest:
            raise ManifestError(f"{version_dir}: checksum mismatch for {rel} (file changed or truncated)")


def list_versions(repo: str | Path, model: str) -> list[int]:
    """Complete versions of ``model`` (directories with a manifest), ascending."""
    model_dir = Path(repo) / model
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()
    )


def list_models(repo: str | Path) -> list[str]:
    repo = Path(repo)
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and list_versions(repo, p.name))


def version_dir(repo: str | Path, model: str, version: int | None = None) -> Path:
    """The directory of ``version``, or of the newest complete version when None."""
    versions = list_versions(repo, model)
    if not versions:
        raise ManifestError(f"no versions of model {model!r} in {repo}")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ManifestError(f"model {model!r} has no version {version} in {repo} (has {versions})")
    return Path(repo) / model / str(version)


def read_ids(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def open_vectors(path: Path) -> np.ndarray:
    """Memory-mapped ``[rows, width]`` table."""
    return np.load(path, mmap_mode="r")
