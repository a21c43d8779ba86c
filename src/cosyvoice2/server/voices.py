"""The server's voice library: voices users clone once and reuse by id (or name), from any server.

Rows and voice files live behind the interfaces of ``storage.py``: by default a SQLite file and a
directory in the data directory (one machine)::

    voices.sqlite3          one row per voice: id, namespace, name, transcript, duration, file, created time
    voices/<id>.voice       the VoiceReference (safetensors + JSON metadata), written atomically

and for several servers or Ray Serve replicas a PostgreSQL table with a shared directory or an S3 bucket.
The guarantees are the same on every combination:

* **visible everywhere at once**: a voice file is stored whole before its row is committed, and every
  lookup asks the database, so once ``add`` returns every server finds the voice and can load its file.
* **no half voices**: a row is deleted before its file, so a crash at any point leaves at worst a file
  without a row, which nothing lists or loads. ``reconcile`` (run at each start) removes such files, and
  temp files, once they are older than ``orphan_grace`` seconds (0 when this process is the library's
  only user; on a shared library, long enough that another server's voice between its file and its row
  is never taken for one). An exclusive library also drops rows whose file is gone (a disk restored
  from an older backup, a file deleted by hand); a shared one only logs them (a share that is not mounted
  must not empty the library), and such a voice answers "not found" when it is used.
* **deleting is idempotent**: deleting a voice twice, or from two servers at once, removes it once; the
  second call finds nothing (404) and changes nothing.
* **names are unique per namespace**: the database refuses a second voice with a name (``NameTaken``,
  409), also when two servers create it at the same moment. Several deployments may share one database
  under different namespaces.

Loaded voices are kept in a small in-memory LRU per process, so a saved voice starts as fast as a
built-in one; ids are never reused and voice files never change, so a cached voice is always current,
and every request still looks its voice up in the database first (a voice deleted elsewhere is gone).
The model's prompt cache (flow state, LM prefix) is per process too, and is rebuilt by whichever server
first serves a voice.

Ids are generated here (``v_`` + 16 hex digits) and every id from a request is checked against
``ID_PATTERN`` before it is used in a path or a key, so no request can name a file outside the store.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from cosyvoice2.errors import InputError
from cosyvoice2.fileio import fsync_dir  # noqa: F401 - re-exported (tests patch it here)
from cosyvoice2.voice import VoiceReference

from .storage import (
    DEFAULT_NAMESPACE,
    BlobStore,
    LocalBlobs,
    NameTaken,
    SQLiteIndex,
    StorageUnavailable,
    VoiceIndex,
    VoiceRow,
    is_temp_name,
    open_blobs,
    open_index,
)

__all__ = [
    "ID_PATTERN",
    "NameTaken",
    "StorageUnavailable",
    "VoiceInfo",
    "VoiceNotFound",
    "VoiceStore",
    "clean_name",
    "open_voice_store",
    "valid_id",
]

log = logging.getLogger("cosyvoice2.server")

ID_PATTERN = re.compile(r"v_[0-9a-f]{16}")
MAX_NAME_CHARS = 64
MAX_TRANSCRIPT_CHARS = 1000
SHARED_ORPHAN_GRACE = 3600.0  # seconds a file without a row is left alone in a shared library
_NAME_PATTERN = re.compile(r"[^\x00-\x1f\x7f]+")  # any printable text, no control characters


class VoiceNotFound(KeyError):
    """No saved voice has this id (or name)."""


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    name: str | None
    text: str | None
    duration: float
    created_at: float
    bytes: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["object"] = "voice"
        d["created_at"] = int(self.created_at)
        d["duration"] = round(self.duration, 3)
        d["has_transcript"] = bool(self.text)
        return d

    @classmethod
    def of(cls, row: VoiceRow) -> VoiceInfo:
        return cls(row.id, row.name, row.text, row.duration, row.created_at, row.bytes)


def valid_id(voice_id: str) -> bool:
    return isinstance(voice_id, str) and ID_PATTERN.fullmatch(voice_id) is not None


def clean_name(name: str | None) -> str | None:
    """A user-given voice name: stripped, at most MAX_NAME_CHARS, no control characters; '' -> None."""
    if name is None:
        return None
    name = name.strip()
    if not name:
        return None
    if len(name) > MAX_NAME_CHARS:
        raise InputError(f"voice name is too long ({len(name)} characters, at most {MAX_NAME_CHARS})")
    if not _NAME_PATTERN.fullmatch(name):
        raise InputError("voice name must not contain control characters")
    if valid_id(name):
        raise InputError("voice name must not look like a voice id")
    if name.lower() == "default":
        raise InputError("'default' names the model's default voice; choose another name")
    return name


class VoiceStore:
    """Voice rows + voice files + an LRU of loaded voices. Safe to use from several threads, and from
    several processes or machines sharing one library (``shared=True``).

    ``VoiceStore(data_dir)`` is the single-machine library (SQLite + files in ``data_dir``); pass ``index``
    and ``blobs`` for others (``open_voice_store`` builds them from settings). ``shared`` (default: True
    unless both are the local defaults) keeps ``reconcile`` from removing what another server may be in
    the middle of writing.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        cache_size: int = 32,
        *,
        index: VoiceIndex | None = None,
        blobs: BlobStore | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        shared: bool | None = None,
        orphan_grace: float | None = None,
    ) -> None:
        if data_dir is None and (index is None or blobs is None):
            raise ValueError("VoiceStore needs a data_dir, or both an index and a blob store")
        self.root = Path(data_dir) if data_dir is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        local_default = index is None and blobs is None
        self.index = index if index is not None else SQLiteIndex(self.root / "voices.sqlite3")
        self.blobs = blobs if blobs is not None else LocalBlobs(self.root / "voices")
        self.dir = getattr(self.blobs, "dir", None)  # the voice file directory, for local stores
        self.namespace = namespace
        self.shared = (not local_default) if shared is None else bool(shared)
        default_grace = SHARED_ORPHAN_GRACE if self.shared else 0.0
        self.orphan_grace = default_grace if orphan_grace is None else max(0.0, float(orphan_grace))
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[str, VoiceReference] = OrderedDict()
        self._lock = threading.RLock()
        self.cache_hits = 0
        self.cache_misses = 0
        self.reconciled = self.reconcile()

    def describe(self) -> str:
        return f"rows in {self.index.describe()}, files in {self.blobs.describe()}"

    # -- maintenance -----------------------------------------------------------------------------

    def reconcile(self) -> dict[str, int]:
        """Make rows and files agree (see the module docstring): remove files without a row and stale temp
        files older than ``orphan_grace``, and (exclusive libraries only) rows whose file is missing.
        Returns what was removed, by kind."""
        removed = {"orphan_files": 0, "temp_files": 0, "missing_files": 0}
        rows = self.index.files()
        known = {file for _, file in rows}
        present = set()
        for name, age in list(self.blobs.scan()):
            present.add(name)
            if is_temp_name(name):
                kind = "temp_files"
            elif name.endswith(".voice") and name not in known:
                kind = "orphan_files"
            else:
                continue
            if age >= self.orphan_grace:  # a file that old is no new voice waiting for its row
                self.blobs.delete(name)
                removed[kind] += 1
        missing = [(voice_id, file) for voice_id, file in rows if file not in present]
        if missing and (self.shared or len(missing) == len(rows)):
            log.error(
                "%d of %d voices have no file in %s (first: %s); they are 'not found' until it is restored",
                len(missing),
                len(rows),
                self.blobs.describe(),
                missing[0][0],
            )
        elif missing:
            for voice_id, file in missing:
                if self.index.remove(voice_id):
                    removed["missing_files"] += 1
                    log.warning(
                        "voice %s: its file %s is missing; removed it from the library", voice_id, file
                    )
        return removed

    def close(self) -> None:
        self.index.close()
        self.blobs.close()

    # -- queries ---------------------------------------------------------------------------------

    def list(self) -> list[VoiceInfo]:
        return [VoiceInfo.of(r) for r in self.index.list(self.namespace)]

    def count(self) -> int:
        return self.index.count(self.namespace)

    def _row(self, voice_id: str) -> VoiceRow:
        if not valid_id(voice_id):
            raise VoiceNotFound(voice_id)
        row = self.index.get(self.namespace, voice_id)
        if row is None:
            self._forget(voice_id)
            raise VoiceNotFound(voice_id)
        return row

    def get(self, voice_id: str) -> VoiceInfo:
        return VoiceInfo.of(self._row(voice_id))

    def find(self, key: str) -> VoiceInfo | None:
        """A saved voice by id, else by name; None if neither."""
        if valid_id(key):
            with contextlib.suppress(VoiceNotFound):
                return self.get(key)
            return None
        row = self.index.by_name(self.namespace, key)
        return None if row is None else VoiceInfo.of(row)

    def name_taken(self, name: str | None) -> bool:
        name = clean_name(name)
        return name is not None and self.index.by_name(self.namespace, name) is not None

    # -- changes ---------------------------------------------------------------------------------

    def add(self, voice: VoiceReference, name: str | None = None) -> VoiceInfo:
        """Save ``voice``: its file first (whole and durable), then its row. ``NameTaken`` if another voice
        has ``name``; on any failure the file is removed again (or left for ``reconcile`` after a crash)."""
        name = clean_name(name)
        text = voice.text.strip() if voice.text and voice.text.strip() else None
        data = voice.to_bytes()
        for _ in range(8):
            voice_id = "v_" + secrets.token_hex(8)
            file = f"{voice_id}.voice"
            self.blobs.put(file, data)
            row = VoiceRow(voice_id, name, text, float(voice.duration), time.time(), len(data), file)
            try:
                inserted = self.index.insert(self.namespace, row)
            except StorageUnavailable:
                raise  # the row may have been committed: keep the file (``reconcile`` removes it if not)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.blobs.delete(file)
                raise
            if inserted:
                self._remember(voice_id, voice)
                return VoiceInfo.of(row)
            self.blobs.delete(file)  # the id was taken (2^-64 odds): draw another
        raise RuntimeError("could not draw a free voice id")

    def delete(self, voice_id: str) -> VoiceInfo:
        """Remove a voice: its row (from then on nobody finds it), then its file. ``VoiceNotFound`` if there
        is no such voice (also when it was just deleted, here or by another server)."""
        if not valid_id(voice_id):
            raise VoiceNotFound(voice_id)
        row = self.index.delete(self.namespace, voice_id)
        self._forget(voice_id)
        if row is None:
            raise VoiceNotFound(voice_id)
        try:
            self.blobs.delete(row.file)
        except StorageUnavailable:  # the row is gone, so the voice is; reconcile removes the file later
            log.warning("voice %s deleted, but its file could not be removed yet", voice_id)
        return VoiceInfo.of(row)

    # -- loading ---------------------------------------------------------------------------------

    def load(self, voice_id: str) -> VoiceReference:
        """The VoiceReference of a saved voice, from the LRU cache or its file."""
        with self._lock:
            cached = self._cache.get(voice_id)
            if cached is not None:
                self._cache.move_to_end(voice_id)
                self.cache_hits += 1
                return cached
        row = self._row(voice_id)  # validates the id
        try:
            data = self.blobs.get(row.file)
        except FileNotFoundError:  # removed behind our back (reconcile handles restarts)
            log.error("voice %s: its file %s is missing from %s", voice_id, row.file, self.blobs.describe())
            raise VoiceNotFound(voice_id) from None
        voice = VoiceReference.from_bytes(data, source=f"voice {voice_id}")
        with self._lock:
            self.cache_misses += 1
            self._remember(voice_id, voice)
        return voice

    def is_cached(self, voice_id: str) -> bool:
        with self._lock:
            return voice_id in self._cache

    def _forget(self, voice_id: str) -> None:
        with self._lock:
            self._cache.pop(voice_id, None)

    def _remember(self, voice_id: str, voice: VoiceReference) -> None:
        if self.cache_size == 0:
            return
        with self._lock:
            self._cache[voice_id] = voice
            self._cache.move_to_end(voice_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)


def open_voice_store(
    data_dir: str | Path,
    voice_db: str | None = None,
    voice_files: str | None = None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    cache_size: int = 32,
    shared: bool | None = None,
) -> VoiceStore:
    """The voice library from settings: ``voice_db`` None (SQLite in ``data_dir``) or a ``postgresql://``
    URL; ``voice_files`` None (``data_dir``/voices), a (shared) directory, or ``s3://bucket/prefix``."""
    if not voice_db and not voice_files:
        return VoiceStore(data_dir, cache_size, namespace=namespace, shared=shared)
    data_dir = Path(data_dir)
    index = open_index(voice_db, data_dir)
    try:
        blobs = open_blobs(voice_files, data_dir)
        return VoiceStore(
            None,
            cache_size,
            index=index,
            blobs=blobs,
            namespace=namespace,
            shared=True if shared is None else shared,
        )
    except BaseException:
        index.close()
        raise
