"""Request and response bodies of ``POST /v1/rank`` (docs/architecture.md §5).

The request is decoded and validated in one pass by msgspec (C code, about three times faster
than JSON parsing plus pydantic for 500 candidates) and turned into columns (:class:`RankQuery`)
for the shared feature transform. It is strict: unknown fields, wrong types (a number where a
string belongs and the reverse), non-finite numbers and oversized strings are a 422 naming the
field; more candidates than ``MTRANK_MAX_CANDIDATES`` a 413.

The same structs give ``/openapi.json`` its request and response schemas (:func:`openapi_schemas`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson
from msgspec import Meta, Struct

from mtrank.service.errors import MalformedBody, RequestError, TooManyCandidates

MAX_ID_CHARS = 256
MAX_FEATURE_CHARS = 256
MAX_FEATURES = 64
MAX_FEATURE_NAME_CHARS = 64
MAX_VIDEO_LEN_S = 86400.0
MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_RULE = f"1 to {MAX_REQUEST_ID_CHARS} visible ASCII characters (0x21-0x7E)"
VALID_REQUEST_ID = re.compile(f"[!-~]{{1,{MAX_REQUEST_ID_CHARS}}}")
"""The one rule for request ids, from the body and from ``X-Request-ID`` (``fullmatch``): an id is
echoed in a response header and written to logs, so no space, control or non-ASCII character."""

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Scalar = Annotated[str, Meta(max_length=MAX_FEATURE_CHARS)] | int | float | bool
FeatureValue = Scalar | list[Scalar]
"""A value, or a list of values (a ``multi`` or ``sequence`` feature; longer than
``MTRANK_MAX_LIST_LEN`` is a 413, checked by the transform for the model's list fields)."""
Features = Annotated[
    dict[Annotated[str, Meta(min_length=1, max_length=MAX_FEATURE_NAME_CHARS)], FeatureValue],
    Meta(max_length=MAX_FEATURES, description=(
        "Feature name → a string, a finite number, a boolean, or a list of those (a history, tags).")),
]


class User(Struct, forbid_unknown_fields=True):
    user_id: Id
    features: Features = {}
    group: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    """Explicit user group; when absent the model's rule assigns one from the features."""


class Candidate(Struct, forbid_unknown_fields=True):
    item_id: Id
    video_len: Annotated[float, Meta(ge=0.0, le=MAX_VIDEO_LEN_S, description="Seconds, in [0, 86400].")]
    features: Features = {}


class RankRequest(Struct, forbid_unknown_fields=True):
    user: User
    candidates: Annotated[list[Candidate], Meta(min_length=1)]
    request_id: Annotated[str, Meta(
        description=f"{REQUEST_ID_RULE}; echoed in the answer (else X-Request-ID's, else a generated one).",
        extra_json_schema={"minLength": 1, "maxLength": MAX_REQUEST_ID_CHARS, "pattern": "^[!-~]+$"},
    )] | None = None
    """Checked by :func:`decode_request` against :data:`VALID_REQUEST_ID` (msgspec's ``pattern`` uses
    ``re.search``, whose ``$`` also matches before a final newline)."""
    top_k: Annotated[int, Meta(ge=1, description="Return the best top_k items; absent = all.")] | None = None
    return_task_scores: bool = False


class ModelRef(Struct):
    name: str
    version: int


class RankedItem(Struct, omit_defaults=True):
    item_id: str
    rank: int
    score: float
    tasks: dict[str, float] | None = None
    """Each task's prediction, with ``return_task_scores`` (absent without). The ranker fills it
    with a struct of the model's tasks (:func:`task_scores_type`), encoded as the same object."""


class RankResponse(Struct):
    """What ``/v1/rank`` answers: the ranker builds it, :data:`RESPONSE_ENCODER` writes it."""

    request_id: str
    model: ModelRef
    bucket: str
    user_group: str | None
    degraded: bool
    missing_ids: int
    """Store ids their table does not hold, answered with its default vector (an unreachable store
    is ``degraded`` instead)."""
    items: list[RankedItem]


RESPONSE_ENCODER = msgspec.json.Encoder()


@functools.lru_cache(maxsize=64)
def task_scores_type(tasks: tuple[str, ...]) -> type[Struct]:
    """A struct with one float field per task, encoded as ``{task: score, ...}`` in that order.

    500 items × 6 tasks: the items built as structs (``map`` over columns) and encoded by msgspec
    take ~350 µs against ~570 µs as dicts encoded by orjson."""
    fields = [(f"t{i}", float) for i in range(len(tasks))]
    return msgspec.defstruct("TaskScores", fields, rename=dict(zip((f for f, _ in fields), tasks, strict=True)))


_DECODER = msgspec.json.Decoder(RankRequest)
_PATH = re.compile(r" - at `\$(.*)`$")
_LIST_ENTRY = re.compile(r"features\[\.\.\.\]\[\d+\]$")


@dataclass
class RankQuery:
    """A validated ``/v1/rank`` request in columns: what the ranker reads."""

    request_id: str | None
    user_id: str
    user_features: dict[str, Any]
    user_group: str | None
    item_ids: list[str]
    video_len: np.ndarray
    """float64 ``[n]`` seconds."""
    item_features: list[dict[str, Any]]
    top_k: int | None
    return_task_scores: bool
    _columns: dict[str, list] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.item_ids)

    def user_value(self, name: str) -> Any:
        """The user's raw value of feature ``name`` (None when absent)."""
        return self.user_id if name == "user_id" else self.user_features.get(name)

    def item_column(self, name: str) -> Any:
        """The candidates' raw values of feature ``name``, one per candidate (None when absent)."""
        if name == "item_id":
            return self.item_ids
        if name == "video_len":
            return self.video_len
        column = self._columns.get(name)
        if column is None:
            column = self._columns[name] = [f.get(name) for f in self.item_features]
        return column


