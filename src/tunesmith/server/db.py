"""The service's job store: files, jobs, events, metrics and checkpoints in one SQL database.

SQLite (a file under the data dir) by default, PostgreSQL by URL. The schema is owned by the Alembic migrations in
``migrations/``; ``Store.upgrade()`` applies them at start-up (never ``create_all``), so a database made by an older
tunesmith is brought forward in place.

Every store method opens and commits its own short transaction and returns frozen records, never live ORM objects,
so callers in the API, the worker and the dashboard never share a session or see a half-written row.

Concurrency: several processes (the server, its workers, workers on other machines) write at once.
- PostgreSQL: ``claim_job`` takes ``SELECT … FOR UPDATE SKIP LOCKED``, so two workers never claim one job; per-job
  writes that read first (event numbering, requests) lock the job's row with ``FOR UPDATE``.
- SQLite: one writer at a time. Transactions that write start with ``BEGIN IMMEDIATE`` (they take the write lock
  before reading, so a read-then-write never fails half-way with "database is locked"), the journal is WAL (readers
  do not block the writer) and a busy timeout makes a second writer wait instead of failing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from tunesmith.errors import UserError

JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled")
# A job a worker may hold: these three are claimable again once their holder's lease has run out.
ACTIVE: tuple[str, ...] = ("validating_files", "queued", "running")
SQLITE_BUSY_MS = 30_000


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """``prefix`` + 16 hex digits of the clock in ns + 8 random ones: unique, and ids made later sort later, so one
    ``ORDER BY id`` gives creation order and a cursor (``after=id``) needs no second column."""
    return f"{prefix}{time.time_ns():016x}{secrets.token_hex(4)}"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# --- tables ---------------------------------------------------------------------------------------------------------

class Base(DeclarativeBase):
    pass


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(Integer)
    revoked_at: Mapped[int | None] = mapped_column(Integer)


class FileRow(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    status_details: Mapped[str | None] = mapped_column(Text)
    storage_name: Mapped[str] = mapped_column(String(64))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(32), index=True)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    # ``metadata`` is the declarative base's own attribute: the column keeps the name, the attribute gets a ``_``.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(700))
    finished_at: Mapped[int | None] = mapped_column(Integer)
    trained_tokens: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[int | None] = mapped_column(Integer)
    result_files: Mapped[list[Any]] = mapped_column(JSON)
    requested: Mapped[str | None] = mapped_column(String(16))
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    out_dir: Mapped[str] = mapped_column(String(200))
    artefacts: Mapped[dict[str, Any]] = mapped_column(JSON)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class MetricRow(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "kind", "step"), Index("ix_metrics_job_id_step", "job_id", "step"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(Integer)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(800))
    path: Mapped[str] = mapped_column(String(400))


# --- records (what crosses the module boundary) ---------------------------------------------------------------------

@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    key_hash: str
    created_at: int
    revoked_at: int | None


@dataclass(frozen=True)
class File:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    status: str
    status_details: str | None
    storage_name: str
    deleted: bool


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    created_at: int
    model: str
    status: str
    training_file: str
    validation_file: str | None
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    suffix: str | None
    seed: int
    metadata: dict[str, Any]
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    estimated_finish: int | None
    result_files: list[Any]
    requested: str | None
    worker_id: str | None
    lease_expires_at: int | None
    attempts: int
    out_dir: str
    artefacts: dict[str, Any]


@dataclass(frozen=True)
class Event:
    id: str
    job_id: str
    seq: int
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class Metric:
    job_id: str
    kind: str
    step: int
    values: dict[str, Any]
    created_at: int


@dataclass(frozen=True)
class Checkpoint:
    id: str
    job_id: str
    step_number: int
    created_at: int
    metrics: dict[str, Any]
    fine_tuned_model_checkpoint: str
    path: str


R = TypeVar("R")


@dataclass(frozen=True)
class Page(Generic[R]):
    """One page of a cursor listing: ``items`` in the listing's order, ``has_more`` when a next page exists."""
    items: tuple[R, ...]
    has_more: bool


class Conflict(Exception):
    """A request that the job's present state does not allow (cancel a finished job, pause a queued one)."""


_RECORDS: dict[type, type] = {ApiKeyRow: ApiKey, FileRow: File, JobRow: Job, EventRow: Event, MetricRow: Metric,
                              CheckpointRow: Checkpoint}
_JOB_ATTRS = {"metadata": "metadata_"}


