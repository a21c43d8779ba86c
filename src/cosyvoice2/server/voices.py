"""The server's voice library: voices users clone once and reuse by id (or name).

Layout of the data directory::

    voices.sqlite3          one row per voice: id, name, transcript, duration, file, created time
    voices/<id>.voice       the VoiceReference (safetensors + JSON metadata), written atomically

A voice file is written (temp file, fsync, rename, directory fsync) before its row is inserted, and a row
is deleted before its file, so a crash at any point leaves at worst an orphan file. Each start reconciles
the two: files without a row (and stale temp files) are removed, and so are rows whose file is gone (a
disk restored from an older backup, a file deleted by hand), so no listed voice fails when it is used.
Loaded voices are kept in a small in-memory LRU so a saved voice starts as fast as a built-in one.

Ids are generated here (``v_`` + 16 hex digits) and every id from a request is checked against
``ID_PATTERN`` before it is used in a path, so no request can name a file outside ``voices/``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from cosyvoice2.errors import InputError
from cosyvoice2.fileio import atomic_write_bytes, fsync_dir
from cosyvoice2.voice import VoiceReference

log = logging.getLogger("cosyvoice2.server")

ID_PATTERN = re.compile(r"v_[0-9a-f]{16}")
MAX_NAME_CHARS = 64
MAX_TRANSCRIPT_CHARS = 1000
_NAME_PATTERN = re.compile(r"[^\x00-\x1f\x7f]+")  # any printable text, no control characters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    id TEXT PRIMARY KEY,
    name TEXT,
    text TEXT,
    duration REAL NOT NULL,
    created_at REAL NOT NULL,
    file TEXT NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS voices_name ON voices(name);
"""


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
    """SQLite index + voice files + LRU cache. Safe to use from several threads."""

    def __init__(self, data_dir: str | Path, cache_size: int = 32) -> None:
        self.root = Path(data_dir)
        self.dir = self.root / "voices"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "voices.sqlite3"
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[str, VoiceReference] = OrderedDict()
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.cache_hits = 0
        self.cache_misses = 0
        self.reconciled = self.reconcile()

    # -- maintenance -----------------------------------------------------------------------------

    def reconcile(self) -> dict[str, int]:
        """Make rows and files agree: remove voice files without a row (a crash between write and insert),
        stale temp files, and rows whose file is missing. Returns what was removed, by kind."""
        removed = {"orphan_files": 0, "temp_files": 0, "missing_files": 0}
        with self._lock:
            rows = self._db.execute("SELECT id, file FROM voices").fetchall()
            known = {file for _, file in rows}
            for path in self.dir.iterdir():
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                    removed["temp_files"] += 1
                elif path.suffix == ".voice" and path.name not in known:
                    path.unlink(missing_ok=True)
                    removed["orphan_files"] += 1
            for voice_id, file in rows:
                if not (self.dir / file).is_file():
                    self._db.execute("DELETE FROM voices WHERE id = ?", (voice_id,))
                    removed["missing_files"] += 1
                    log.warning("voice %s: file %s is missing; removed it from the library", voice_id, file)
            if removed["orphan_files"] or removed["temp_files"]:
                fsync_dir(self.dir)
        return removed

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- queries ---------------------------------------------------------------------------------

    @staticmethod
    def _info(row: tuple) -> VoiceInfo:
        return VoiceInfo(
            id=row[0], name=row[1], text=row[2], duration=row[3], created_at=row[4], bytes=row[5]
        )

    _COLUMNS = "id, name, text, duration, created_at, bytes"

    def list(self) -> list[VoiceInfo]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM voices ORDER BY created_at, id").fetchall()
        return [self._info(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM voices").fetchone()[0])

    def get(self, voice_id: str) -> VoiceInfo:
        if not valid_id(voice_id):
            raise VoiceNotFound(voice_id)
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM voices WHERE id = ?", (voice_id,)).fetchone()
        if row is None:
            raise VoiceNotFound(voice_id)
        return self._info(row)

    def find(self, key: str) -> VoiceInfo | None:
        """A saved voice by id, else the newest one with this name; None if neither."""
        if valid_id(key):
            with contextlib.suppress(VoiceNotFound):
                return self.get(key)
            return None
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._COLUMNS} FROM voices WHERE name = ? ORDER BY created_at DESC, id LIMIT 1",
                (key,),
            ).fetchone()
        return None if row is None else self._info(row)

    # -- changes ---------------------------------------------------------------------------------

    def add(self, voice: VoiceReference, name: str | None = None) -> VoiceInfo:
        name = clean_name(name)
        text = voice.text.strip() if voice.text and voice.text.strip() else None
        data = voice.to_bytes()
        with self._lock:
            voice_id = self._new_id()
            file = f"{voice_id}.voice"
            atomic_write_bytes(self.dir / file, data)  # temp file + fsync + rename
            created = time.time()
            try:
                self._db.execute(
                    "INSERT INTO voices (id, name, text, duration, created_at, file, bytes)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (voice_id, name, text, float(voice.duration), created, file, len(data)),
                )
            except BaseException:
                (self.dir / file).unlink(missing_ok=True)
                raise
            self._remember(voice_id, voice)
        return VoiceInfo(voice_id, name, text, float(voice.duration), created, len(data))

    def _new_id(self) -> str:
        while True:
            voice_id = "v_" + secrets.token_hex(8)
            exists = self._db.execute("SELECT 1 FROM voices WHERE id = ?", (voice_id,)).fetchone()
            if not exists:
                return voice_id

    def delete(self, voice_id: str) -> VoiceInfo:
        info = self.get(voice_id)
        with self._lock:
            cur = self._db.execute("DELETE FROM voices WHERE id = ?", (voice_id,))
            if cur.rowcount == 0:
                raise VoiceNotFound(voice_id)
            self._cache.pop(voice_id, None)
            (self.dir / f"{voice_id}.voice").unlink(missing_ok=True)
            fsync_dir(self.dir)
        return info

    # -- loading ---------------------------------------------------------------------------------

    def load(self, voice_id: str) -> VoiceReference:
        """The VoiceReference of a saved voice, from the LRU cache or its file."""
        with self._lock:
            cached = self._cache.get(voice_id)
            if cached is not None:
                self._cache.move_to_end(voice_id)
                self.cache_hits += 1
                return cached
        info = self.get(voice_id)  # validates the id
        path = self.dir / f"{info.id}.voice"
        if not path.is_file():  # removed behind our back since the start (reconcile handles restarts)
            raise VoiceNotFound(voice_id)
        voice = VoiceReference.load(path)
        with self._lock:
            self.cache_misses += 1
            self._remember(voice_id, voice)
        return voice

    def is_cached(self, voice_id: str) -> bool:
        with self._lock:
            return voice_id in self._cache

    def _remember(self, voice_id: str, voice: VoiceReference) -> None:
        if self.cache_size == 0:
            return
        self._cache[voice_id] = voice
        self._cache.move_to_end(voice_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
