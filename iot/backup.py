"""`iot backup DIR` and `iot restore DIR`: the namespace's event store and JetStream streams.

A backup holds what the read side is rebuilt from, and nothing else:

- `streams/<STREAM>.snapshot`: each JetStream stream of the namespace (EVENTS, INGEST,
  DEADLETTER) through the server's snapshot API (`$JS.API.STREAM.SNAPSHOT`), an S2-compressed
  tar of the stream's store as the server wrote it. A restore recreates the stream byte for byte:
  same sequence numbers, subjects, headers (`Nats-Msg-Id`, `Iot-Position`), data and original
  timestamps. Durable consumers are left out: they belong to projections, which are rebuilt by
  replay. The in-memory KV buckets (device secrets, leader leases) are never backed up.
- `postgres/event_store.dump`: the namespace's PostgreSQL schema (events, snapshots,
  idempotency keys) with `pg_dump --format=custom --schema`, taken from one exported snapshot so
  the manifest's row counts and max position describe exactly the dumped data.
- `manifest.json`: what was backed up and when, per stream first/last sequence and message
  count, the event store's row counts and max position, tool versions, and file checksums.

The streams are snapshotted before the event store is dumped, so the EVENTS stream never runs
ahead of the event store: after a restore the relay reads its position from the stream's last
`Iot-Position` and publishes only the events committed after that, each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import nats
import psycopg
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError
from psycopg import sql

from commands.relay import POSITION_HEADER
from infra.eventstore import EVENTS_TABLE
from infra.settings import Settings
from infra.streams import Streams

MANIFEST = "manifest.json"
FORMAT = 1
PG_DUMP_FILE = "postgres/event_store.dump"
CHUNK = 128 * 1024
API = "$JS.API"
REQUEST_TIMEOUT = 30.0
FINISH_TIMEOUT = 600.0  # the server moves a restored stream's files into place before answering

Progress = Callable[[str], None]


class BackupError(Exception):
    """A backup or restore failed; the message is one line for the operator."""


class Refused(BackupError):
    """The operation would overwrite or lose data; nothing was changed."""


@dataclass(frozen=True)
class Target:
    """What a namespace holds now: row counts per table, messages per stream (None: absent)."""

    schema_exists: bool
    tables: dict[str, int]
    streams: dict[str, int | None]

    @property
    def empty(self) -> bool:
        return not any(self.tables.values()) and not any(self.streams.values())


def stream_names(streams: Streams) -> list[str]:
    return [streams.events, streams.ingest, streams.deadletter]


# --- backup ---------------------------------------------------------------------------------


async def backup(settings: Settings, directory: Path, progress: Progress) -> dict[str, Any]:
    """Write a backup of the namespace into `directory` (absent or empty); return the manifest."""
    directory, staging = await asyncio.to_thread(_stage, directory)
    try:
        pg_dump = _tool("pg_dump")
        server_major, server_version = await asyncio.to_thread(_server_version, settings)
        tool_version = _tool_version(pg_dump)
        if _major(tool_version) < server_major:
            raise BackupError(
                f"{pg_dump} is version {tool_version} but the server is PostgreSQL "
                f"{server_version}; install pg_dump {server_major} or newer"
            )
        streams = Streams(settings.namespace)
        nc = await _connect(settings)
        try:
            nats_version = nc.connected_server_version
            entries = []
            for name in stream_names(streams):
                entries.append(await _snapshot_stream(nc, name, staging, progress))
            relay_position = await _last_position(nc, streams.events, entries[0]["last_seq"])
        finally:
            await nc.close()
        progress(f"postgres: dumping schema {settings.pg_schema} with {pg_dump}")
        event_store = await asyncio.to_thread(
            _dump_postgres, settings, pg_dump, staging / PG_DUMP_FILE
        )
        event_store["file"] = PG_DUMP_FILE
        event_store.update(await asyncio.to_thread(_digest, staging / PG_DUMP_FILE))
        progress(
            f"postgres: {event_store['tables'].get(EVENTS_TABLE, 0)} events up to position "
            f"{event_store['max_position']}, {event_store['bytes']} bytes"
        )
        if relay_position > event_store["max_position"]:
            raise BackupError(
                f"stream {streams.events} reaches position {relay_position}, beyond the event "
                f"store's {event_store['max_position']}: stream and schema do not belong together"
            )
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "created_at": datetime.now(UTC).isoformat(),
            "namespace": settings.namespace,
            "postgres": {"schema": settings.pg_schema, **event_store},
            "streams": entries,
            "relay_position": relay_position,
            "not_included": [
                "KV buckets (device secrets, leader leases): in memory, never backed up",
                "durable consumers: projections are rebuilt by `iot replay`",
                "Redis views and InfluxDB series: rebuilt by `iot replay`",
            ],
            "versions": {
                "iot": _package_version(),
                "pg_dump": tool_version,
                "postgres_server": server_version,
                "nats_server": str(nats_version),
            },
        }
        await asyncio.to_thread(_commit, staging, directory, manifest)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
        raise
    return manifest


def _stage(directory: Path) -> tuple[Path, Path]:
    """Check the target and make a staging directory beside it (same file system: rename)."""
    directory = directory.absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise Refused(f"{directory} is not an empty directory; give a new or empty one")
    if not directory.parent.is_dir():
        raise BackupError(f"{directory.parent} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    (staging / "streams").mkdir()
    (staging / "postgres").mkdir()
    return directory, staging


def _commit(staging: Path, directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, make everything durable, then move the backup to its name at once."""
    _write_synced(staging / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
    _fsync_dir(staging / "streams")
    _fsync_dir(staging / "postgres")
    _fsync_dir(staging)
    if directory.exists():
        directory.rmdir()  # empty (checked before); rename needs the name free
    staging.rename(directory)
    _fsync_dir(directory.parent)


class _Sink:
    """A file receiving chunks, with their SHA-256; used from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def close(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()


def _read_chunks(path: Path) -> Generator[bytes, None, None]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


async def _snapshot_stream(
    nc: NATS, name: str, staging: Path, progress: Progress
) -> dict[str, Any]:
    """Receive the stream's snapshot chunks into a file, acking each (the server's flow control)."""
    deliver = nc.new_inbox()
    sub = await nc.subscribe(deliver)
    relative = f"streams/{name}.snapshot"
    try:
        request = {"deliver_subject": deliver, "no_consumers": True, "chunk_size": CHUNK}
        answer = await _api(nc, f"STREAM.SNAPSHOT.{name}", request, f"snapshot of stream {name}")
        state, config = answer["state"], answer["config"]
        progress(
            f"jetstream: {name}: {state['messages']} messages "
            f"(seq {state['first_seq']}..{state['last_seq']}), receiving snapshot"
        )
        out = await asyncio.to_thread(_Sink, staging / relative)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=REQUEST_TIMEOUT)
                except NatsTimeoutError as e:
                    raise BackupError(f"snapshot of stream {name} stalled") from e
                status = (msg.headers or {}).get("Status")
                if status and not msg.data:
                    description = (msg.headers or {}).get("Description", "")
                    raise BackupError(f"snapshot of stream {name} aborted: {status} {description}")
                if not msg.data and not msg.reply:
                    break  # end of snapshot
                await asyncio.to_thread(out.write, msg.data)
                if msg.reply:  # the ack the server's flow control waits for
                    await nc.publish(msg.reply, b"")
        finally:
            await asyncio.to_thread(out.close)
    finally:
        await sub.unsubscribe()
    size = out.size
    if size == 0:
        raise BackupError(f"snapshot of stream {name} is empty")
    progress(f"jetstream: {name}: snapshot {size} bytes")
    return {
        "name": name,
        "file": relative,
        "first_seq": state["first_seq"],
        "last_seq": state["last_seq"],
        "messages": state["messages"],
        "config": config,
        "bytes": size,
        "sha256": out.digest.hexdigest(),
    }


async def _last_position(nc: NATS, stream: str, last_seq: int) -> int:
    """The `Iot-Position` of the EVENTS stream's message at `last_seq` (0 for an empty stream)."""
    if last_seq == 0:
        return 0
    msg = await nc.jsm().get_msg(stream, seq=last_seq)
    return int((msg.headers or {}).get(POSITION_HEADER, 0))


