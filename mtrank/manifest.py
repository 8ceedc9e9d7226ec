"""The model repository contract: ``REPO/<model>/<version>/manifest.json``.

Written by ``export``, read by ``service``; torch-free. A version directory holds the manifest,
one ONNX graph per user group (``graphs["all"]`` for a model without groups) and the embedding
tables of store-held fields. Every file is listed with its SHA-256; :func:`load_manifest` refuses
a version whose files do not match.

Graph inputs (names are part of the contract):

- ``dense``: float32 ``[batch, n_dense]``, normalised as ``features.dense`` says, in that order;
- ``ids``: int64 ``[batch, n_graph_fields]``, vocabulary indices of the ``location == "graph"``
  sparse fields in ``features.sparse`` order (0 = out of vocabulary); absent when there are none;
- ``emb.<field>``: float32 ``[batch, width]``, the row of store table ``<field>`` for each row;
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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.spec import Facet, FeatureSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ALL_GROUPS = "all"

# Graph input names: the one definition the exporter, the service and the tests use.
DENSE_INPUT = "dense"
IDS_INPUT = "ids"
EMB_PREFIX = "emb."
ITEM_FACET_INPUT = "item_facet"
"""int64 ``[batch]``: each row's item-facet value index (three-facet models only)."""


def emb_input(field: str) -> str:
    """The graph input carrying store field ``field``'s vectors."""
    return EMB_PREFIX + field
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")


class ManifestError(ValueError):
    """A version directory is missing, incomplete, tampered with or of an unknown format."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    """numpy dtype name: float32, float16, int64."""
    shape: list[int | str]
    """``"batch"`` marks the dynamic axis."""


@dataclass(frozen=True)
class GraphInfo:
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
    dtype: str = "float32"

    @property
    def width(self) -> int:
        return self.dim * len(self.views)


@dataclass(frozen=True)
class DenseInfo:
    """A dense field and its train statistics: model input = clip((t(x) − mean) / std)
    (:mod:`mtrank.transform`)."""

    name: str
    side: str
    transform: str
    """``none`` or ``log1p``."""
    mean: float
    std: float
    default: float
    """Raw value used when a row does not carry the feature."""

    def __post_init__(self) -> None:
        if self.transform not in ("none", "log1p"):
            raise ManifestError(f"dense field {self.name!r}: unknown transform {self.transform!r}")


@dataclass(frozen=True)
class SparseInfo:
    name: str
    side: str
    location: str
    """``graph``: indices from ``vocab`` feed the ``ids`` input; ``store``: vectors from ``tables``."""
    vocab: list[str] | None = None
    """Graph fields only: value of index ``i + 1``."""


@dataclass
class Manifest:
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
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format_version {d.get('format_version')!r}")
        try:
            return cls(
                name=d["name"],
                kind=d["kind"],
                version=int(d["version"]),
                tasks=d["tasks"],
                dense=[DenseInfo(**x) for x in d["dense"]],
                sparse=[SparseInfo(**x) for x in d["sparse"]],
                graphs={
                    g: GraphInfo(
                        file=x["file"],
                        inputs=[TensorInfo(**t) for t in x["inputs"]],
                        outputs=[TensorInfo(**t) for t in x["outputs"]],
                        tasks=x["tasks"],
                        fp16_file=x.get("fp16_file"),
                    )
                    for g, x in d["graphs"].items()
                },
                tables={k: TableInfo(**x) for k, x in d["tables"].items()},
                user_groups=d.get("user_groups"),
                item_facet=d.get("item_facet"),
                parity=d.get("parity", {}),
                source=d.get("source", {}),
                created_at=d.get("created_at", ""),
                files=d.get("files", {}),
            )
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from e


def facet_dict(facet: Facet | None) -> dict[str, Any] | None:
    return None if facet is None else asdict(facet)


def _facet(d: dict[str, Any] | None) -> Facet | None:
    if not d:
        return None
    return FeatureSpec.from_dict({"tasks": [{"name": "_"}], "user_groups": d}).user_groups


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(version_dir: Path, manifest: Manifest) -> None:
    """Checksum every file under ``version_dir`` (but the manifest) and write the manifest."""
    manifest.files = {
        str(p.relative_to(version_dir)): sha256_file(p)
        for p in sorted(version_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (version_dir / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))


def load_manifest(version_dir: str | Path, verify: bool = True) -> Manifest:
    """Read a version's manifest; with ``verify``, refuse missing, extra-truncated or changed files."""
    version_dir = Path(version_dir)
    path = version_dir / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{version_dir}: no {MANIFEST} (not an exported model version)")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    if verify:
        verify_files(version_dir, manifest)
    return manifest


def verify_files(version_dir: Path, manifest: Manifest) -> None:
    if not manifest.files:
        raise ManifestError(f"{version_dir}: manifest lists no files")
    referenced = {g.file for g in manifest.graphs.values()} | {
        f for t in manifest.tables.values() for f in (t.ids_file, t.vectors_file)
    }
    unlisted = sorted(referenced - set(manifest.files))
    if unlisted:
        raise ManifestError(f"{version_dir}: files without a checksum in the manifest: {unlisted}")
    for rel, digest in manifest.files.items():
        p = version_dir / rel
        if not p.is_file():
            raise ManifestError(f"{version_dir}: missing file {rel}")
        if sha256_file(p) != digest:
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
