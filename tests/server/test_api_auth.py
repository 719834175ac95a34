"""Keys, ownership and the server's lifecycle: who may call, whose objects they see, and start-up errors and
SIGTERM as a user meets them (one line, exit 2; the port free again after exit)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from .conftest import free_port, start_server, write_chat_jsonl


def tunesmith(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it; ``output`` is what it printed (messages go to stderr, --json to stdout)."""
    done = subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})
    done.output = done.stdout + done.stderr
    return done


def new_key(data_dir, name: str) -> str:
    made = tunesmith("server", "keys", "create", name, "--data-dir", str(data_dir), "--json")
    assert made.returncode == 0, made.stderr + made.stdout
    return json.loads(made.stdout)["key"]


def test_with_keys_required_each_key_sees_only_its_own_files_and_jobs(tmp_path):
    data = tmp_path / "data"
    alice, bob = new_key(data, "alice"), new_key(data, "bob")
    listed = tunesmith("server", "keys", "list", "--data-dir", str(data), "--json")
    assert [k["name"] for k in json.loads(listed.stdout)["keys"]] == ["alice", "bob"]
    assert alice not in listed.stdout and bob not in listed.stdout  # secrets are never shown again
    assert alice not in (data / "tunesmith.db").read_bytes().decode("latin-1")  # only the hash is stored

    with start_server(data, extra=["--require-keys"]) as server:
        with pytest.raises(openai.AuthenticationError) as caught:
            server.client().files.list()
        assert caught.value.code == "invalid_api_key"
        bare = httpx.get(f"{server.base_url}/files")
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "missing_api_key"
        assert "tunesmith server keys create" in bare.json()["error"]["message"]

        a, b = server.client(alice), server.client(bob)
        with write_chat_jsonl(tmp_path / "a.jsonl", 10).open("rb") as f:
            file = a.files.create(file=f, purpose="fine-tune")
        job = a.fine_tuning.jobs.create(model="local:demo", training_file=file.id)
        assert [f.id for f in a.files.list()] == [file.id] and b.files.list().data == []
        assert b.fine_tuning.jobs.list().data == []
        for call in (lambda: b.files.retrieve(file.id), lambda: b.files.content(file.id),
                     lambda: b.files.delete(file.id), lambda: b.fine_tuning.jobs.retrieve(job.id),
                     lambda: b.fine_tuning.jobs.cancel(job.id), lambda: b.fine_tuning.jobs.list_events(job.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.BadRequestError) as caught:  # bob cannot train on alice's file either
            b.fine_tuning.jobs.create(model="local:demo", training_file=file.id)
        assert caught.value.param == "training_file"
        assert a.fine_tuning.jobs.retrieve(job.id).status == "validating_files"

        revoked = tunesmith("server", "keys", "revoke", "bob", "--data-dir", str(data))
        assert revoked.returncode == 0, revoked.output
        with pytest.raises(openai.AuthenticationError):
            b.files.list()
        assert a.files.list().data  # alice's key still works


def test_a_non_loopback_address_without_keys_refuses_to_start_saying_how_to_make_one(tmp_path):
    result = tunesmith("server", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"),
                       "--workers", "0")
    assert result.returncode == 2, result.output
    assert "needs API keys" in result.output and "tunesmith server keys create" in result.output
    assert "Traceback" not in result.output


def test_start_up_errors_are_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = tunesmith("server", "--port", str(port), "--data-dir", str(tmp_path / "a"), "--workers", "0")
    assert in_use.returncode == 2 and "already in use" in in_use.output, in_use.output

    bad_url = tunesmith("server", "--database", "mysql://x@localhost/db", "--data-dir", str(tmp_path / "b"))
    assert bad_url.returncode == 2 and "SQLite or PostgreSQL" in bad_url.output

    unreachable = tunesmith("server", "--database", "postgresql://nobody@127.0.0.1:1/none",
                            "--data-dir", str(tmp_path / "c"))
    assert unreachable.returncode == 2 and "cannot open the job store" in unreachable.output

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    not_a_dir = tunesmith("server", "--data-dir", str(blocker), "--port", str(free_port()))
    assert not_a_dir.returncode == 2 and "--data-dir" in not_a_dir.output
    for result in (in_use, bad_url, unreachable, not_a_dir):
        assert "Traceback" not in result.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_and_its_workers_and_frees_the_port(tmp_path, sig):
    with start_server(tmp_path / "data", workers=1) as server:
        assert httpx.get(f"{server.base_url}/models").status_code == 200
        children: list[str] = []
        for _ in range(100):  # the worker starts just after the API answers
            children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True,
                                      text=True).stdout.split()
            if children:
                break
            time.sleep(0.1)
        assert children, server.log()
        assert server.stop(sig) == 0, server.log()
        assert "stopped" in server.log()
        with socket.socket() as again:  # bindable at once: nothing holds it, not even TIME_WAIT blocks it
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", server.port))
        for pid in children:
            assert subprocess.run(["ps", "-p", pid], capture_output=True).returncode != 0, f"worker {pid} lives"
