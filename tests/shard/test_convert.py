"""shard.convert: GGUF -> safetensors directory, on a tiny quantized Llama GGUF written here, and the bundled one."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shard import convert as C

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ h", "h i", "Ġh i"]  # by rank: " hi" is one token only if they apply in this order
HEADS, KV_HEADS = 4, 2


def _write_tiny_gguf(path: Path) -> torch.nn.Module:
    """A random tied Llama as llama.cpp would write it (Q4_1 matrices, Q8_0 embeddings, byte-level BPE
    tokenizer, q/k rows permuted). Returns the float model whose weights are the dequantized GGUF ones."""
    import gguf
    from gguf.quants import dequantize, quantize
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [
        ("block_count", 2),
        ("context_length", 256),
        ("embedding_length", 64),
        ("feed_forward_length", 128),
        ("head_count", HEADS),
        ("head_count_kv", KV_HEADS),
        ("layer_norm_rms_eps", 1e-5),
        ("rope_freq_base", 10000.0),
        ("rope_dimension_count", 16),
        ("vocab_size", len(tokens)),
        ("tokenizer_model", "gpt2"),
        ("tokenizer_pre", "smollm"),
        ("token_list", tokens),
        ("token_merges", MERGES),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
        ("pad_token_id", 2),
        ("add_bos_token", False),
        ("chat_template", CHATML),
    ]:
        getattr(w, f"add_{key}")(value)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    with torch.no_grad():
        for name, param in model.named_parameters():  # lm_head is tied: not listed, not written
            param.normal_(1.0 if "norm" in name else 0.0, 0.2)
            if name == "model.embed_tokens.weight":
                gname, qtype = "token_embd.weight", gguf.GGMLQuantizationType.Q8_0
            elif name == "model.norm.weight":
                gname, qtype = "output_norm.weight", None
            else:
                _, _, layer, rest = name.split(".", 3)
                gname = f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"
                qtype = None if "norm" in name else gguf.GGMLQuantizationType.Q4_1
            rows = np.arange(param.shape[0])
            heads = HEADS if "q_proj" in name else KV_HEADS if "k_proj" in name else 0
            if heads:  # llama.cpp's rotary layout for q and k; transformers undoes it on load
                rows = rows.reshape(heads, 2, -1).swapaxes(1, 2).reshape(-1)
            data = param.numpy()[rows]
            if qtype is None:
                w.add_tensor(gname, data)
            else:  # quantization is per row, so it commutes with the row permutation
                packed = quantize(data, qtype)
                w.add_tensor(gname, packed, raw_dtype=qtype)
                param[torch.from_numpy(rows)] = torch.from_numpy(dequantize(packed, qtype).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, reference model, converted dir, seconds the conversion took)."""
    root = tmp_path_factory.mktemp("convert")
    reference = _write_tiny_gguf(root / "tiny.Q4_1.gguf")
    start = time.perf_counter()
    out = C.convert(root / "tiny.Q4_1.gguf", root / "models" / "tiny")
    return root / "tiny.Q4_1.gguf", reference, out, time.perf_counter() - start


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_writes_a_complete_directory_with_tokenizer_and_chat_template(tiny):
    from transformers import AutoTokenizer, GenerationConfig

    _, _, out, _ = tiny
    assert C.is_complete(out) and sorted(p.name for p in out.iterdir()) == sorted(C.REQUIRED_FILES)
    assert not list(out.parent.glob(".tiny.partial*"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(out)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)  # no BOS added (the GGUF says so); specials stay whole
    assert tok.convert_ids_to_tokens(ids)[:2] == ["<|im_start|>", "u"] and ids.count(1) == 2 and ids.count(2) == 1
    assert tok.convert_ids_to_tokens(tok.encode(" hi")) == ["Ġhi"]  # the GGUF's merges are used
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 2, 1)
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.bos_token_id, gen.pad_token_id) == (2, 1, 2)


def test_saved_weights_are_float32_tied_and_give_the_gguf_logits(tiny):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    gguf_path, reference, out, _ = tiny
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (not a dict)
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    ids = [1, 40, 200, 7, 2, 99, 260, 3, 5]
    torch.testing.assert_close(_logits(saved, ids), _logits(from_gguf, ids), rtol=0, atol=0)
    # and they are the random model's (dequantized) weights: names, q/k layout and tying all undone right
    torch.testing.assert_close(_logits(saved, ids), _logits(reference, ids), rtol=0, atol=1e-4)


def test_reconverting_is_a_fast_no_op_that_imports_no_torch(tiny):
    gguf_path, _, out, _ = tiny
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    start = time.perf_counter()
    assert C.convert(gguf_path, out) == out
    assert time.perf_counter() - start < 0.5
    code = (
        "import sys; from shard.convert import main; rc = main(sys.argv[1:]); print('torch' in sys.modules); exit(rc)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "--gguf", str(gguf_path), "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 0 and run.stdout.strip() == "False" and "ready" in run.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tiny, tmp_path, monkeypatch):
    gguf_path, _, _, _ = tiny

    def dies_halfway(gguf: Path, out: Path, label: str) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_write", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        C.convert(gguf_path, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / ".m.partial").exists()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):  # never clobbers a directory it did not finish
        C.convert(gguf_path, tmp_path / "m")


@pytest.mark.slow
def test_bundled_smollm2_gguf(bundled_model_dir):
    """The real file, as `make model` converted it (the conversion checks its own logits against the
    GGUF model): ChatML template, eos <|im_end|> (2), tied lm_head."""
    from transformers import AutoTokenizer, GenerationConfig

    out = bundled_model_dir
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token, tok.pad_token) == (
        "<|im_end|>",
        2,
        "<|im_start|>",
        "<|im_end|>",
    )
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