def _dump_postgres(settings: Settings, pg_dump: str, path: Path) -> dict[str, Any]:
    """pg_dump the schema from an exported snapshot; count rows in that same snapshot."""
    schema = settings.pg_schema
    with _pg(settings) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        tables = _table_counts(conn, schema)
        if EVENTS_TABLE not in tables:
            raise BackupError(f"schema {schema} has no {EVENTS_TABLE} table; run `iot migrate`")
        max_position = _max_position(conn, schema)
        result = subprocess.run(
            [
                pg_dump,
                "--format=custom",
                f"--schema={schema}",
                f"--snapshot={row[0]}",
                f"--file={path}",
                "--no-password",
            ],
            env=_pg_env(settings),
            capture_output=True,
            text=True,
            check=False,
        )
        conn.execute("COMMIT")
    if result.returncode != 0:
        raise BackupError(f"pg_dump failed: {_last_line(result.stderr)}")
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"tables": tables, "max_position": max_position}


# --- restore --------------------------------------------------------------------------------


async def restore(
    settings: Settings, directory: Path, progress: Progress, *, force: bool = False
) -> list[str]:
    """Restore a backup into the namespace (absent or empty unless `force`); return a summary."""
    manifest = await asyncio.to_thread(read_manifest, directory)
    if manifest["namespace"] != settings.namespace:
        raise Refused(
            f"the backup is of namespace {manifest['namespace']!r} but IOT_NAMESPACE is "
            f"{settings.namespace!r}; a stream snapshot restores only under its own name"
        )
    progress("checking the backup's files")
    await asyncio.to_thread(_check_files, directory, manifest)
    pg_restore = _tool("pg_restore")
    server_major, server_version = await asyncio.to_thread(_server_version, settings)
    tool_version = _tool_version(pg_restore)
    needed = max(server_major, _major(manifest["versions"]["pg_dump"]))
    if _major(tool_version) < needed:
        raise BackupError(
            f"{pg_restore} is version {tool_version}; this restore needs {needed} or newer "
            f"(server {server_version}, dump by pg_dump {manifest['versions']['pg_dump']})"
        )
    streams = Streams(settings.namespace)
    names = stream_names(streams)
    if [s["name"] for s in manifest["streams"]] != names:
        raise BackupError(f"the backup's streams are not {', '.join(names)}")
    nc = await _connect(settings)
    try:
        target = await inspect_target(settings, nc)
        if not target.empty and not force:
            raise Refused(
                f"namespace {settings.namespace or '(default)'} is not empty ({_describe(target)});"
                " pass --force to drop it first"
            )
        await _drop(settings, nc, target, progress)
        progress(f"postgres: restoring schema {settings.pg_schema} with {pg_restore}")
        await asyncio.to_thread(
            _restore_postgres, settings, pg_restore, directory / manifest["postgres"]["file"]
        )
        summary = []
        for entry in manifest["streams"]:
            summary.append(await _restore_stream(nc, directory, entry, progress))
    finally:
        await nc.close()
    from commands.migrate import migrate_streams

    for line in await migrate_streams(settings):
        if line.startswith("created kv"):
            progress(f"jetstream: {line} (empty)")
    summary.insert(0, await asyncio.to_thread(_verify_postgres, settings, manifest["postgres"]))
    return summary


