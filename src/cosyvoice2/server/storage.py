"""Where the voice library keeps its rows and its voice files: one interface, two kinds of each.

=====================  =========================================  ===========================================
part                   single machine (the default)               several servers or Ray Serve replicas
=====================  =========================================  ===========================================
rows (``VoiceIndex``)  ``SQLiteIndex``: ``voices.sqlite3``        ``PostgresIndex``: a ``cosyvoice2_voices``
                       in the data directory                      table (psycopg 3)
files (``BlobStore``)  ``LocalBlobs``: ``voices/`` in the data    ``LocalBlobs`` on a shared directory (NFS,
                       directory                                  a Kubernetes volume), or ``S3Blobs``: any
                                                                  S3-compatible object store (boto3)
=====================  =========================================  ===========================================

``VoiceStore`` (``voices.py``) builds the library's guarantees on top of these, the same for every
combination: a voice file is stored whole (atomic rename, or one object PUT) before its row is committed,
and a row is deleted before its file, so a crash leaves at worst a file without a row, which nothing lists
or loads. Rows hold names under a UNIQUE (namespace, name) constraint, so two servers creating the same
name at once cannot both succeed.

Both databases are asked on every lookup (no row is cached), so a voice created or deleted through one
server is seen by all others as soon as the call that made it returns. A database or object store that
cannot be reached raises ``StorageUnavailable`` (the server answers 503 and retries on the next request);
``PostgresIndex`` checks each kept connection before use, so a restarted database is reconnected to
without a failed request.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cosyvoice2 import fileio
from cosyvoice2.errors import CosyVoiceError, InputError

log = logging.getLogger("cosyvoice2.server")

DEFAULT_NAMESPACE = "default"


class StorageUnavailable(CosyVoiceError):
    """The voice library's database or file store cannot be reached now; retrying later may work."""


class NameTaken(InputError):
    """A saved voice with this name already exists in the namespace."""


@dataclass(frozen=True)
class VoiceRow:
    """One voice as the index keeps it (``file`` is the blob's name in the ``BlobStore``)."""

    id: str
    name: str | None
    text: str | None
    duration: float
    created_at: float
    bytes: int
    file: str


_COLUMNS = "id, name, text, duration, created_at, bytes, file"


def _row(r: tuple) -> VoiceRow:
    return VoiceRow(r[0], r[1], r[2], float(r[3]), float(r[4]), int(r[5]), r[6])


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------


class VoiceIndex(ABC):
    """The voice rows. Every method may raise ``StorageUnavailable``."""

    @abstractmethod
    def list(self, namespace: str) -> list[VoiceRow]:
        """The namespace's voices, oldest first."""

    @abstractmethod
    def count(self, namespace: str) -> int: ...

    @abstractmethod
    def get(self, namespace: str, voice_id: str) -> VoiceRow | None: ...

    @abstractmethod
    def by_name(self, namespace: str, name: str) -> VoiceRow | None: ...

    @abstractmethod
    def insert(self, namespace: str, row: VoiceRow) -> bool:
        """Commit ``row``. False if its id is taken (the caller draws another); ``NameTaken`` if its name
        is."""

    @abstractmethod
    def delete(self, namespace: str, voice_id: str) -> VoiceRow | None:
        """Remove the row and return it; None if there was none (deleting twice is not an error)."""

    @abstractmethod
    def remove(self, voice_id: str) -> bool:
        """Remove a row by id whatever its namespace (``reconcile``); False if there was none."""

    @abstractmethod
    def files(self) -> list[tuple[str, str]]:
        """(id, file) of every row, all namespaces: what ``VoiceStore.reconcile`` compares files with."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def describe(self) -> str:
        """Where the rows are, for logs (never a password)."""


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    id TEXT PRIMARY KEY,
    name TEXT,
    text TEXT,
    duration REAL NOT NULL,
    created_at REAL NOT NULL,
    file TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    namespace TEXT NOT NULL DEFAULT 'default'
);
"""


