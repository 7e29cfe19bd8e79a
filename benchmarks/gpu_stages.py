"""The stages of `make gpu-check` that need torch, each run by benchmarks/gpu_check.py in its own
process under its own timeout:

- `models`: random-weight models in the shapes of SmolLM2-135M and Qwen3-0.6B (bf16 weights),
  with the bundled tokenizer carried in the kit; on `--device cpu` both shrink to 2 tiny layers.
  Qwen3's shape keeps the tokenizer's vocabulary (49,152 rather than 151,936), so every sampled
  id decodes.
- `bench`: one model served by Sluice: the nano-vllm workload (256 sequences, prompt and output
  lengths uniform in [100, 1024], EOS ignored, all at once), its output tok/s and the fraction of
  the HBM roofline it reaches, batch-1 decode tok/s, where each run's steps spend their time
  (`probes.step_breakdown`, with the router's CPU), and `transformers` static-batch `generate` of
  the same prompts all at once, each to its first 128 tokens (the whole workload took it 87 s for
  64 of the sequences on an H200).
"""

import argparse
import asyncio
import dataclasses
import json
import shutil
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

from benchmarks import probes
from benchmarks.loadgen import run_load, warm_up
from benchmarks.metrics import summarize
from benchmarks.workload import RequestSpec, make_requests, nano_vllm_requests

MODELS = ("smollm2-135m", "qwen3-0.6b")
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
STATIC_TOKENS = 128  # transformers' static batch: every prompt at once, the first 128 tokens of each
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def model_configs(tokenizer_dir: Path, tiny: bool) -> dict:
    shrink = {**TINY, "head_dim": 16} if tiny else {}
    smol = AutoConfig.from_pretrained(tokenizer_dir, **shrink)  # SmolLM2-135M's own config
    qwen = dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    )
    qwen = Qwen3Config(
        vocab_size=smol.vocab_size,
        max_position_embeddings=40960,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=smol.bos_token_id,
        eos_token_id=smol.eos_token_id,
        architectures=["Qwen3ForCausalLM"],
        **(qwen | shrink),
    )
    return {"smollm2-135m": smol, "qwen3-0.6b": qwen}


def build_models(tokenizer_dir: Path, out: Path, device: str) -> dict:
    built = {}
    for name, config in model_configs(tokenizer_dir, tiny=device == "cpu").items():
        start, target = time.perf_counter(), out / name
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(target, safe_serialization=True)
        for f in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / f, target / f)
        params = sum(p.numel() for p in model.parameters())
        built[name] = {"dir": str(target), "params": params, "seconds": round(time.perf_counter() - start, 1)}
        del model
    return built


def roofline(config, weight_bytes: int, specs: list[RequestSpec], duration_s: float, bandwidth: float) -> dict:
    """The run's floor if every step read its weights and its sequences' KV once at `bandwidth`
    (bytes/s, read + written as a copy counts them); all sequences run at once, so the weights
    are read once per step of the longest output (performance.md section 3.2)."""
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    kv = sum(s.max_tokens * s.prompt_len + s.max_tokens * (s.max_tokens + 1) // 2 for s in specs) * kv_per_token
    weights = max(s.max_tokens for s in specs) * weight_bytes
    floor_s = (weights + kv) / bandwidth
    return {
        "bandwidth_gbs": bandwidth / 1e9,
        "weights_read_gb": weights / 1e9,
        "kv_read_gb": kv / 1e9,
        "floor_s": floor_s,
        "fraction": floor_s / duration_s,
    }


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy (the median of 10)."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src, dst = (
        torch.empty(n, dtype=torch.uint8, device=device).random_(),
        torch.empty(n, dtype=torch.uint8, device=device),
    )
    times = []
    for _ in range(13):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n / sorted(times[3:])[5]


def decode_tok_s(records) -> float:
    r = records[0]
    return (len(r.token_s) - 1) / (r.token_s[-1] - r.token_s[0])


def bench(model_dir: Path, device: str, log_dir: Path) -> dict:
    from benchmarks.servers import SluiceServer

    tiny = device == "cpu"
    config = AutoConfig.from_pretrained(model_dir)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    specs = make_requests(model_dir, 8, (8, 24), (8, 24)) if tiny else nano_vllm_requests(model_dir, 256)
    single = make_requests(model_dir, 1, (128, 128), (32, 32) if tiny else (512, 512), seed=1)
    bandwidth = copy_bandwidth(device)
    result: dict = {"requests": len(specs), "concurrency": len(specs)}
    flags = ["--prefix-caching", "false", "--max-concurrent-requests", "1024"] + (["--enforce-eager"] if tiny else [])
    server = SluiceServer(model_dir, "float32" if tiny else "bfloat16", flags, log_dir)
    server.start(timeout_s=300)
    try:
        result["startup_s"], result["dtype"] = server.startup_s, server.dtype
        asyncio.run(warm_up(server.url, "openai", specs[0]))
        router = psutil.Process(server.pids["router"])
        before, cpu = probes.scrape(server.url), sum(router.cpu_times()[:2])
        records, duration = asyncio.run(run_load(server.url, specs, concurrency=len(specs)))
        summary = summarize(records, duration)
        result["sluice"] = {k: summary[k] for k in ("completed", "failed", "duration_s", "output_throughput", "tpot_s")}
        steps = probes.step_breakdown(before, probes.scrape(server.url), duration, sum(router.cpu_times()[:2]) - cpu)
        result["sluice"]["steps"] = steps
        result["roofline"] = roofline(config, weight_bytes, specs, duration, bandwidth)
        before, cpu = probes.scrape(server.url), sum(router.cpu_times()[:2])
        one, duration = asyncio.run(run_load(server.url, single, concurrency=1))
        result["batch1_decode_tok_s"] = decode_tok_s(one)
        steps = probes.step_breakdown(before, probes.scrape(server.url), duration, sum(router.cpu_times()[:2]) - cpu)
        result["batch1_steps"] = steps
    finally:
        server.stop()
    capped = [dataclasses.replace(s, max_tokens=min(s.max_tokens, STATIC_TOKENS)) for s in specs]
    try:  # the baseline failing (out of memory, another transformers) must not take Sluice's figures with it
        result["transformers_static"] = static_baseline(model_dir, device, capped)
    except Exception as e:
        result["transformers_static"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def static_baseline(model_dir: Path, device: str, specs: list[RequestSpec]) -> dict:
    """`transformers` `generate` on the same prompts, all in one static batch."""
    try:
        from benchmarks.baselines import load_model, static_batches
    except ImportError as e:  # another transformers than the one this was written against
        return {"error": f"baselines not importable: {e}"}
    model, tok = load_model(str(model_dir), device, torch.float32 if device == "cpu" else torch.bfloat16)
    records, duration = static_batches(model, tok, specs, len(specs))
    summary = summarize(records, duration)
    return {"requests": len(specs), "duration_s": duration, "output_throughput": summary["output_throughput"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("models", "bench"))
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--tokenizer", type=Path, help="models: the kit's tokenizer directory")
    p.add_argument("--models", type=Path, required=True, help="where the models are (built)")
    p.add_argument("--model", choices=MODELS, help="bench: which model")
    p.add_argument("--result", type=Path, required=True, help="JSON written here")
    a = p.parse_args(argv)
    if a.stage == "models":
        result = build_models(a.tokenizer, a.models, a.device)
    else:
        result = bench(a.models / a.model, a.device, a.result.parent / f"logs-{a.model}")
    a.result.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
