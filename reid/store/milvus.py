"""The Milvus gallery backend: ``milvus://HOST:PORT/COLLECTION``, an implementation of ``reid.store.base.Gallery``.

Written for Milvus 2.3 (standalone or cluster) through ``pymilvus.MilvusClient``, keeping to calls that
server speaks: create_collection with an explicit schema, create/describe/drop index, load, insert,
upsert, delete by expression, query with a filter and output fields (``count(*)`` included), search
with a filter and search params, flush.

Collections
    ``COLLECTION`` holds one entity per row: ``id`` (INT64 primary key), ``vector`` (FLOAT_VECTOR of the
    model's dimension, inner-product index) and one scalar field per ``Record`` field (``box`` as
    ``x1, y1, x2, y2``). It is created by ``bind`` (the dimension comes from the model) and dropped and
    recreated by ``bind(..., rebuild=True)``.

    ``reid_meta`` (one per database, shared by every gallery there) holds small key/value entities keyed
    ``COLLECTION/NAME``: the bound model (``fingerprint``, ``model_source``, ``dim``), the wanted ``kind``,
    the id counter ``next_id``, the write ``generation`` and the ``synced`` generation, the writer lease
    ``writer``, and one ``media:PATH`` entity per video (its ``MediaState`` as JSON). Milvus 2.3 needs a
    vector field in every collection: ``reid_meta`` has a 2-d zero vector nobody searches.

Nulls
    Milvus 2.3 has no NULL. ``None`` is stored as a sentinel and decoded back to ``None``:
    INT64 fields (``pid``, ``camid``, ``frame``, ``track``, ``x1``..``y2``): ``-2**63`` (``NULL_INT``);
    DOUBLE fields (``time``, ``score``): NaN (every comparison with NaN is false, so a time range leaves
    rows without a time out, as SQL's NULL does); VARCHAR fields (``camera``, ``media``): the empty
    string. So a stored ``-2**63``, NaN or ``""`` reads back as ``None`` (none is a meaningful value of
    those fields), and a filter on camera ``-2**63`` or camera name ``""`` matches nothing.

Ids
    Row ids are allocated by the writer from the ``next_id`` counter in ``reid_meta``: it reserves the
    block and stores the counter (strongly consistent) before the rows are inserted, so a writer killed
    mid-add skips ids rather than reusing them; a rebuild keeps the counter. Ids start at 1, ascend,
    and are never reused, across processes and restarts, as long as one writer at a time allocates
    (the lease below).

Writer lease
    Writes need ``write=True``, which takes the lease: the ``writer`` entity (a random token, host, pid
    and a heartbeat time renewed every ``LEASE_TTL / 3`` seconds by a daemon thread). A lease is free
    when it is absent, its heartbeat is older than ``LEASE_TTL`` seconds, or its holder is a dead process
    on this host (so a writer killed by SIGKILL does not block the next one). Taking it is write then
    read back; Milvus has no compare-and-swap, so two writers starting within the same few milliseconds
    could both believe they won until the next heartbeat shows one of them its loss (it then refuses
    writes). It guards against the usual mistake (two indexing runs), not against a hostile client.

Consistency
    The collections are created with, and every read (query, count, search) asks for, ``Strong``
    consistency: a read sees every write acknowledged before it, including deletes (the default
    ``Bounded`` level returned just-deleted rows).

Differs from the embedded store
    - ``add`` is not one transaction: it inserts the new rows, then deletes the replaced ones; a writer
      killed in between leaves the old row of a path beside the new one until that path is next added
      or removed (``states`` reports the newer one). ``touch`` is an upsert per row.
    - ``sync`` flushes both collections (sealing growing segments, so the index covers them; ~2-3 s) and
      brings the index to the wanted kind; ``verify`` says ``stale`` when rows changed after the last
      ``sync`` (by the write generation) or the index is of another kind. Searches are right either way.
    - Kinds: ``auto`` and ``hnsw`` are HNSW (M 32, efConstruction 64; search ef = max(k, 128)), ``flat`` is
      FLAT (exact), ``ivfpq`` is IVF_SQ8 (nlist 1024, nprobe 64). Segments below Milvus's index threshold
      (1024 rows) are scanned exactly.
    - ``k`` is capped at 16384 (Milvus's top-k limit); ``scan`` reads the matching ids first.

Credentials come from the environment, never from the location: ``REID_MILVUS_TOKEN``, or
``REID_MILVUS_USER`` and ``REID_MILVUS_PASSWORD``; ``REID_MILVUS_TLS=1`` (or ``REID_MILVUS_CA``, a CA
file) for TLS; ``REID_MILVUS_TIMEOUT`` (seconds, default 10) for each call. They never appear in
messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from reid.errors import EmptyGalleryError, GalleryBusyError, GalleryNotFoundError, ModelMismatchError, StoreError
from reid.store.base import FileState, Filter, Hit, MediaState, Record, SyncState, Tracklet, group_by_filter, per_query
from reid.store.schema import now
from reid.store.vectors import KINDS

if TYPE_CHECKING:
    from reid.model.identity import ModelRef

log = logging.getLogger(__name__)

META_COLLECTION = "reid_meta"
NULL_INT = -(2**63)
MAX_TOPK = 16384
LEASE_TTL = 30.0
CHUNK = 1000  # ids or paths per expression
INSERT_CHUNK = 2000
_VARCHAR_MAX = 65535
_STRINGS = {"path": _VARCHAR_MAX, "sha256": 256, "source": _VARCHAR_MAX, "camera": 4096, "media": _VARCHAR_MAX}
_INTS = ("bytes", "mtime", "pid", "camid", "frame", "x1", "y1", "x2", "y2", "track")
_NULLABLE_INTS = ("pid", "camid", "frame", "track")
_OUTPUT = ("id", "path", "sha256", "bytes", "mtime", "pid", "camid", "source", "time", "camera", "media", "frame",
           "x1", "y1", "x2", "y2", "score", "track")
# kind -> (Milvus index type, build params, search params for k)
_INDEXES = {
    "auto": ("HNSW", {"M": 32, "efConstruction": 64}),
    "hnsw": ("HNSW", {"M": 32, "efConstruction": 64}),
    "flat": ("FLAT", {}),
    "ivfpq": ("IVF_SQ8", {"nlist": 1024}),
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_LOCATION = re.compile(r"milvus://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(?P<port>[0-9]{1,5})"
                       r"/(?P<name>[^/?#]*)")
STRONG = {"consistency_level": "Strong"}


@dataclass(frozen=True)
class MilvusLocation:
    """A parsed ``milvus://HOST:PORT/COLLECTION``."""

    host: str
    port: int
    collection: str

    def __str__(self) -> str:
        return f"milvus://{self.host}:{self.port}/{self.collection}"

    @classmethod
    def parse(cls, text: str) -> MilvusLocation:
        """StoreError (without echoing credentials) unless ``text`` is ``milvus://HOST:PORT/COLLECTION``."""
        head = text.partition("://")[2].partition("/")[0]
        if "@" in head:
            raise StoreError("a milvus:// location takes no credentials; set REID_MILVUS_TOKEN or REID_MILVUS_USER "
                             "and REID_MILVUS_PASSWORD instead")
        m = _LOCATION.fullmatch(text)
        if m is None:
            raise StoreError(f"not a Milvus location: {text!r}; expected milvus://HOST:PORT/COLLECTION")
        port, name = int(m["port"]), m["name"]
        if not 0 < port < 65536:
            raise StoreError(f"not a Milvus location: {text!r}; the port must be 1-65535")
        if not _NAME.fullmatch(name) or name == META_COLLECTION:
            raise StoreError(f"not a Milvus location: {text!r}; the collection name must be letters, digits and "
                             f"underscores (at most 200, not starting with a digit, not {META_COLLECTION})")
        return cls(m["host"], port, name)