def _check_files(directory: Path, manifest: dict[str, Any]) -> None:
    for entry in [manifest["postgres"], *manifest["streams"]]:
        path = directory / entry["file"]
        try:
            ok = _digest(path)["sha256"] == entry["sha256"]
        except OSError as e:
            raise BackupError(f"{path}: {e.strerror}") from e
        if not ok:
            raise BackupError(f"{path} does not match its checksum in the manifest")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise BackupError(f"{path} not found: {directory} is not a backup") from e
    except (OSError, ValueError) as e:
        raise BackupError(f"{path} is unreadable: {e}") from e
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: unknown backup format {manifest.get('format')!r}")
    return manifest


async def inspect_target(settings: Settings, nc: NATS) -> Target:
    exists, tables = await asyncio.to_thread(_inspect_schema, settings)
    counts: dict[str, int | None] = {}
    jsm = nc.jsm()
    for name in stream_names(Streams(settings.namespace)):
        try:
            counts[name] = (await jsm.stream_info(name)).state.messages
        except NotFoundError:
            counts[name] = None
    return Target(schema_exists=exists, tables=tables, streams=counts)


def _inspect_schema(settings: Settings) -> tuple[bool, dict[str, int]]:
    with _pg(settings) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (settings.pg_schema,)
        ).fetchone()
        return exists is not None, _table_counts(conn, settings.pg_schema) if exists else {}


