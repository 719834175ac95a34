"""``tunesmith server``: open the job store, bind the port, start the workers, serve the API until a signal.

The order is the one that lets every start-up problem be one clear message before anything runs: the data dir is
writable, the database opens and migrates, keys exist where they are required, the port binds — only then do the
worker processes start and uvicorn serve (on the socket bound here, so "address in use" is our message, not a
traceback). SIGTERM, SIGINT and SIGHUP end it the same way: uvicorn stops taking requests, each worker's process
group is stopped, all at once (a running job checkpoints and goes back to the queue), the socket is closed, exit 0.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from .. import processes
from ..errors import UserError
from ..paths import output_folder
from ..signals import handling
from . import db
from .api import create_app
from .settings import ServerSettings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def open_store(settings: ServerSettings) -> db.Store:
    """The job store for ``settings``, migrated to this tunesmith's schema."""
    output_folder(settings.data_dir, "--data-dir", create=True)
    store = db.connect(settings.database_url)
    try:
        store.upgrade()
    except SQLAlchemyError as exc:
        store.close()
        shown = settings.database_url.split("@")[-1]
        raise UserError(f"--database: cannot open the job store at {shown}: {str(exc.orig or exc).strip()}",
                        hint="check the URL, that the database server runs and that its user may create tables"
                        ) from None
    return store


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); a port in use or an unknown host is a UserError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: the address {host}:{port} is already in use",
                            hint="stop what listens there, or choose another --port") from None
        raise UserError(f"--host {host}: cannot listen on {host}:{port}: {exc.strerror or exc}",
                        hint="use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None


def serve(settings: ServerSettings, *, on_ready: Callable[[str], None]) -> None:
    """Run the service until SIGTERM, SIGINT or SIGHUP; ``on_ready`` gets the base URL once requests are served."""
    gpu_sets = settings.worker_gpu_sets  # too few GPUs for the workers: said before anything opens or binds
    store = open_store(settings)
    try:
        if settings.api_keys_required and not store.has_api_keys():
            why = "listening on a non-loopback address" if settings.api_keys_required and not settings.require_keys \
                else "--require-keys"
            raise UserError(f"the server needs API keys ({why}) and {settings.database_url.split('@')[-1]} has none",
                            hint=f"create one first: tunesmith server keys create NAME --data-dir {settings.data_dir}")
        sock = bind(settings.host, settings.port)
        try:
            _run(settings, store, sock, on_ready, gpu_sets)
        finally:
            sock.close()
    finally:
        store.close()


def _run(settings: ServerSettings, store: db.Store, sock: socket.socket, on_ready: Callable[[str], None],
         gpu_sets: tuple[tuple[str, ...], ...]) -> None:
    from .worker import start_workers

    app = create_app(settings, store)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=5))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("server: %s, stopping", signal.Signals(signum).name)
        stop.set()

    # uvicorn installs its signal handlers only on the main thread: serving from another leaves them here, with one
    # stop path for every signal
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    workers: list[processes.Child] = []
    with handling(on_signal, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            thread.start()
            _wait_started(server, thread)
            workers = start_workers(settings, gpu_sets)
            host, port = sock.getsockname()[:2]
            on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}")
            while not stop.wait(0.5) and thread.is_alive():
                pass
        finally:
            server.should_exit = True
            thread.join(STOP_TIMEOUT_S)
            # every worker at once: each checkpoints its job in parallel, so N workers stop in the time of one
            processes.stop_all(workers)
            app.state.registry.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    waited = threading.Event()
    for _ in range(int(START_TIMEOUT_S / 0.05)):
        if server.started:
            return
        if not thread.is_alive():
            break
        waited.wait(0.05)
    raise UserError("the HTTP server did not start", hint="run again with --debug and see the log above")