def _secrets() -> list[str]:
    return [v for k in ("REID_MILVUS_TOKEN", "REID_MILVUS_PASSWORD") if (v := os.environ.get(k))]


def _reason(e: BaseException) -> str:
    """An exception as one line, with any secret from the environment blanked out."""
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    text = " ".join(str(text).split())
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text[:300]


def _client_kwargs(loc: MilvusLocation, timeout: float) -> dict[str, Any]:
    env = os.environ
    ca = env.get("REID_MILVUS_CA")
    tls = env.get("REID_MILVUS_TLS", "").lower() in ("1", "true", "yes") or bool(ca)
    kwargs: dict[str, Any] = {"uri": f"{'https' if tls else 'http'}://{loc.host}:{loc.port}", "timeout": timeout}
    if env.get("REID_MILVUS_TOKEN"):
        kwargs["token"] = env["REID_MILVUS_TOKEN"]
    elif env.get("REID_MILVUS_USER"):
        kwargs["user"], kwargs["password"] = env["REID_MILVUS_USER"], env.get("REID_MILVUS_PASSWORD", "")
    if tls:
        kwargs["secure"] = True
    if ca:
        kwargs["server_pem_path"] = ca
    return kwargs


def _lit(value: str | int) -> str:
    """A string or integer as a Milvus expression literal."""
    return json.dumps(value) if isinstance(value, str) else str(int(value))