def _record(row: Any) -> Any:
    cls = _RECORDS[type(row)]
    return cls(**{f.name: getattr(row, _JOB_ATTRS.get(f.name, f.name) if cls is Job else f.name)
                  for f in dataclasses.fields(cls)})


def _page(rows: Sequence[Any], limit: int) -> Page[Any]:
    return Page(items=tuple(_record(r) for r in rows[:limit]), has_more=len(rows) > limit)


# --- engine ---------------------------------------------------------------------------------------------------------

def engine_url(database_url: str) -> str:
    """The SQLAlchemy URL for what a user typed: ``postgresql://`` means psycopg 3 (the driver tunesmith installs)."""
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise UserError(f"--database {database_url!r} is not a database URL",
                        hint="use sqlite:///PATH/tunesmith.db or postgresql://USER@HOST:PORT/DBNAME") from exc
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise UserError(f"--database {database_url!r}: tunesmith's job store runs on SQLite or PostgreSQL, not "
                        f"{url.get_backend_name()}", hint="use sqlite:///PATH/tunesmith.db or postgresql://…")
    return url.render_as_string(hide_password=False)


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling issues BEGIN lazily and only before writes; turn it off so the
        # "begin" hook below decides (the SQLAlchemy documentation's recipe for SQLite transactions).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writes") else "BEGIN")

    return engine