class SQLiteIndex(VoiceIndex):
    """Rows in one SQLite file (WAL, synchronous=FULL). Several processes on one machine may share it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(_SQLITE_SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Libraries made before names were unique: add the namespace column, and rename the older voices
        of a name used twice (only the newest one was reachable by that name) so the index can be made."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(voices)")}
        if "namespace" not in columns:
            self._db.execute("ALTER TABLE voices ADD COLUMN namespace TEXT NOT NULL DEFAULT 'default'")
        dupes = self._db.execute(
            "SELECT v.id, v.name FROM voices v WHERE v.name IS NOT NULL AND EXISTS (SELECT 1 FROM voices w"
            " WHERE w.namespace = v.namespace AND w.name = v.name"
            " AND (w.created_at, w.id) > (v.created_at, v.id))"
        ).fetchall()
        for voice_id, name in dupes:
            self._db.execute("UPDATE voices SET name = ? WHERE id = ?", (f"{name} ({voice_id})", voice_id))
            log.warning("voice %s: renamed to %r, its name is used by a newer voice", voice_id, name)
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS voices_namespace_name ON voices(namespace, name)")

    def _all(self, sql: str, args: tuple) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def list(self, namespace: str) -> list[VoiceRow]:
        sql = f"SELECT {_COLUMNS} FROM voices WHERE namespace = ? ORDER BY created_at, id"
        return [_row(r) for r in self._all(sql, (namespace,))]

    def count(self, namespace: str) -> int:
        return int(self._all("SELECT COUNT(*) FROM voices WHERE namespace = ?", (namespace,))[0][0])

    def get(self, namespace: str, voice_id: str) -> VoiceRow | None:
        rows = self._all(
            f"SELECT {_COLUMNS} FROM voices WHERE namespace = ? AND id = ?", (namespace, voice_id)
        )
        return _row(rows[0]) if rows else None

    def by_name(self, namespace: str, name: str) -> VoiceRow | None:
        rows = self._all(f"SELECT {_COLUMNS} FROM voices WHERE namespace = ? AND name = ?", (namespace, name))
        return _row(rows[0]) if rows else None

    def insert(self, namespace: str, row: VoiceRow) -> bool:
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO voices (id, name, text, duration, created_at, file, bytes, namespace)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.id,
                        row.name,
                        row.text,
                        row.duration,
                        row.created_at,
                        row.file,
                        row.bytes,
                        namespace,
                    ),
                )
        except sqlite3.IntegrityError as e:
            if "voices.id" in str(e):
                return False
            raise NameTaken(f"a saved voice is already named {row.name!r}") from None
        return True

    def delete(self, namespace: str, voice_id: str) -> VoiceRow | None:
        with self._lock:
            rows = self._db.execute(
                f"DELETE FROM voices WHERE namespace = ? AND id = ? RETURNING {_COLUMNS}",
                (namespace, voice_id),
            ).fetchall()
        return _row(rows[0]) if rows else None

    def remove(self, voice_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM voices WHERE id = ?", (voice_id,)).rowcount > 0

    def files(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._all("SELECT id, file FROM voices", ())]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def describe(self) -> str:
        return str(self.path)


_PG_TABLE = "cosyvoice2_voices"
_PG_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_PG_TABLE} (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT,
    text TEXT,
    duration DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    file TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    CONSTRAINT {_PG_TABLE}_name UNIQUE (namespace, name)
)
"""
_PG_SCHEMA_LOCK = 0x636F_7379_7632  # pg_advisory_xact_lock key: replicas starting together create it once