def _num(x: float) -> str:
    x = float(x)
    if math.isinf(x):
        return "1.7976931348623157e308" if x > 0 else "-1.7976931348623157e308"
    return repr(x)


def _in(field: str, values: Iterable, *, negate: bool = False) -> str:
    return f"{field} {'not in' if negate else 'in'} [{', '.join(_lit(v) for v in sorted(values))}]"


def filter_expr(where: Filter | None) -> str | None:
    """``where`` as a Milvus boolean expression ("" for no filter, None when no row can pass)."""
    if where is None or where.is_empty:
        return ""
    parts: list[str] = []
    for field, values in (("camid", where.cameras), ("source", where.sources), ("pid", where.pids),
                          ("camera", where.camera_names)):
        if values is not None:
            values = {v for v in values if v != NULL_INT and v != ""}  # sentinels mean None, which never matches
            if not values:
                return None
            parts.append(_in(field, values))
    if where.cameras_excluded:  # rows without a camera hold NULL_INT, never in the list: they stay
        parts.append(_in("camid", where.cameras_excluded, negate=True))
    if where.since is not None:
        parts.append(f"time >= {_num(where.since)}")  # NaN (no time) fails every comparison
    if where.until is not None:
        parts.append(f"time <= {_num(where.until)}")
    return " and ".join(parts)


def _and(*exprs: str) -> str:
    return " and ".join(f"({e})" for e in exprs if e) or "id >= 0"


def _encode(rid: int, r: Record, v: np.ndarray) -> dict[str, Any]:
    box = r.box if r.box is not None else (None,) * 4
    row = {"id": int(rid), "vector": v.tolist(), "path": r.path, "sha256": r.sha256, "bytes": int(r.bytes),
           "mtime": int(r.mtime), "source": r.source, "camera": r.camera or "", "media": r.media or "",
           "time": math.nan if r.time is None else float(r.time),
           "score": math.nan if r.score is None else float(r.score)}
    for name, value in (("pid", r.pid), ("camid", r.camid), ("frame", r.frame), ("track", r.track),
                        *zip(("x1", "y1", "x2", "y2"), box, strict=True)):
        row[name] = NULL_INT if value is None else int(value)
    for name, limit in _STRINGS.items():
        if len(row[name].encode()) > limit:
            raise StoreError(f"{name} of {r.path[:200]!r} is longer than Milvus's {limit} bytes")
    return row


def _none(value, null=NULL_INT):
    return None if value == null else value


