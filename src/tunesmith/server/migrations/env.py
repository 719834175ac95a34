"""Alembic's environment for the job store: always run on the connection ``Store.upgrade`` hands over, so the
migration shares its lock (SQLite's write lock, PostgreSQL's advisory lock) and nothing reads an ini file."""

from alembic import context

from tunesmith.server.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