def _describe(target: Target) -> str:
    parts = [f"table {t}: {n} rows" for t, n in target.tables.items() if n]
    parts += [f"stream {s}: {n} messages" for s, n in target.streams.items() if n]
    return ", ".join(parts)


async def _drop(settings: Settings, nc: NATS, target: Target, progress: Progress) -> None:
    if target.schema_exists:
        progress(f"postgres: dropping schema {settings.pg_schema} ({_describe_tables(target)})")
        await asyncio.to_thread(_drop_schema, settings)
    for name, count in target.streams.items():
        if count is not None:
            progress(f"jetstream: deleting stream {name} ({count} messages)")
            await nc.jsm().delete_stream(name)


def _drop_schema(settings: Settings) -> None:
    with _pg(settings) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(settings.pg_schema)))


def _describe_tables(target: Target) -> str:
    return ", ".join(f"{t}: {n} rows" for t, n in target.tables.items()) or "no tables"


def _restore_postgres(settings: Settings, pg_restore: str, path: Path) -> None:
    result = subprocess.run(
        [
            pg_restore,
            "--exit-on-error",
            "--single-transaction",
            "--no-password",
            f"--dbname={settings.postgres.dbname}",
            str(path),
        ],
        env=_pg_env(settings),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BackupError(f"pg_restore failed: {_last_line(result.stderr)}")


async def _restore_stream(
    nc: NATS, directory: Path, entry: dict[str, Any], progress: Progress
) -> str:
    """Send the snapshot to the server in chunks, each acknowledged, then the empty end chunk."""
    name = entry["name"]
    progress(f"jetstream: {name}: restoring {entry['messages']} messages ({entry['bytes']} bytes)")
    state = {k: entry[k] for k in ("first_seq", "last_seq", "messages")}
    answer = await _api(
        nc,
        f"STREAM.RESTORE.{name}",
        {"config": entry["config"], "state": state},
        f"restore of stream {name}",
    )
    deliver = answer["deliver_subject"]
    chunks = _read_chunks(directory / entry["file"])
    try:
        while chunk := await asyncio.to_thread(next, chunks, b""):
            try:
                ack = await nc.request(deliver, chunk, timeout=REQUEST_TIMEOUT)
            except (NatsTimeoutError, NoRespondersError) as e:
                raise BackupError(f"restore of stream {name}: the server stopped answering") from e
            if ack.data:
                raise BackupError(f"restore of stream {name}: {ack.data.decode(errors='replace')}")
    finally:
        chunks.close()
    final = await nc.request(deliver, b"", timeout=FINISH_TIMEOUT)
    done = _answer(final.data, f"restore of stream {name}")
    got = done["state"]
    if (got["last_seq"], got["messages"]) == (entry["last_seq"], entry["messages"]):
        return (
            f"stream {name}: {got['messages']} messages, seq {got['first_seq']}..{got['last_seq']}"
            " (as backed up)"
        )
    max_age = entry["config"].get("max_age", 0)
    if got["last_seq"] == entry["last_seq"] and got["messages"] < entry["messages"] and max_age:
        return (
            f"stream {name}: {got['messages']} of {entry['messages']} messages, the rest older "
            f"than the stream's max age ({max_age // 86_400_000_000_000} days) and expired"
        )
    raise BackupError(
        f"stream {name} restored with {got['messages']} messages up to seq {got['last_seq']}, "
        f"the backup has {entry['messages']} up to seq {entry['last_seq']}"
    )


def _verify_postgres(settings: Settings, expected: dict[str, Any]) -> str:
    with _pg(settings) as conn:
        tables = _table_counts(conn, settings.pg_schema)
        max_position = _max_position(conn, settings.pg_schema)
    if tables != expected["tables"] or max_position != expected["max_position"]:
        raise BackupError(
            f"schema {settings.pg_schema} restored with {tables} up to position {max_position}, "
            f"the backup has {expected['tables']} up to position {expected['max_position']}"
        )
    rows = ", ".join(f"{t}: {n} rows" for t, n in sorted(tables.items()))
    return (
        f"postgres schema {settings.pg_schema}: {rows}, max position {max_position} (as backed up)"
    )


# --- helpers --------------------------------------------------------------------------------


async def _connect(settings: Settings) -> NATS:
    try:
        return await nats.connect(settings.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    except Exception as e:
        raise BackupError(f"cannot reach NATS at {settings.nats_url}: {e}") from e


async def _api(nc: NATS, call: str, body: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        msg = await nc.request(f"{API}.{call}", json.dumps(body).encode(), timeout=REQUEST_TIMEOUT)
    except (NatsTimeoutError, NoRespondersError) as e:
        raise BackupError(f"{what}: JetStream did not answer") from e
    return _answer(msg.data, what)


def _answer(data: bytes, what: str) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(data)
    if "error" in answer:
        error = answer["error"]
        raise BackupError(f"{what}: {error.get('description', error)} ({error.get('code')})")
    return answer


@contextlib.contextmanager
def _pg(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    pg = settings.postgres
    try:
        conn = psycopg.connect(
            **pg.connect_kwargs(),
            autocommit=True,
            connect_timeout=5,
        )
    except psycopg.Error as e:
        raise BackupError(f"cannot reach PostgreSQL at {pg.host}:{pg.port}/{pg.dbname}: {e}") from e
    with conn:
        yield conn


def _pg_env(settings: Settings) -> dict[str, str]:
    """libpq's environment for pg_dump/pg_restore: the password never reaches a command line."""
    pg = settings.postgres
    return {
        **os.environ,
        "PGHOST": pg.host,
        "PGPORT": str(pg.port),
        "PGUSER": pg.user,
        "PGPASSWORD": pg.password,
        "PGDATABASE": pg.dbname,
        "PGCONNECT_TIMEOUT": "5",
    }


def _table_counts(conn: psycopg.Connection[Any], schema: str) -> dict[str, int]:
    names = [
        r[0]
        for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename", (schema,)
        )
    ]
    counts = {}
    for name in names:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))
        row = conn.execute(query).fetchone()
        counts[name] = int(row[0]) if row else 0
    return counts


def _max_position(conn: psycopg.Connection[Any], schema: str) -> int:
    query = sql.SQL("SELECT coalesce(max(notification_id), 0) FROM {}").format(
        sql.Identifier(schema, EVENTS_TABLE)
    )
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _server_version(settings: Settings) -> tuple[int, str]:
    with _pg(settings) as conn:
        row = conn.execute("SELECT current_setting('server_version_num'), version()").fetchone()
    assert row is not None
    number = int(row[0])
    return number // 10000, f"{number // 10000}.{number % 10000}"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"{name} not found on PATH; install the PostgreSQL client tools")
    return path


def _tool_version(path: str) -> str:
    result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"(\d+(?:\.\d+)*)", result.stdout)
    if result.returncode != 0 or match is None:
        raise BackupError(f"{path} --version failed: {_last_line(result.stderr or result.stdout)}")
    return match.group(1)


def _major(version: str) -> int:
    return int(version.split(".", maxsplit=1)[0])


def _package_version() -> str:
    try:
        return metadata.version("iot-backend")
    except metadata.PackageNotFoundError:
        return "unknown"


def _digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