def _float(value) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _decode(e: dict[str, Any]) -> Record:
    x1 = _none(e["x1"])
    box = None if x1 is None else (int(x1), int(e["y1"]), int(e["x2"]), int(e["y2"]))
    return Record(e["path"], e["sha256"], int(e["bytes"]), int(e["mtime"]), _none(e["pid"]), _none(e["camid"]),
                  e["source"], time=_float(e["time"]), camera=e["camera"] or None, media=e["media"] or None,
                  frame=_none(e["frame"]), box=box, score=_float(e["score"]), track=_none(e["track"]))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MilvusGallery:
    """A gallery in a Milvus collection (the ``Gallery`` protocol). Open with ``write=True`` to hold the lease."""

    def __init__(self, loc: MilvusLocation, client, timeout: float) -> None:
        self._loc = loc
        self._client = client
        self._timeout = timeout
        self._name = loc.collection
        self._lease: str | None = None  # our token while we hold the writer lease
        self._lease_lost = False
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()
        self._next_id: int | None = None
        self._closed = False

    # --- opening and closing ----------------------------------------------------------------

    @classmethod
    def open(cls, location: str | MilvusLocation, *, write: bool = False, wait: float = 0.0,
             prefetch: bool = False, timeout: float | None = None) -> MilvusGallery:
        """Connect to the server; ``write`` creates the gallery if needed and takes the writer lease (waiting up
        to ``wait`` s). ``prefetch`` is accepted for the protocol's callers (the server keeps vectors loaded)."""
        loc = location if isinstance(location, MilvusLocation) else MilvusLocation.parse(location)
        if timeout is None:
            timeout = float(os.environ.get("REID_MILVUS_TIMEOUT") or 10.0)
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise StoreError(f"{loc} needs the Milvus client: pip install 'reid-gallery[milvus]'") from None
        try:
            client = MilvusClient(**_client_kwargs(loc, timeout))
        except Exception as e:  # noqa: BLE001 - any failure to connect is one line naming the server
            raise StoreError(f"cannot connect to the Milvus server of {loc}: {_reason(e)}") from None
        g = cls(loc, client, timeout)
        try:
            g._start(write, wait)
        except BaseException:
            g.close()
            raise
        return g

    def _start(self, write: bool, wait: float) -> None:
        if not write:
            if not self._has(META_COLLECTION) or "created_at" not in self._meta():
                raise GalleryNotFoundError(str(self._loc))
            self._ensure_loaded(META_COLLECTION)
            if self._has(self._name):
                self._ensure_loaded(self._name)
            return
        self._ensure_meta_collection()
        self._acquire(wait)
        meta = self._meta()
        if "created_at" not in meta:
            self._set({"created_at": now(), "next_id": "1", "generation": "0", "synced": "0"})
        elif self._has(self._name):
            self._ensure_loaded(self._name)

    @property
    def location(self) -> str:
        """``milvus://HOST:PORT/COLLECTION``."""
        return str(self._loc)

    def close(self) -> None:
        """Stop the heartbeat, release the lease and the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self._lease is not None:
            with contextlib.suppress(Exception):
                if self._lease_holder().get("token") == self._lease:
                    self._delete_keys(["writer"])
            self._lease = None
        with contextlib.suppress(Exception):
            self._client.close()

    def __enter__(self) -> MilvusGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- low level --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - pymilvus and grpc errors become one line naming the gallery
            raise StoreError(f"Milvus {self._loc}: {what} failed: {_reason(e)}") from None

    def _has(self, name: str) -> bool:
        with self._errors("has_collection"):
            return bool(self._client.has_collection(name))

    def _ensure_loaded(self, name: str) -> None:
        with self._errors(f"loading {name}"):
            state = str(self._client.get_load_state(name).get("state"))
            if "Loaded" not in state or "NotLoad" in state:
                self._client.load_collection(name)

    def _query(self, name: str, expr: str, fields: Sequence[str], limit: int | None = None) -> list[dict]:
        kwargs = {"limit": limit} if limit else {}
        with self._errors("query"):
            return list(self._client.query(name, filter=expr, output_fields=list(fields), **STRONG, **kwargs))

    def _query_in(self, field: str, values: Sequence, fields: Sequence[str], extra: str = "") -> list[dict]:
        found: list[dict] = []
        values = list(dict.fromkeys(values))
        for s in range(0, len(values), CHUNK):
            found += self._query(self._name, _and(_in(field, values[s : s + CHUNK]), extra), fields)
        return found

    def _delete_ids(self, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        with self._errors("delete"):
            for s in range(0, len(ids), CHUNK):
                self._client.delete(self._name, filter=_in("id", ids[s : s + CHUNK]))

    # --- meta (reid_meta) ---------------------------------------------------------------------

    def _ensure_meta_collection(self) -> None:
        if self._has(META_COLLECTION):
            self._ensure_loaded(META_COLLECTION)
            return
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=_VARCHAR_MAX)
        schema.add_field("gallery", DataType.VARCHAR, max_length=256)
        schema.add_field("value", DataType.VARCHAR, max_length=_VARCHAR_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        index = MilvusClient.prepare_index_params()
        index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        try:
            self._client.create_collection(META_COLLECTION, schema=schema, index_params=index, **STRONG)
        except Exception as e:  # noqa: BLE001 - another process may have created it meanwhile
            if not self._has(META_COLLECTION):
                raise StoreError(f"Milvus {self._loc}: cannot create {META_COLLECTION}: {_reason(e)}") from None
        self._ensure_loaded(META_COLLECTION)

    def _key(self, name: str) -> str:
        return f"{self._name}/{name}"

    def _meta_rows(self, expr: str = "") -> dict[str, str]:
        rows = self._query(META_COLLECTION, _and(f"gallery == {_lit(self._name)}", expr), ["key", "value"])
        cut = len(self._name) + 1
        return {r["key"][cut:]: r["value"] for r in rows}

    def _meta(self) -> dict[str, str]:
        """Every meta value of this gallery but the media states."""
        return {k: v for k, v in self._meta_rows().items() if not k.startswith("media:")}

    def _set(self, values: dict[str, str]) -> None:
        rows = [{"key": self._key(k), "gallery": self._name, "value": str(v), "vector": [0.0, 0.0]}
                for k, v in values.items()]
        with self._errors("writing meta"):
            self._client.upsert(META_COLLECTION, rows)

    def _delete_keys(self, names: Sequence[str]) -> None:
        keys = [self._key(n) for n in names]
        with self._errors("deleting meta"):
            for s in range(0, len(keys), CHUNK):
                self._client.delete(META_COLLECTION, filter=_in("key", keys[s : s + CHUNK]))

    # --- writer lease -----------------------------------------------------------------------

    def _lease_holder(self) -> dict:
        value = self._meta_rows(f"key == {_lit(self._key('writer'))}").get("writer")
        try:
            return json.loads(value) if value else {}
        except ValueError:
            return {}

    @staticmethod
    def _lease_free(holder: dict) -> bool:
        if not holder:
            return True
        if time.time() - float(holder.get("beat", 0)) > LEASE_TTL:
            return True
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))

    def _write_lease(self) -> None:
        self._set({"writer": json.dumps({"token": self._lease, "host": socket.gethostname(), "pid": os.getpid(),
                                         "beat": time.time()})})

    def _acquire(self, wait: float) -> None:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            holder = self._lease_holder()
            if self._lease_free(holder):
                self._lease = token
                self._write_lease()
                time.sleep(0.05)  # let a racing writer's lease land, then see who won
                holder = self._lease_holder()
                if holder.get("token") == token:
                    self._beat = threading.Thread(target=self._heartbeat, name="reid-milvus-lease", daemon=True)
                    self._beat.start()
                    return
                self._lease = None
            if time.monotonic() >= deadline:
                who = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
                if wait > 0:
                    raise GalleryBusyError(self.location, f"gallery {self.location} is still being written by {who} "
                                           f"after waiting {wait:g} s; try again when it has finished", wait)
                raise GalleryBusyError(self.location, f"gallery {self.location} is being written by {who}; wait for "
                                       f"it to finish")
            time.sleep(0.2)

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_TTL / 3):
            try:
                if self._lease_holder().get("token") != self._lease:
                    self._lease_lost = True
                    log.error("%s: another writer took the lease; this one refuses further writes", self.location)
                    return
                self._write_lease()
            except Exception as e:  # noqa: BLE001 - keep beating; a later beat may get through
                log.warning("%s: renewing the writer lease failed: %s", self.location, _reason(e))

    def _need_writer(self) -> None:
        if self._lease is None:
            raise StoreError(f"gallery {self.location} was opened read-only; open it with write=True to change it")
        if self._lease_lost:
            raise StoreError(f"gallery {self.location}: another writer took over the writer lease")

    # --- the model --------------------------------------------------------------------------

    def built_with(self) -> ModelRef | None:
        """The model the vectors come from (None before the first ``bind``)."""
        return self._model(self._meta())

    @staticmethod
    def _model(meta: dict[str, str]) -> ModelRef | None:
        if not meta.get("fingerprint"):
            return None
        from reid.model.identity import DEFAULT_SOURCE, ModelRef

        return ModelRef(meta.get("model_source") or DEFAULT_SOURCE, meta["fingerprint"], int(meta["dim"]))

    def bind(self, model: ModelRef, *, kind: str | None = None, rebuild: bool = False) -> None:
        """Record the model of a new gallery (or of a ``rebuild``: every row dropped); ModelMismatchError for
        any other model."""
        self._need_writer()
        if kind is not None and kind not in KINDS:
            raise StoreError(f"unknown index kind {kind!r}; expected one of: {', '.join(KINDS)}")
        meta = self._meta()
        current = meta.get("fingerprint")
        if current is None or rebuild:
            if rebuild and current is not None:
                log.warning("rebuilding %s: dropping every row embedded by %s", self.location, meta.get("model_source"))
            kind = kind or meta.get("kind") or "auto"
            self._create_data(int(model.dim), kind)
            self._delete_keys(list(self.media_states_keys()))
            generation = str(int(meta.get("generation", 0)) + 1)
            self._set({"fingerprint": model.fingerprint, "model_source": model.source, "dim": str(model.dim),
                       "kind": kind, "generation": generation, "synced": generation, "updated_at": now()})
            return
        if current != model.fingerprint:
            raise ModelMismatchError(self.location, built_with=self._model(meta), given=model)
        updates = {}
        if model.source != meta.get("model_source"):
            updates["model_source"] = model.source  # the same weights, moved
        if kind is not None and kind != meta.get("kind"):
            updates["kind"] = kind  # the index follows on the next sync
        if updates:
            self._set(updates)

    def _index_params(self, kind: str):
        from pymilvus import MilvusClient

        index_type, params = _INDEXES[kind]
        index = MilvusClient.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
        return index

    def _create_data(self, dim: int, kind: str) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        for name in _OUTPUT[1:]:
            if name in _STRINGS:
                schema.add_field(name, DataType.VARCHAR, max_length=_STRINGS[name])
            elif name in _INTS:
                schema.add_field(name, DataType.INT64)
            else:
                schema.add_field(name, DataType.DOUBLE)
        with self._errors("creating the collection"):
            if self._client.has_collection(self._name):
                self._client.drop_collection(self._name)
            self._client.create_collection(self._name, schema=schema, **STRONG)
            # An empty collection's index is built at once: skip pymilvus's polling (0.5 s sleeps).
            self._client.create_index(self._name, self._index_params(kind), sync=False)
            self._client.load_collection(self._name)

    def _dim(self) -> int | None:
        d = self._meta().get("dim")
        return int(d) if d else None

    # --- rows -------------------------------------------------------------------------------

    def _allocate(self, n: int) -> list[int]:
        """Reserve ``n`` new ids (stored before use) and mark the rows changed."""
        meta = self._meta()
        first = max(int(meta.get("next_id", 1)), self._next_id or 1)
        self._next_id = first + n
        self._set({"next_id": str(first + n), "generation": str(int(meta.get("generation", 0)) + 1),
                   "updated_at": now()})
        return list(range(first, first + n))

    def _changed(self) -> None:
        meta = self._meta()
        self._set({"generation": str(int(meta.get("generation", 0)) + 1), "updated_at": now()})

    def add(self, records: Sequence[Record], vectors: np.ndarray) -> list[int]:
        """Store rows with their embeddings; a row of the same path is replaced. Returns the new ids."""
        self._need_writer()
        vectors = np.asarray(vectors, dtype=np.float32)
        dim = self._dim()
        if dim is None:
            raise StoreError(f"gallery {self.location} has no model bound yet")
        if len(records) and (vectors.ndim != 2 or vectors.shape[1] != dim):
            raise StoreError(f"vectors of shape {vectors.shape} do not fit gallery {self.location} (dimension {dim})")
        if len(records) != len(vectors):
            raise ValueError(f"{len(records)} records but {len(vectors)} vectors")
        if not records:
            return []
        paths = [r.path for r in records]
        old = [int(r["id"]) for r in self._query_in("path", paths, ["id"])]
        ids = self._allocate(len(records))
        rows = [_encode(i, r, v) for i, r, v in zip(ids, records, vectors, strict=True)]
        with self._errors("insert"):
            for s in range(0, len(rows), INSERT_CHUNK):
                self._client.insert(self._name, rows[s : s + INSERT_CHUNK])
        last = {p: i for i, p in enumerate(paths)}
        old += [ids[i] for i, p in enumerate(paths) if last[p] != i]  # a path given twice: the last one stays
        if old:
            self._delete_ids(old)
        return ids

    def remove(self, paths: Iterable[str]) -> int:
        """Delete the rows of these paths; returns how many existed."""
        self._need_writer()
        paths = list(paths)
        if not paths or not self._has(self._name):
            return 0
        found = self._query_in("path", paths, ["id", "path"])
        if found:
            self._changed()
            self._delete_ids([r["id"] for r in found])
        return len({r["path"] for r in found})

    def get(self, ids: Iterable[int]) -> dict[int, Record]:
        """id -> Record for the ids that exist."""
        ids = [int(i) for i in ids]
        if not ids or not self._has(self._name):
            return {}
        return {int(e["id"]): _decode(e) for e in self._query_in("id", ids, _OUTPUT)}

    def count(self, where: Filter | None = None) -> int:
        """Number of rows (that ``where`` lets through)."""
        expr = filter_expr(where)
        if expr is None or not self._has(self._name):
            return 0
        rows = self._query(self._name, _and(expr), ["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def scan(self, where: Filter | None = None) -> Iterator[tuple[int, Record]]:
        """(id, Record) of every row (that ``where`` lets through), in id order."""
        expr = filter_expr(where)
        if expr is None or not self._has(self._name):
            return
        ids = sorted(int(r["id"]) for r in self._query(self._name, _and(expr), ["id"]))
        for s in range(0, len(ids), CHUNK):
            got = self.get(ids[s : s + CHUNK])
            yield from ((i, got[i]) for i in ids[s : s + CHUNK] if i in got)

    def search(self, queries: np.ndarray, k: int, where: Filter | Sequence[Filter] | None = None
               ) -> list[list[Hit]]:
        """Top-``k`` rows by inner product per query (float32 [nq, dim]), best first, among those ``where`` lets
        through: the filter is a boolean expression inside Milvus's search (one search per distinct filter)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        meta = self._meta()
        dim = int(meta["dim"]) if meta.get("dim") else None
        if dim is None or self.count() == 0:
            raise EmptyGalleryError(self.location)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise StoreError(f"query vectors of shape {queries.shape} do not fit gallery {self.location} "
                             f"(dimension {dim})")
        filters = per_query(where, len(queries))
        limit = min(k, MAX_TOPK)
        params = self._search_params(meta.get("kind") or "auto", limit)
        found: list[list[Hit]] = [[] for _ in range(len(queries))]
        for f, at in group_by_filter(filters).items():
            expr = filter_expr(f)
            if expr is None:
                continue  # no row passes
            with self._errors("search"):
                res = self._client.search(self._name, data=queries[at].tolist(), limit=limit, filter=expr,
                                          output_fields=list(_OUTPUT[1:]), search_params=params, **STRONG)
            for q, hits in zip(at, res, strict=True):
                found[q] = [Hit(int(h["id"]), float(h["distance"]), _decode(h["entity"])) for h in hits]
        return found

    def _search_params(self, kind: str, k: int) -> dict:
        index_type = self._index_type() or _INDEXES[kind][0]
        params = {"HNSW": {"ef": max(k, 128)}, "IVF_SQ8": {"nprobe": 64}}.get(index_type, {})
        return {"metric_type": "IP", "params": params}

    # --- file states ------------------------------------------------------------------------

    def states(self, under: str | None = None) -> dict[str, FileState]:
        """path -> stored file state of every crop-file row (rows with no ``media``), optionally under a folder."""
        if not self._has(self._name):
            return {}
        expr, prefix = 'media == ""', None
        if under is not None:
            prefix = under.rstrip("/") + "/"
            if not re.search(r'[%_\\"]', prefix):
                expr += f" and path like {_lit(prefix + '%')}"
        found: dict[str, FileState] = {}
        for r in self._query(self._name, expr, ["id", "path", "sha256", "bytes", "mtime"]):
            p = r["path"]
            if (prefix is None or p.startswith(prefix)) and (p not in found or found[p].id < r["id"]):
                found[p] = FileState(int(r["id"]), r["sha256"], int(r["bytes"]), int(r["mtime"]))
        return found

    def embeddings_by_sha(self, shas: Iterable[str]) -> dict[str, np.ndarray]:
        """sha256 -> a stored embedding of a crop file with that content."""
        shas = list(shas)
        if not shas or not self._has(self._name):
            return {}
        return {r["sha256"]: np.asarray(r["vector"], dtype=np.float32)
                for r in self._query_in("sha256", shas, ["sha256", "vector"], 'media == ""')}

    def touch(self, stats: Sequence[tuple[str, int, int]]) -> None:
        """Record new (path, bytes, mtime) of files whose content is unchanged (an upsert of their rows)."""
        self._need_writer()
        new = {p: (int(b), int(m)) for p, b, m in stats}
        if not new or not self._has(self._name):
            return
        rows = self._query_in("path", list(new), ["id", "vector", *_OUTPUT[1:]])
        for r in rows:
            r["bytes"], r["mtime"] = new[r["path"]]
        with self._errors("upsert"):
            for s in range(0, len(rows), INSERT_CHUNK):
                self._client.upsert(self._name, rows[s : s + INSERT_CHUNK])

    # --- footage ----------------------------------------------------------------------------

    def tracklets(self, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Tracklet]:
        """(source, track) -> the tracklet's span, for the keys that have rows (one query per source)."""
        by_source: dict[str, set[int]] = {}
        for source, track in keys:
            by_source.setdefault(source, set()).add(int(track))
        if not by_source or not self._has(self._name):
            return {}
        rows: dict[tuple[str, int], list[dict]] = {}
        for source, tracks in by_source.items():
            for r in self._query_in("track", sorted(tracks), ["track", "time", "frame"],
                                    f'source == {_lit(source)} and media != ""'):
                rows.setdefault((source, int(r["track"])), []).append(r)
        found = {}
        for key, rs in rows.items():
            times = [t for r in rs if (t := _float(r["time"])) is not None]
            frames = [int(r["frame"]) for r in rs if r["frame"] != NULL_INT]
            found[key] = Tracklet(min(times, default=None), max(times, default=None), min(frames, default=None),
                                  max(frames, default=None), len(rs))
        return found

    def media_states_keys(self) -> Iterator[str]:
        """The meta names of the media states (``media:PATH``)."""
        return (k for k in self._meta_rows(f"key like {_lit(self._name + '/media:%')}") if k.startswith("media:"))

    def media_states(self) -> dict[str, MediaState]:
        """path -> progress of every video (or full frame) indexing has started on."""
        found = {}
        for k, v in self._meta_rows(f"key like {_lit(self._name + '/media:%')}").items():
            if k.startswith("media:"):
                state = MediaState(**json.loads(v))
                found[state.path] = state
        return found

    def save_media(self, state: MediaState) -> None:
        """Record a video's progress (replacing its previous state)."""
        self._need_writer()
        self._set({f"media:{state.path}": json.dumps(asdict(state))})

    def remove_media(self, path: str, from_frame: int = 0) -> int:
        """Delete the rows cut from ``path`` at ``from_frame`` or later (and its progress, for 0)."""
        self._need_writer()
        removed: list[int] = []
        if self._has(self._name):
            expr = f'source == {_lit(path)} and media != "" and frame >= {int(from_frame)}'
            removed = [int(r["id"]) for r in self._query(self._name, expr, ["id"])]
        if removed:
            self._changed()
            self._delete_ids(removed)
        if from_frame <= 0:
            self._delete_keys([f"media:{path}"])
        return len(removed)

    # --- sync, verify, info -----------------------------------------------------------------

    def _index_type(self) -> str | None:
        with self._errors("describe_index"):
            names = self._client.list_indexes(self._name)
            if not names:
                return None
            return str(self._client.describe_index(self._name, names[0]).get("index_type"))

    def _assess(self, meta: dict[str, str]) -> SyncState:
        if not self._has(self._name):
            return SyncState("fresh" if not meta.get("dim") else "missing", f"no collection {self._name}")
        have = self._index_type()
        want = _INDEXES[meta.get("kind") or "auto"][0]
        kind = have.lower() if have else None
        if have is None:
            return SyncState("missing", f"collection {self._name} has no vector index", None)
        if have != want:
            return SyncState("stale", f"it has a {have} index, the gallery wants {want}", kind)
        if meta.get("generation", "0") != meta.get("synced", "0"):
            return SyncState("stale", "rows changed since the last sync (flush)", kind)
        return SyncState("fresh", "", kind)

    def verify(self) -> SyncState:
        """The state of the collection's index and flushed segments, changing nothing."""
        return self._assess(self._meta())

    def sync(self) -> SyncState:
        """Flush the rows (sealed segments get indexed) and bring the index to the wanted kind; returns the
        state found before. Without the writer lease it only flushes."""
        meta = self._meta()
        state = self._assess(meta)
        if not self._has(self._name):
            return state
        with self._errors("flush"):
            self._client.flush(self._name)
        if self._lease is None or self._lease_lost:
            return state
        want = meta.get("kind") or "auto"
        if state.state in ("stale", "missing") and self._index_type() != _INDEXES[want][0]:
            log.info("rebuilding the index of %s as %s", self.location, _INDEXES[want][0])
            with self._errors("rebuilding the index"):
                self._client.release_collection(self._name)
                for name in self._client.list_indexes(self._name):
                    self._client.drop_index(self._name, name)
                self._client.create_index(self._name, self._index_params(want))
                self._client.load_collection(self._name)
        self._set({"synced": meta.get("generation", "0")})
        return state

    def info(self) -> dict[str, object]:
        """Rows, dimension, kinds, model, the server and collections, and the state of the index."""
        meta = self._meta()
        state = self._assess(meta)
        media = self.media_states()
        kind = meta.get("kind", "auto")
        return {
            "index": self.location,
            "backend": "milvus",
            "collection": self._name,
            "meta_collection": META_COLLECTION,
            "rows": self.count(),
            "dim": int(meta["dim"]) if meta.get("dim") else None,
            "kind": kind,
            "vector_kind": state.kind or _INDEXES.get(kind, _INDEXES["auto"])[0].lower(),
            "vectors": state.state,
            "fingerprint": meta.get("fingerprint"),
            "model_source": meta.get("model_source"),
            "metric": "inner_product",
            "next_id": int(meta.get("next_id", 1)),
            "created_at": meta.get("created_at"),
            "updated_at": meta.get("updated_at"),
            "footage": {"sources": len(media), "done": sum(m.done for m in media.values()),
                        "people": sum(m.people for m in media.values())},
        }