class PostgresIndex(VoiceIndex):
    """Rows in a PostgreSQL table (psycopg 3, autocommit: each change is one committed statement).

    Connections are kept for reuse, at most ``pool_size`` at once, and each is checked with a round trip
    before it is used; a dead one (the server restarted, a proxy dropped it) is replaced by a new
    connection at once, so a database that comes back is used again by the next request. While it is down,
    every call fails within ``timeout`` seconds with ``StorageUnavailable``. A read that loses its
    connection midway is retried once; a write is not (it may have been committed), and its error says so
    through ``StorageUnavailable``, whose caller keeps the voice file (see ``VoiceStore.add``)."""

    def __init__(self, url: str, *, pool_size: int = 4, timeout: float = 5.0) -> None:
        try:
            import psycopg
        except ImportError as e:
            raise CosyVoiceError(
                "a PostgreSQL voice library needs psycopg 3: pip install 'cosyvoice2[ray]'"
            ) from e
        self._psycopg = psycopg
        self.url = url
        self.timeout = float(timeout)
        self._idle: list = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(1, int(pool_size)))
        self._closed = False
        try:
            with self._conn() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                conn.execute(_PG_SCHEMA)
        except StorageUnavailable as e:
            raise StorageUnavailable(f"cannot reach the voice database {self.describe()}: {e}") from None

    def _connect(self):
        return self._psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.timeout)))

    def _checked_idle(self):
        """An idle connection that answers, or None (dead ones are closed on the way)."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return None
            try:
                conn.execute("")  # one round trip: is the server (still) there?
                return conn
            except self._psycopg.Error:
                with contextlib.suppress(Exception):
                    conn.close()

    @contextlib.contextmanager
    def _conn(self) -> Iterator:
        psycopg = self._psycopg
        if self._closed:
            raise StorageUnavailable("the voice database connection is closed")
        if not self._slots.acquire(timeout=self.timeout):
            raise StorageUnavailable(f"no database connection became free within {self.timeout:g} s")
        conn = None
        try:
            conn = self._checked_idle() or self._connect()
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            raise StorageUnavailable(f"the voice database is unavailable: {str(e).strip()[:200]}") from None
        finally:
            if conn is not None and not conn.closed and not conn.broken and not self._closed:
                with self._lock:
                    self._idle.append(conn)
            elif conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._slots.release()

    def _all(self, sql: str, args: tuple) -> list[tuple]:
        try:
            with self._conn() as conn:
                return conn.execute(sql, args).fetchall()
        except StorageUnavailable:  # the connection died after its check: one more try on a fresh one
            with self._conn() as conn:
                return conn.execute(sql, args).fetchall()

    def list(self, namespace: str) -> list[VoiceRow]:
        sql = f"SELECT {_COLUMNS} FROM {_PG_TABLE} WHERE namespace = %s ORDER BY created_at, id"
        return [_row(r) for r in self._all(sql, (namespace,))]

    def count(self, namespace: str) -> int:
        return int(self._all(f"SELECT COUNT(*) FROM {_PG_TABLE} WHERE namespace = %s", (namespace,))[0][0])

    def get(self, namespace: str, voice_id: str) -> VoiceRow | None:
        sql = f"SELECT {_COLUMNS} FROM {_PG_TABLE} WHERE namespace = %s AND id = %s"
        rows = self._all(sql, (namespace, voice_id))
        return _row(rows[0]) if rows else None

    def by_name(self, namespace: str, name: str) -> VoiceRow | None:
        sql = f"SELECT {_COLUMNS} FROM {_PG_TABLE} WHERE namespace = %s AND name = %s"
        rows = self._all(sql, (namespace, name))
        return _row(rows[0]) if rows else None

    def insert(self, namespace: str, row: VoiceRow) -> bool:
        errors = self._psycopg.errors
        try:
            with self._conn() as conn:
                conn.execute(
                    f"INSERT INTO {_PG_TABLE} (id, namespace, name, text, duration, created_at, file, bytes)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        row.id,
                        namespace,
                        row.name,
                        row.text,
                        row.duration,
                        row.created_at,
                        row.file,
                        row.bytes,
                    ),
                )
        except errors.UniqueViolation as e:
            if getattr(e.diag, "constraint_name", None) == f"{_PG_TABLE}_name":
                raise NameTaken(f"a saved voice is already named {row.name!r}") from None
            return False
        return True

    def delete(self, namespace: str, voice_id: str) -> VoiceRow | None:
        sql = f"DELETE FROM {_PG_TABLE} WHERE namespace = %s AND id = %s RETURNING {_COLUMNS}"
        with self._conn() as conn:
            rows = conn.execute(sql, (namespace, voice_id)).fetchall()
        return _row(rows[0]) if rows else None

    def remove(self, voice_id: str) -> bool:
        with self._conn() as conn:
            return conn.execute(f"DELETE FROM {_PG_TABLE} WHERE id = %s", (voice_id,)).rowcount > 0

    def files(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._all(f"SELECT id, file FROM {_PG_TABLE}", ())]

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    def describe(self) -> str:
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """``url`` without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


# ---------------------------------------------------------------------------------------------------
# Voice files
# ---------------------------------------------------------------------------------------------------


