"""Child processes (llama.cpp's server and converter, torchrun) run in their own process group with their output in
a named log file, and are stopped with everything they started when tunesmith is stopped. Real processes, no mocks:
the parent is itself run as a subprocess and signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tunesmith
from tunesmith import processes
from tunesmith.errors import RunError

ENV = {**os.environ, "PYTHONPATH": str(Path(tunesmith.__file__).parents[1])}

SERVER = """\
import signal, socket, subprocess, sys, time
if sys.argv[2] == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen(["sleep", "300"])  # the server's own child: same process group
server = socket.socket()
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
print("listening", server.getsockname()[1], "helper", helper.pid, flush=True)
while True:
    time.sleep(1)
"""

PARENT = """\
import sys
from tunesmith import processes
child = processes.start([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]], what="the test server",
                        log_path=sys.argv[4], stop_timeout_s=1.0)
print(child.pid, flush=True)
try:
    processes.wait(child)
finally:
    processes.stop(child)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (as servers do, with SO_REUSEADDR: a closed connection's
    TIME_WAIT does not hold the port, a listening socket does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps, as under a container's init, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _sigint_as_a_terminal_sends_it() -> None:
    """SIGINT back to its default in the child: a suite started in the background (``cmd &``) inherits it ignored,
    and Python then never raises KeyboardInterrupt, whatever the code under test does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("child_mode", ["default", "ignore-sigterm"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_tunesmith_stops_the_childs_whole_group_and_frees_its_port(tmp_path, sig, child_mode):
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "parent.py").write_text(PARENT)
    port, log = free_port(), tmp_path / "server.log"
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "server.py"), str(port),
                               child_mode, str(log)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=_sigint_as_a_terminal_sends_it)
    child = int(parent.stdout.readline())
    helper = None
    try:
        wait_for(lambda: "listening" in log.read_text(), 30, "the child to listen")
        helper = int(log.read_text().split()[-1])
        assert os.getpgid(child) == child != os.getpgid(parent.pid)  # its own group, led by itself
        assert os.getpgid(helper) == child and not port_is_free(port)

        signalled = time.monotonic()
        parent.send_signal(sig)
        # SIGTERM: SystemExit(128 + 15); SIGINT: KeyboardInterrupt, uncaught here (the CLI turns it into exit 130)
        assert parent.wait(timeout=30) == (143 if sig == signal.SIGTERM else -signal.SIGINT)
        elapsed = time.monotonic() - signalled
        # a child that ignores SIGTERM gets stop_timeout_s (1 s here), then SIGKILL
        assert elapsed < 1.0 if child_mode == "default" else 1.0 <= elapsed < 3.0
        assert not alive(child) and not alive(helper) and port_is_free(port)
        assert f"listening {port} helper {helper}" in log.read_text()  # its output went to the log
    finally:
        for pid in (child, helper):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.kill()


SLOW_TO_STOP = """\
import signal, sys, time
# a worker checkpointing its job: SIGTERM starts a stop that takes STOP_S, then it exits
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(float(sys.argv[1])), sys.exit(0)))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_stop_all_stops_several_children_in_the_time_of_the_slowest(tmp_path):
    """Three children that each take 1.5 s to stop after SIGTERM: one after another that is 4.5 s; all signalled
    first, then one wait, it is the slowest one's 1.5 s (well under 3 s on a loaded machine)."""
    (tmp_path / "slow.py").write_text(SLOW_TO_STOP)
    children = [processes.start([sys.executable, str(tmp_path / "slow.py"), "1.5"], what=f"slow {n}",
                                log_path=tmp_path / f"slow-{n}.log", stop_timeout_s=20)
                for n in range(3)]
    try:
        for n in range(3):
            wait_for(lambda n=n: "ready" in (tmp_path / f"slow-{n}.log").read_text(), 30, f"child {n} to start")
        started = time.monotonic()
        processes.stop_all(children)
        elapsed = time.monotonic() - started
        assert all(c.returncode == 0 for c in children)  # each stopped on its own (SIGTERM), none was killed
        assert 1.5 <= elapsed < 3.0, elapsed
        assert not any(alive(c.pid) for c in children)
    finally:
        for child in children:
            if alive(child.pid):
                os.killpg(child.pid, signal.SIGKILL)