def decode_request(body: bytes, max_candidates: int) -> RankQuery:
    """Parse and validate a body (422 :class:`RequestError` / :class:`MalformedBody`, 413
    :class:`TooManyCandidates`) into columns."""
    try:
        req = _DECODER.decode(body)
    except msgspec.ValidationError as e:
        raise RequestError(_explain(e, body)) from None
    except msgspec.DecodeError as e:
        raise MalformedBody(f"malformed JSON: {e}") from None
    if req.request_id is not None and VALID_REQUEST_ID.fullmatch(req.request_id) is None:
        raise RequestError(f"invalid request: request_id: must be {REQUEST_ID_RULE}")
    cands = req.candidates
    if len(cands) > max_candidates:
        raise TooManyCandidates(
            f"{len(cands)} candidates, more than the limit of {max_candidates} (MTRANK_MAX_CANDIDATES)"
        )
    item_ids = [c.item_id for c in cands]
    if len(set(item_ids)) != len(item_ids):
        seen: set[str] = set()
        dup = next(i for i in item_ids if i in seen or seen.add(i))
        raise RequestError(f"invalid request: candidates: duplicate item_id {dup!r} in candidates")
    return RankQuery(
        request_id=req.request_id,
        user_id=req.user.user_id,
        user_features=req.user.features,
        user_group=req.user.group,
        item_ids=item_ids,
        video_len=np.fromiter((c.video_len for c in cands), dtype=np.float64, count=len(cands)),
        item_features=[c.features for c in cands],
        top_k=req.top_k,
        return_task_scores=req.return_task_scores,
    )


def _explain(e: msgspec.ValidationError, body: bytes) -> str:
    """msgspec's message as ``invalid request: <field path>: <what is wrong>``.

    msgspec names a dict entry ``features[...]``; for those the path gets the feature's name.
    """
    text = str(e)
    match = _PATH.search(text)
    path = match.group(1).lstrip(".") if match else ""
    what = text[: match.start()] if match else text
    if what == "Number out of range":
        what = "must be a finite number"
    if _LIST_ENTRY.search(path):  # a list entry that is a list or an object
        entry = path[path.rindex("[") :]
        path = path[: path.rindex("[")]
        name = _bad_feature(body, path)
        path = path.removesuffix("[...]") + (f".{name}" if name else "") + entry
        what = "list entries must be strings, numbers or booleans (no nested lists or objects)"
    elif path.endswith("features[...]"):
        name = _bad_feature(body, path)
        path = path.removesuffix("[...]") + (f".{name}" if name else "")
    return f"invalid request: {path or 'body'}: {what}"


def _bad_feature(body: bytes, path: str) -> str | None:
    """The name of the first feature of ``path``'s dict whose value is not acceptable."""
    try:
        node: Any = orjson.loads(body)
        for part in re.findall(r"[A-Za-z_]+|\[\d+\]", path.removesuffix("[...]")):
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return None
    if not isinstance(node, dict):
        return None
    for name, v in node.items():
        if not name or len(name) > MAX_FEATURE_NAME_CHARS or not _acceptable(v, nested=True):
            return name
    return None


def _acceptable(value: Any, nested: bool) -> bool:
    if isinstance(value, list) and nested:
        return all(_acceptable(v, nested=False) for v in value)
    too_long = isinstance(value, str) and len(value) > MAX_FEATURE_CHARS
    return isinstance(value, str | int | float | bool) and not too_long


def openapi_schemas() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(request schema ref, response schema ref, components) for ``/openapi.json``."""
    (request, response), components = msgspec.json.schema_components(
        [RankRequest, RankResponse], ref_template="#/components/schemas/{name}"
    )
    return request, response, components
