"""The voice library's guarantees on each storage combination, with two stores standing for two servers:
SQLite + local files (one machine), PostgreSQL + a shared directory (a real server from Debian's
``postgresql``, started in a temporary directory), and S3 (moto's in-process S3, when installed).

A voice is visible to the other server as soon as ``add`` returns; a crash between the file and the row
leaves neither half visible; deleting twice (or from both servers at once) removes the voice once; names
are unique per namespace, also when both servers create one at the same moment; PostgreSQL can restart
under a running store.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import torch
from pg_server import PostgresServer, skip_reason

from cosyvoice2.server import storage
from cosyvoice2.server.voices import (
    NameTaken,
    StorageUnavailable,
    VoiceNotFound,
    VoiceStore,
    open_voice_store,
)
from cosyvoice2.voice import VoiceReference


def voice(seed: int = 0) -> VoiceReference:
    g = torch.Generator().manual_seed(seed)
    return VoiceReference(embedding=torch.randn(192, generator=g), text=f"voice {seed}")


@pytest.fixture(scope="module")
def pg():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def two_servers(request, tmp_path):
    """Two VoiceStores on one library, as two servers (or replicas) would open it."""
    if request.param == "sqlite":
        stores = [VoiceStore(tmp_path, shared=True) for _ in range(2)]
    else:
        pg = request.getfixturevalue("pg")
        namespace = f"t{time.monotonic_ns()}"  # each test its own library in the one database
        files = str(tmp_path / "shared")
        stores = [
            open_voice_store(tmp_path / f"node{i}", pg.url, files, namespace=namespace) for i in range(2)
        ]
    yield stores
    for s in stores:
        s.close()


def blob_names(store: VoiceStore) -> set[str]:
    return {name for name, _ in store.blobs.scan()}


def test_visible_to_the_other_server_at_once(two_servers):
    a, b = two_servers
    info = a.add(voice(1), "Narrator")
    assert b.get(info.id) == info and b.find("Narrator") == info and b.find(info.id) == info
    loaded = b.load(info.id)  # from the shared files, not from a's cache
    assert torch.equal(loaded.embedding, voice(1).embedding) and loaded.text == "voice 1"
    assert [v.id for v in b.list()] == [info.id] and b.count() == 1


def test_a_crash_between_file_and_row_leaves_nothing_visible(two_servers, monkeypatch):
    a, b = two_servers
    # The row's insert fails after the file was stored: the file is removed again.
    monkeypatch.setattr(a.index, "insert", lambda *args: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        a.add(voice(2), "Half")
    monkeypatch.undo()
    assert b.list() == [] and b.find("Half") is None and blob_names(b) == set()
    # The database went away during the insert: it may have committed the row, so the file is kept; the
    # row is not there, so nothing lists the file, and reconcile removes it once it is old enough.
    lost = StorageUnavailable("connection lost")
    monkeypatch.setattr(a.index, "insert", lambda *args: (_ for _ in ()).throw(lost))
    with pytest.raises(StorageUnavailable):
        a.add(voice(2), "Half")
    monkeypatch.undo()
    (kept,) = blob_names(a)
    assert b.list() == [] and b.find("Half") is None
    a.blobs.delete(kept)
    # A process killed between the two: the file stays, without a row. Nobody lists, finds or loads it,
    # and its name is still free.
    a.blobs.put("v_00000000000000ab.voice", voice(3).to_bytes())
    assert b.list() == [] and b.find("v_00000000000000ab") is None
    with pytest.raises(VoiceNotFound):
        b.load("v_00000000000000ab")
    b.add(voice(3), "Half")
    # A shared library leaves young orphans alone (another server may be about to insert its row), and
    # removes them once they are older than the grace period.
    assert b.reconcile() == {"orphan_files": 0, "temp_files": 0, "missing_files": 0}
    b.orphan_grace = 0.0
    assert b.reconcile()["orphan_files"] == 1
    assert len(blob_names(b)) == 1 and [v.name for v in a.list()] == ["Half"]


def test_deleting_is_idempotent(two_servers):
    a, b = two_servers
    info = a.add(voice(4), "Gone")
    b.load(info.id)  # cached on b
    assert b.delete(info.id) == info
    with pytest.raises(VoiceNotFound):
        b.delete(info.id)
    with pytest.raises(VoiceNotFound):
        a.delete(info.id)
    assert a.find("Gone") is None and a.find(info.id) is None and blob_names(a) == set()
    with pytest.raises(VoiceNotFound):
        b.load(info.id)  # the cached copy went with the row
    # Both servers deleting at once: one of them deletes it, the other finds nothing.
    info = a.add(voice(5), "Twice")
    outcomes = _race([lambda: a.delete(info.id), lambda: b.delete(info.id)])
    assert sorted(type(o).__name__ for o in outcomes) == ["VoiceInfo", "VoiceNotFound"]
    assert a.list() == [] and blob_names(a) == set()


def test_names_are_unique_per_namespace(two_servers):
    a, b = two_servers
    a.add(voice(6), "Alice")
    with pytest.raises(NameTaken):
        b.add(voice(7), "Alice")
    # Both servers creating the same new name at once: exactly one wins, the loser's file is removed.
    outcomes = _race([lambda: a.add(voice(8), "Bob"), lambda: b.add(voice(9), "Bob")])
    assert sorted(type(o).__name__ for o in outcomes) == ["NameTaken", "VoiceInfo"]
    assert sorted(v.name for v in a.list()) == ["Alice", "Bob"] and len(blob_names(a)) == 2
    # Unnamed voices never clash.
    a.add(voice(10))
    b.add(voice(11))
    assert a.count() == 4


def _race(calls):
    barrier = threading.Barrier(len(calls))
    outcomes: list = [None] * len(calls)

    def run(i):
        barrier.wait()
        try:
            outcomes[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - the outcome under test
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def test_namespaces_are_separate_libraries(pg, tmp_path):
    files = str(tmp_path / "shared")
    staging = open_voice_store(tmp_path, pg.url, files, namespace=f"staging{time.monotonic_ns()}")
    prod = open_voice_store(tmp_path, pg.url, files, namespace=f"prod{time.monotonic_ns()}")
    try:
        s = staging.add(voice(12), "Same")
        p = prod.add(voice(13), "Same")
        assert staging.find("Same") == s and prod.find("Same") == p and prod.find(s.id) is None
    finally:
        staging.close()
        prod.close()


def test_postgres_restart_and_outage(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with PostgresServer() as server:  # its own server: this test stops it
        store = open_voice_store(tmp_path, server.url, str(tmp_path / "files"))
        try:
            info = store.add(voice(14), "Survivor")
            store.index.timeout = 2.0
            server.restart()
            assert store.find("Survivor") == info  # the pool's dead connections are replaced
            server.stop()
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailable):
                store.find("Survivor")
            assert time.monotonic() - t0 < 10
            server.start()
            assert store.find("Survivor") == info and store.load(info.id).text == "voice 14"
        finally:
            store.close()
    assert "***" in storage.redact_url("postgresql://u:secret@h/db") and "secret" not in storage.redact_url(
        "postgresql://u:secret@h/db"
    )


def test_unreachable_database_is_a_clear_error(tmp_path):
    if skip_reason():
        pytest.skip(skip_reason())
    from pg_server import free_port

    url = f"postgresql://nobody:pw@127.0.0.1:{free_port()}/x"
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"cannot reach the voice database .*\*\*\*"):
        storage.PostgresIndex(url, timeout=2.0)
    assert time.monotonic() - t0 < 15


def test_sqlite_library_from_before_unique_names_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "voices.sqlite3")
    db.executescript(
        """CREATE TABLE voices (id TEXT PRIMARY KEY, name TEXT, text TEXT, duration REAL NOT NULL,
        created_at REAL NOT NULL, file TEXT NOT NULL, bytes INTEGER NOT NULL);"""
    )
    (tmp_path / "voices").mkdir()
    for i, (voice_id, created) in enumerate((("v_000000000000000a", 1.0), ("v_000000000000000b", 2.0))):
        data = voice(i).to_bytes()
        (tmp_path / "voices" / f"{voice_id}.voice").write_bytes(data)
        db.execute(
            "INSERT INTO voices VALUES (?, 'Dup', NULL, 1.0, ?, ?, ?)",
            (voice_id, created, f"{voice_id}.voice", len(data)),
        )
    db.commit()
    db.close()
    store = VoiceStore(tmp_path)
    try:
        assert store.find("Dup").id == "v_000000000000000b"  # the newest kept the name, as lookups did before
        assert store.get("v_000000000000000a").name == "Dup (v_000000000000000a)"
        with pytest.raises(NameTaken):
            store.add(voice(15), "Dup")
    finally:
        store.close()


def test_s3_voice_files(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto", reason="moto is not installed (pip install moto)")
    pytest.importorskip("boto3")
    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    with moto.mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="voices")
        a = open_voice_store(tmp_path / "a", str(tmp_path / "voices.sqlite3"), "s3://voices/lib")
        b = open_voice_store(tmp_path / "b", str(tmp_path / "voices.sqlite3"), "s3://voices/lib")
        try:
            info = a.add(voice(16), "Cloud")
            assert torch.equal(b.load(info.id).embedding, voice(16).embedding)
            assert blob_names(b) == {f"{info.id}.voice"}
            assert b.delete(info.id) == info and blob_names(a) == set()
            with pytest.raises(VoiceNotFound):
                a.delete(info.id)
        finally:
            a.close()
            b.close()


def test_unsupported_locations_are_refused(tmp_path):
    from cosyvoice2.errors import CosyVoiceError

    with pytest.raises(CosyVoiceError, match="unsupported voice database"):
        open_voice_store(tmp_path, "mysql://x/y")
    with pytest.raises(CosyVoiceError, match="unsupported voice file store"):
        open_voice_store(tmp_path, None, "ftp://x/y")