class Store:
    """The engine and two session factories: ``_reading`` for lookups, ``_writing`` for transactions that write."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        self._write = sessionmaker(bind=engine.execution_options(writes=True), expire_on_commit=False)

    # ----- plumbing

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write() as session, session.begin():
            yield session

    def _job_for_update(self, session: Session, job_id: str) -> JobRow | None:
        # SQLite already holds the database's write lock (BEGIN IMMEDIATE); PostgreSQL locks this one row.
        return session.scalars(select(JobRow).where(JobRow.id == job_id).with_for_update()).one_or_none()

    def upgrade(self) -> None:
        """Apply every Alembic migration the database lacks (a new database gets the whole schema)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
        with self.engine.execution_options(writes=True).begin() as conn:
            if not self.is_sqlite:
                # two processes starting at once: the second waits here, then finds the schema up to date.
                conn.execute(text("SELECT pg_advisory_xact_lock(742024)"))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    # ----- API keys

    def create_api_key(self, *, name: str) -> tuple[ApiKey, str]:
        """A new key: its record and the secret, shown once (only its sha256 is stored)."""
        secret = "ts-" + secrets.token_urlsafe(32)
        row = ApiKeyRow(id=new_id("key-"), name=name, key_hash=hash_key(secret), created_at=now(), revoked_at=None)
        with self._writing() as session:
            session.add(row)
        return _record(row), secret

    def list_api_keys(self) -> list[ApiKey]:
        with self._reading() as session:
            return [_record(r) for r in session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.id))]

    def revoke_api_key(self, *, key: str) -> ApiKey | None:
        """Revoke the key whose id or name is ``key``; None when there is no such live key."""
        with self._writing() as session:
            row = session.scalars(select(ApiKeyRow).where(or_(ApiKeyRow.id == key, ApiKeyRow.name == key),
                                                          ApiKeyRow.revoked_at.is_(None))).first()
            if row is None:
                return None
            row.revoked_at = now()
            return _record(row)

    def key_for_secret(self, *, secret: str) -> ApiKey | None:
        with self._reading() as session:
            row = session.scalars(select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_key(secret),
                                                          ApiKeyRow.revoked_at.is_(None))).one_or_none()
            return None if row is None else _record(row)

    def has_api_keys(self) -> bool:
        with self._reading() as session:
            return session.scalar(select(func.count()).select_from(ApiKeyRow)
                                  .where(ApiKeyRow.revoked_at.is_(None))) > 0

    # ----- files

    def create_file(self, *, owner: str, filename: str, purpose: str, bytes: int, id: str | None = None,
                    status: str = "processed", status_details: str | None = None) -> File:
        """Record a file whose content is already stored as ``<data_dir>/files/<id>`` (make ``id`` with
        ``new_id("file-")`` before writing it)."""
        file_id = id or new_id("file-")
        row = FileRow(id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=bytes, created_at=now(),
                      status=status, status_details=status_details, storage_name=file_id, deleted=False)
        with self._writing() as session:
            session.add(row)
        return _record(row)

    def get_file(self, file_id: str, *, owner: str | None = None) -> File | None:
        """The live file ``file_id`` (of ``owner`` when given); None when absent, deleted or another owner's."""
        with self._reading() as session:
            query = select(FileRow).where(FileRow.id == file_id, FileRow.deleted.is_(False))
            if owner is not None:
                query = query.where(FileRow.owner == owner)
            row = session.scalars(query).one_or_none()
            return None if row is None else _record(row)

    def list_files(self, *, owner: str | None, purpose: str | None = None, after: str | None = None,
                   limit: int = 10_000, order: Literal["asc", "desc"] = "desc") -> Page[File]:
        query = select(FileRow).where(FileRow.deleted.is_(False))
        if owner is not None:
            query = query.where(FileRow.owner == owner)
        if purpose is not None:
            query = query.where(FileRow.purpose == purpose)
        if after is not None:
            query = query.where(FileRow.id > after if order == "asc" else FileRow.id < after)
        query = query.order_by(FileRow.id.asc() if order == "asc" else FileRow.id.desc()).limit(limit + 1)
        with self._reading() as session:
            return _page(session.scalars(query).all(), limit)

    def delete_file(self, file_id: str, *, owner: str | None = None) -> File | None:
        """Mark the file deleted (the caller removes its content); None when there was no such live file."""
        with self._writing() as session:
            query = select(FileRow).where(FileRow.id == file_id, FileRow.deleted.is_(False))
            if owner is not None:
                query = query.where(FileRow.owner == owner)
            row = session.scalars(query).one_or_none()
            if row is None:
                return None
            row.deleted = True
            return _record(row)

    # ----- jobs

    def create_job(self, *, owner: str, model: str, training_file: str, validation_file: str | None,
                   method: Mapping[str, Any], hyperparameters: Mapping[str, Any], suffix: str | None, seed: int,
                   metadata: Mapping[str, Any] | None, id: str | None = None) -> Job:
        """A new job in ``validating_files``, unclaimed; its run folder is ``jobs/<id>`` under the data dir."""
        job_id = id or new_id("ftjob-")
        row = JobRow(id=job_id, owner=owner, created_at=now(), model=model, status="validating_files",
                     training_file=training_file, validation_file=validation_file, method=dict(method),
                     hyperparameters=dict(hyperparameters), suffix=suffix, seed=seed, metadata_=dict(metadata or {}),
                     error=None, fine_tuned_model=None, finished_at=None, trained_tokens=None, estimated_finish=None,
                     result_files=[], requested=None, worker_id=None, lease_expires_at=None, attempts=0,
                     out_dir=f"jobs/{job_id}", artefacts={})
        with self._writing() as session:
            session.add(row)
        return _record(row)

    def get_job(self, job_id: str, *, owner: str | None = None) -> Job | None:
        with self._reading() as session:
            query = select(JobRow).where(JobRow.id == job_id)
            if owner is not None:
                query = query.where(JobRow.owner == owner)
            row = session.scalars(query).one_or_none()
            return None if row is None else _record(row)

    def list_jobs(self, *, owner: str | None, after: str | None = None, limit: int = 20,
                  metadata: Mapping[str, str] | None = None, status: str | None = None) -> Page[Job]:
        """Newest first; ``metadata`` keeps jobs whose metadata holds every given key with the given value."""
        query = select(JobRow)
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        if status is not None:
            query = query.where(JobRow.status == status)
        for key, value in (metadata or {}).items():
            query = query.where(JobRow.metadata_[key].as_string() == value)
        if after is not None:
            query = query.where(JobRow.id < after)
        query = query.order_by(JobRow.id.desc()).limit(limit + 1)
        with self._reading() as session:
            return _page(session.scalars(query).all(), limit)

    def update_job(self, job_id: str, *, only_if_status: Sequence[str] | None = None,
                   only_if_worker: str | None = None, **fields: Any) -> Job | None:
        """Set ``fields`` (names as on ``Job``) and return the job; None when it does not exist, or when
        ``only_if_status`` / ``only_if_worker`` are given and the job's status / holder differ (a worker finishing a
        job the API cancelled meanwhile must not overwrite ``cancelled``)."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(Job)} - {"id"}
        if unknown or "id" in fields:
            raise TypeError(f"update_job: not settable: {sorted(unknown | ({'id'} & set(fields)))}")
        with self._writing() as session:
            row = self._job_for_update(session, job_id)
            if row is None or (only_if_status is not None and row.status not in only_if_status) or (
                    only_if_worker is not None and row.worker_id != only_if_worker):
                return None
            for name, value in fields.items():
                setattr(row, _JOB_ATTRS.get(name, name), value)
            return _record(row)

    def request(self, job_id: str, action: Literal["cancel", "pause", "resume"]) -> Job | None:
        """Carry out a client's cancel / pause / resume as far as the store can, in one transaction.

        - cancel: a finished job → ``Conflict``. Otherwise the job is ``cancelled`` at once (what the client expects
          back); if a worker holds it, ``requested="cancel"`` also stays set and the worker's next ``heartbeat``
          returns False, so it stops the run.
        - pause: only a ``running`` job; sets ``requested="pause"``; the worker checkpoints, stops and sets ``paused``.
        - resume: only a ``paused`` job; back to ``queued`` (unclaimed) so a worker picks it up with ``--resume``.
        None when the job does not exist."""
        with self._writing() as session:
            row = self._job_for_update(session, job_id)
            if row is None:
                return None
            t = now()
            if action == "cancel":
                if row.status in FINISHED:
                    raise Conflict(f"Job {job_id} is already {row.status}; it cannot be cancelled")
                held = row.worker_id is not None and (row.lease_expires_at or 0) >= t
                row.status, row.finished_at, row.requested = "cancelled", t, ("cancel" if held else None)
                row.estimated_finish = None
                message = "Fine-tuning job cancelled"
            elif action == "pause":
                if row.status != "running":
                    raise Conflict(f"Job {job_id} is {row.status}; only a running job can be paused")
                if row.requested == "pause":
                    return _record(row)
                row.requested = "pause"
                message = "Pausing fine-tuning job: a checkpoint is being saved"
            else:
                if row.status != "paused":
                    raise Conflict(f"Job {job_id} is {row.status}; only a paused job can be resumed")
                row.status, row.requested, row.worker_id, row.lease_expires_at = "queued", None, None, None
                message = "Fine-tuning job resumed, moving job to queued state"
            self._add_event(session, row.id, "info", message, "message", None)
            return _record(row)

    def claim_job(self, *, worker_id: str, lease_s: int) -> Job | None:
        """Take the oldest job a worker should run: ``validating_files`` / ``queued`` and unheld, or any of the
        active statuses whose holder's lease ran out (a dead worker's job). Sets the holder and lease and counts
        the attempt; the status is the worker's to change."""
        t = now()
        query = (select(JobRow)
                 .where(JobRow.status.in_(ACTIVE),
                        or_(JobRow.worker_id.is_(None), JobRow.lease_expires_at.is_(None),
                            JobRow.lease_expires_at < t),
                        # a running job is only ever unheld because its lease expired, never freshly queued
                        or_(JobRow.status != "running", JobRow.worker_id.is_not(None)))
                 .order_by(JobRow.id).limit(1))
        if not self.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        with self._writing() as session:
            row = session.scalars(query).one_or_none()
            if row is None:
                return None
            row.worker_id, row.lease_expires_at, row.attempts = worker_id, t + lease_s, row.attempts + 1
            return _record(row)

    def heartbeat(self, job_id: str, *, worker_id: str, lease_s: int) -> bool:
        """Extend ``worker_id``'s lease on the job; False when the job is no longer its to run (another worker took
        it after the lease expired, or it was cancelled): the worker must stop the run and write nothing more."""
        with self._writing() as session:
            result = session.execute(update(JobRow)
                                     .where(JobRow.id == job_id, JobRow.worker_id == worker_id,
                                            JobRow.status.in_(ACTIVE))
                                     .values(lease_expires_at=now() + lease_s))
            return result.rowcount == 1

    # ----- events

    def _add_event(self, session: Session, job_id: str, level: str, message: str, type: str,
                   data: Mapping[str, Any] | None) -> EventRow:
        seq = (session.scalar(select(func.max(EventRow.seq)).where(EventRow.job_id == job_id)) or 0) + 1
        row = EventRow(id=new_id("ft-event-"), job_id=job_id, seq=seq, created_at=now(), level=level, type=type,
                       message=message, data=None if data is None else dict(data))
        session.add(row)
        return row

    def add_event(self, job_id: str, *, level: Literal["info", "warn", "error"], message: str,
                  type: Literal["message", "metrics"] = "message", data: Mapping[str, Any] | None = None) -> Event:
        with self._writing() as session:
            # the job's row lock orders concurrent writers of one job's events (PostgreSQL)
            self._job_for_update(session, job_id)
            row = self._add_event(session, job_id, level, message, type, data)
        return _record(row)

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> Page[Event]:
        """Newest first; ``after`` is an event id, and the page holds the events older than it."""
        query = select(EventRow).where(EventRow.job_id == job_id)
        with self._reading() as session:
            if after is not None:
                cursor = session.scalar(select(EventRow.seq).where(EventRow.job_id == job_id, EventRow.id == after))
                if cursor is None:
                    return Page(items=(), has_more=False)
                query = query.where(EventRow.seq < cursor)
            return _page(session.scalars(query.order_by(EventRow.seq.desc()).limit(limit + 1)).all(), limit)

    # ----- metrics

    def upsert_metric(self, job_id: str, *, kind: Literal["train", "eval"], step: int,
                      values: Mapping[str, Any]) -> None:
        """Write the step's metrics, replacing what a run before a resume wrote for the same step."""
        with self._writing() as session:
            row = session.scalars(select(MetricRow).where(MetricRow.job_id == job_id, MetricRow.kind == kind,
                                                          MetricRow.step == step).with_for_update()).one_or_none()
            if row is None:
                session.add(MetricRow(job_id=job_id, kind=kind, step=step, values=dict(values), created_at=now()))
            else:
                row.values, row.created_at = dict(values), now()

    def drop_metrics_after(self, job_id: str, *, step: int) -> int:
        """Remove the job's metrics rows past ``step`` (a resume's checkpoint: those steps are trained again);
        how many were removed."""
        with self._writing() as session:
            result = session.execute(delete(MetricRow).where(MetricRow.job_id == job_id, MetricRow.step > step))
            return result.rowcount

    def metrics(self, job_id: str, *, kind: str | None = None) -> list[Metric]:
        """Oldest step first (train and eval interleaved by step)."""
        # plain rows, not ORM objects: a job page reads 10,000+ points, and building (and tracking) an ORM object per
        # row cost most of the read
        query = select(MetricRow.job_id, MetricRow.kind, MetricRow.step, MetricRow.values, MetricRow.created_at
                       ).where(MetricRow.job_id == job_id)
        if kind is not None:
            query = query.where(MetricRow.kind == kind)
        with self._reading() as session:
            return [Metric(*row) for row in session.execute(query.order_by(MetricRow.step, MetricRow.kind))]

    # ----- checkpoints

    def add_checkpoint(self, job_id: str, *, step_number: int, metrics: Mapping[str, Any],
                       fine_tuned_model_checkpoint: str, path: str) -> Checkpoint:
        """Record a saved checkpoint; one at the same step (a resumed run saving it again) is replaced."""
        with self._writing() as session:
            row = session.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id,
                                                              CheckpointRow.step_number == step_number)
                                  .with_for_update()).one_or_none()
            if row is None:
                row = CheckpointRow(id=new_id("ftckpt_"), job_id=job_id, step_number=step_number)
                session.add(row)
            row.created_at, row.metrics, row.path = now(), dict(metrics), path
            row.fine_tuned_model_checkpoint = fine_tuned_model_checkpoint
        return _record(row)

    def list_checkpoints(self, job_id: str, *, after: str | None = None, limit: int = 10) -> Page[Checkpoint]:
        """Newest (highest step) first; ``after`` is a checkpoint id, and the page holds the earlier ones."""
        query = select(CheckpointRow).where(CheckpointRow.job_id == job_id)
        with self._reading() as session:
            if after is not None:
                cursor = session.scalar(select(CheckpointRow.step_number).where(CheckpointRow.job_id == job_id,
                                                                                CheckpointRow.id == after))
                if cursor is None:
                    return Page(items=(), has_more=False)
                query = query.where(CheckpointRow.step_number < cursor)
            return _page(session.scalars(query.order_by(CheckpointRow.step_number.desc()).limit(limit + 1)).all(),
                         limit)


def connect(database_url: str) -> Store:
    """A store on ``database_url`` (``sqlite:///…`` or ``postgresql://…``); call ``upgrade()`` before first use."""
    url = engine_url(database_url)
    try:
        if make_url(url).get_backend_name() == "sqlite":
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            return Store(_sqlite_engine(url))
        return Store(create_engine(url, pool_pre_ping=True))
    except NoSuchModuleError as exc:
        raise UserError(f"--database {database_url!r}: no driver for it is installed", hint=str(exc)) from exc
