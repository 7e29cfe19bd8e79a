"""`make gpu-check`: every GPU check in one command, on the lent GPU machine (or `--device cpu`).

Stages, each in its own process under its own timeout, all within one deadline (9 minutes):
1. packages: the versions of what the machine is expected to have;
2. install: the kit's wheels (`make gpu-kit`, in .whl/) that suit this interpreter, into a temporary site
   directory put first on PYTHONPATH;
3. models: random-weight SmolLM2-135M- and Qwen3-0.6B-shaped models (benchmarks/gpu_stages.py);
4. tests: `pytest -m gpu`, with SLUICE_GPU_MODELS naming the models;
5. bench: each model served by Sluice (benchmarks/gpu_stages.py).
It writes `summary.json` and the full log `gpu-check.log` under `--out` ($OUT on the device
machine) and exits non-zero when a stage failed, or, on CUDA, when a gpu test was skipped.
`--device cpu` runs the same stages at tiny sizes, where the gpu tests skip: CI runs it so, and
so the kit cannot rot unnoticed.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = [
    "torch", "triton", "transformers", "aiohttp", "grpcio", "protobuf", "prometheus-client", "jinja2",
    "tokenizers", "safetensors", "pytest", "hypothesis", "numpy", "psutil", "requests",
]  # fmt: skip
TIMEOUTS = {"install": 120, "models": 120, "tests": 180, "bench": 150}  # seconds, each stage (bench: per model)


class Check:
    def __init__(self, out: Path, device: str, deadline_s: float):
        self.out, self.device = out, device
        self.deadline = time.monotonic() + deadline_s
        self.work = Path(tempfile.mkdtemp(prefix="sluice-gpu-check-"))
        self.log = (out / "gpu-check.log").open("w")
        self.summary: dict = {"device": device, "stages": {}}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")

    def note(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, stage: str, cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess | None:
        """Run one stage's command, its output into the log; None when it timed out."""
        timeout_s = min(timeout_s, self.deadline - time.monotonic())
        self.note(f"stage {stage}: {' '.join(cmd)} (timeout {timeout_s:.0f} s)")
        start = time.monotonic()
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=max(timeout_s, 1)
            )
        except subprocess.TimeoutExpired as e:
            self.log.write(_text(e.stdout) + _text(e.stderr))
            self.record(stage, ok=False, seconds=time.monotonic() - start, error=f"timed out after {timeout_s:.0f} s")
            return None
        self.log.write(done.stdout + done.stderr)
        self.record(stage, ok=done.returncode == 0, seconds=time.monotonic() - start, returncode=done.returncode)
        return done

    def record(self, stage: str, ok: bool, **facts) -> None:
        self.summary["stages"][stage] = {"ok": ok, **facts}
        self.note(f"stage {stage}: {'ok' if ok else 'FAILED'} {facts}")

    def packages(self) -> None:
        """The expected packages' versions as this interpreter sees them (what `pip show` reads, in
        a second rather than pip's 26 s there). A missing one is recorded, not fatal."""
        start, versions = time.monotonic(), {}
        for name in EXPECTED:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        self.summary["packages"] = versions
        self.summary["packages_missing"] = sorted(set(EXPECTED) - set(versions))
        self.record("packages", ok=True, seconds=time.monotonic() - start, missing=self.summary["packages_missing"])

    def install(self, wheel_dir: Path) -> bool:
        tags = set(sys_tags())
        wheels = [w for w in sorted(wheel_dir.glob("*.whl")) if parse_wheel_filename(w.name)[3] & tags]
        site = self.work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        done = self.run("install", [*cmd, "--target", str(site), *map(str, wheels)], TIMEOUTS["install"])
        self.env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), self.env.get("PYTHONPATH", "")]).rstrip(":")
        self.summary["stages"]["install"]["wheels"] = [w.name for w in wheels]
        return done is not None and done.returncode == 0

    def models(self, kit: Path) -> bool:
        result = self.work / "models.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_stages", "models", "--device", self.device]
        cmd += ["--tokenizer", str(kit / "tokenizer"), "--models", str(self.work / "models"), "--result", str(result)]
        done = self.run("models", cmd, TIMEOUTS["models"])
        if done is None or done.returncode:
            return False
        self.summary["models"] = json.loads(result.read_text())
        self.env["SLUICE_GPU_MODELS"] = str(self.work / "models")
        return True

    def tests(self) -> None:
        report = self.out / "gpu-tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"]
        if self.device == "cuda" and importlib.util.find_spec("xdist"):
            # Triton's compiles take most of the stage and use one core each: a worker per test file
            # spreads them over the machine's cores (the GPU machine has 16). 4 workers: 122 s on an H200.
            cmd += ["-n", "8", "--dist", "loadfile"]
        done = self.run("tests", [*cmd, f"--junitxml={report}"], TIMEOUTS["tests"])
        if not report.exists():
            return
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        facts = self.summary["stages"]["tests"]
        facts.update(counts)
        # On CUDA every gpu test must run; on the CPU every one must skip (each with its reason).
        if self.device == "cuda":
            facts["ok"] = done is not None and done.returncode == 0 and counts["skipped"] == 0 and counts["tests"] > 0
        else:
            facts["ok"] = counts["tests"] > 0 and counts["skipped"] == counts["tests"]

    def bench(self, model: str) -> None:
        stage, result = f"bench-{model}", self.work / f"bench-{model}.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_stages", "bench", "--device", self.device, "--model", model]
        done = self.run(
            stage, [*cmd, "--models", str(self.work / "models"), "--result", str(result)], TIMEOUTS["bench"]
        )
        for log in (self.work / f"logs-{model}").glob("*.log"):  # the server's own log, into the one log
            self.log.write(f"--- {log.name}\n{log.read_text()[-20000:]}\n")
        if done is not None and done.returncode == 0:
            self.summary["bench"] = {**self.summary.get("bench", {}), model: json.loads(result.read_text())}

    def finish(self) -> int:
        ok = all(s["ok"] for s in self.summary["stages"].values())
        self.summary["ok"] = ok
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))
        for name, facts in self.summary["stages"].items():
            self.note(f"{name:<20} {'ok' if facts['ok'] else 'FAILED'} {_brief(facts)}")
        for model, b in self.summary.get("bench", {}).items():
            self.note(
                f"{model:<14} {b['sluice']['output_throughput']:9.0f} out tok/s ({b['requests']} seqs), "
                f"{100 * b['roofline']['fraction']:.0f}% of the roofline at {b['roofline']['bandwidth_gbs']:.0f} GB/s, "
                f"batch 1: {b['batch1_decode_tok_s']:.0f} tok/s, transformers static: "
                f"{b['transformers_static'].get('output_throughput', float('nan')):.0f} tok/s"
            )
            for name, breakdown in (("all at once", b["sluice"]["steps"]), ("batch 1", b["batch1_steps"])):
                steps = breakdown.get("all", {})
                self.note(
                    f"{'':<14} {name}: {steps.get('steps', 0):.0f} steps; per step: shard forward "
                    f"{steps.get('forward_ms', 0):.2f} ms + after it {steps.get('sample_ms', 0):.2f} ms, "
                    f"of {steps.get('period_ms', 0):.2f} ms wall; router CPU {steps.get('router_cpu_pct', 0):.0f}%"
                )
        self.note(f"gpu-check {'passed' if ok else 'FAILED'} ({self.out / 'summary.json'})")
        self.log.close()
        return 0 if ok else 1


def _brief(facts: dict) -> str:
    return ", ".join(
        f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items() if k not in ("ok", "wheels")
    )


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--kit", type=Path, default=ROOT / ".gpukit", help="the tokenizer, from make gpu-kit")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the wheels, from make gpu-kit")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out" / "gpu-check"))
    p.add_argument("--deadline", type=float, default=540, help="seconds for the whole check")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    check = Check(a.out, a.device, a.deadline)
    check.packages()
    if check.install(a.wheels) and check.models(a.kit):
        check.tests()
        for model in ("smollm2-135m", "qwen3-0.6b"):
            check.bench(model)
    sys.exit(check.finish())


if __name__ == "__main__":
    main()