def test_a_failing_child_is_a_run_error_naming_its_log_and_quoting_its_last_lines(tmp_path):
    log = tmp_path / "logs" / "convert.log"
    script = "import sys\nprint('loading 2 tensors')\nprint('tensor blk.0: bad shape', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(RunError) as info:
        processes.run([sys.executable, "-c", script], what="the converter", log_path=log)
    assert info.value.message == (f"the converter exited with code 3; its output is in {log}; its last lines:\n"
                                  "loading 2 tensors\ntensor blk.0: bad shape")
    assert log.read_text() == "loading 2 tensors\ntensor blk.0: bad shape\n"
    assert not processes._LIVE


def test_echoed_output_is_shown_and_kept_in_the_log(tmp_path):
    log, shown_out, shown_err = tmp_path / "torchrun.log", tmp_path / "out", tmp_path / "err"
    script = "import sys\nprint('step 1 loss 2.0', flush=True)\nprint('warning', file=sys.stderr)"
    with open(shown_out, "wb") as out, open(shown_err, "wb") as err:
        child = processes.start([sys.executable, "-c", script], what="torchrun", log_path=log, echo=(out, err))
        try:
            assert processes.wait(child) == 0
        finally:
            processes.stop(child)
    assert shown_out.read_text() == "step 1 loss 2.0\n" and shown_err.read_text() == "warning\n"
    assert sorted(log.read_text().splitlines()) == ["step 1 loss 2.0", "warning"]


def test_a_failing_gguf_converter_names_its_log_file_and_leaves_no_partial_file(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    pytest.importorskip("llama_cpp")
    from tunesmith.export.gguf import to_gguf

    fake = tmp_path / "convert_hf_to_gguf.py"
    fake.write_text(textwrap.dedent("""\
        import sys
        out = sys.argv[sys.argv.index("--outfile") + 1]
        open(out, "wb").write(b"GGUF half written")
        print("INFO:hf-to-gguf:Loading model: tiny")
        print("ValueError: tensor model.layers.0.mlp.up_proj.weight: cannot map", file=sys.stderr)
        sys.exit(1)
        """))
    monkeypatch.setenv("TUNESMITH_GGUF_CONVERTER", str(fake))
    out = tmp_path / "gguf"
    with pytest.raises(RunError) as info:
        to_gguf(tiny_model_dir, out, "f16", verify=False)
    log = out / "model-f16.convert.log"
    assert f"llama.cpp's converter on {tiny_model_dir} exited with code 1; its output is in {log}" in info.value.message
    assert "cannot map" in info.value.message
    assert "Loading model: tiny" in log.read_text() and "cannot map" in log.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.convert.log"]  # no .partial, no .gguf


def test_train_on_several_processes_names_the_torchrun_log_when_a_worker_fails(tmp_path):
    config = tmp_path / "tunesmith.yaml"
    config.write_text(f"model:\n  name_or_path: local:tiny\ntrain:\n  dataset: {tmp_path / 'missing.jsonl'}\n")
    run_dir = tmp_path / "run"
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(config), "--gpus", "2", "--out",
                           str(run_dir)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    log = run_dir / "torchrun.log"
    assert proc.returncode == 1, proc.stderr
    assert f"torchrun exited with code 1; its output is in {log} (shown above)" in proc.stderr
    assert "missing.jsonl" in log.read_text() and "missing.jsonl" in proc.stderr  # kept, and shown as it ran
    assert "Traceback" not in proc.stderr.split("error: torchrun")[-1]