class BlobStore(ABC):
    """Voice files by name. ``put`` is atomic and durable: a reader sees the whole file or none of it."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, name: str) -> bytes:
        """The file's bytes; ``FileNotFoundError`` if there is none."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the file; nothing happens if there is none."""

    @abstractmethod
    def scan(self) -> Iterator[tuple[str, float]]:
        """(name, age in seconds) of every file, unfinished temporary ones included."""

    @abstractmethod
    def describe(self) -> str: ...

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to close
        pass


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


class LocalBlobs(BlobStore):
    """Files in one directory (local, or shared by several machines: NFS and most cluster file systems
    rename atomically). Written to a temporary file, fsynced, renamed, then the directory is fsynced."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        fileio.atomic_write_bytes(self.dir / name, data)

    def get(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def delete(self, name: str) -> None:
        path = self.dir / name
        if path.exists():
            path.unlink(missing_ok=True)
            fileio.fsync_dir(self.dir)

    def scan(self) -> Iterator[tuple[str, float]]:
        now = time.time()
        for path in self.dir.iterdir():
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another server
                yield path.name, max(0.0, now - path.stat().st_mtime)

    def describe(self) -> str:
        return str(self.dir)


class S3Blobs(BlobStore):
    """Objects under ``prefix`` in an S3 bucket (AWS, MinIO, Ceph, R2, ...). A PUT is atomic and S3 reads
    are strongly consistent, so a voice is readable everywhere once ``put`` returns. Credentials come from
    boto3's usual sources (environment, config files, instance roles)."""

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None
    ):
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise CosyVoiceError("an S3 voice store needs boto3: pip install 'cosyvoice2[s3]'") from e
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(code) from None
            raise StorageUnavailable(f"the voice file store refused a request: {code or e}") from None
        except BotoCoreError as e:
            raise StorageUnavailable(f"the voice file store is unavailable: {e}") from None

    def put(self, name: str, data: bytes) -> None:
        with self._errors():
            self._s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def get(self, name: str) -> bytes:
        with self._errors():
            return self._s3.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()

    def delete(self, name: str) -> None:
        with self._errors():
            self._s3.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def scan(self) -> Iterator[tuple[str, float]]:
        now = time.time()
        with self._errors():
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(self.prefix) :]
                    if name and "/" not in name:
                        yield name, max(0.0, now - obj["LastModified"].timestamp())

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


# ---------------------------------------------------------------------------------------------------
# From settings
# ---------------------------------------------------------------------------------------------------


def open_index(voice_db: str | None, data_dir: Path) -> VoiceIndex:
    """``voice_db``: None (SQLite in ``data_dir``), a ``postgresql://`` URL or a SQLite file path."""
    if not voice_db:
        return SQLiteIndex(data_dir / "voices.sqlite3")
    scheme = urlsplit(voice_db).scheme.lower()
    if scheme in ("postgres", "postgresql"):
        return PostgresIndex(voice_db)
    if scheme in ("", "sqlite", "file"):
        path = voice_db.split("://", 1)[-1] if scheme else voice_db
        return SQLiteIndex(Path(path).expanduser())
    raise CosyVoiceError(f"unsupported voice database {scheme!r}: use postgresql://... or a SQLite file path")


def open_blobs(voice_files: str | None, data_dir: Path) -> BlobStore:
    """``voice_files``: None (``data_dir``/voices), a directory, or ``s3://bucket/prefix`` with optional
    ``?endpoint=URL&region=NAME`` (an S3-compatible server such as MinIO)."""
    if not voice_files:
        return LocalBlobs(data_dir / "voices")
    parts = urlsplit(voice_files)
    if parts.scheme.lower() == "s3":
        if not parts.netloc:
            raise CosyVoiceError("an S3 voice store needs a bucket: s3://BUCKET/PREFIX")
        query = parse_qs(parts.query)
        endpoint = (query.get("endpoint") or [None])[0]
        region = (query.get("region") or [None])[0]
        return S3Blobs(parts.netloc, parts.path, endpoint_url=endpoint, region=region)
    if parts.scheme.lower() in ("", "file"):
        return LocalBlobs(Path(parts.path if parts.scheme else voice_files).expanduser())
    raise CosyVoiceError(
        f"unsupported voice file store {parts.scheme!r}: use a directory or s3://BUCKET/PREFIX"
    )
