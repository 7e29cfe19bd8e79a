"""Checks every model family passes: tiny random checkpoints built from `transformers` configs,
our paged forward against `transformers`' logits, TP=2 against TP=1, and greedy tokens through
the HTTP API against `generate`.

A family's test file builds its configs and calls these; `transformers` is the oracle throughout.
"""

import shutil
from pathlib import Path

import requests
import torch
import transformers

from tests import ranks
from tests.conftest import BUNDLED_MODEL
from tests.e2e.server import EAGER, LauncherProcess, free_port

ATOL = 1e-4  # float32 on both sides: what is left is summation order
VOCAB = 384  # logits tests; the HTTP tests use the bundled tokenizer's vocabulary
BUNDLED_VOCAB, BUNDLED_BOS, BUNDLED_EOS = 49152, 1, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_checkpoint(out_dir: Path, architecture: str, seed: int = 0, std: float = 0.2, **config) -> Path:
    """A random `architecture` model in float32 (config.json + model.safetensors) in `out_dir`.

    Weights are drawn from N(0, std) so that logits differ meaningfully between tokens; norms'
    weights are set around 1 so that deep residual streams stay in range."""
    model_cls = getattr(transformers, architecture)
    config.setdefault("vocab_size", VOCAB)
    config.setdefault("bos_token_id", 0)
    config.setdefault("eos_token_id", 1)
    hf_config = model_cls.config_class(architectures=[architecture], torch_dtype="float32", **config)
    torch.manual_seed(seed)
    model = model_cls(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.split(".")[-2].lower()
            if ("norm" in module or module.startswith("ln")) and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, std)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def with_bundled_tokenizer(out_dir: Path, architecture: str, seed: int = 0, **config) -> Path:
    """write_checkpoint with the bundled model's vocabulary and tokenizer, for the HTTP tests."""
    config = dict(config, vocab_size=BUNDLED_VOCAB, bos_token_id=BUNDLED_BOS, eos_token_id=BUNDLED_EOS)
    write_checkpoint(out_dir, architecture, seed, **config)
    for name in TOKENIZER_FILES:
        shutil.copy(BUNDLED_MODEL / name, out_dir / name)
    return out_dir


def hf_model(model_dir: Path):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logits(hf, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def runner(model_dir: Path, block_size: int = 16, max_num_blocks: int = 64, eager: bool = True, **config):
    """A float32 CPU runner of `model_dir`, eager unless `eager=False`."""
    from shard.config import ShardConfig
    from shard.runner import ModelRunner

    config = {"block_size": block_size, "device": "cpu", "dtype": "float32", "enforce_eager": eager, **config}
    r = ModelRunner(ShardConfig(model_dir=model_dir, **config))
    r.warmup(64, 4, max_num_blocks=max_num_blocks)
    return r


def check_prefill_and_decode(
    model_dir: Path, prompt_lens=(37, 5, 70), decode_steps: int = 4, atol=ATOL, compiled: bool = False
) -> None:
    """Several prompts prefilled together (their blocks interleaved, so a wrong block table shows),
    every prompt position's logits, then `decode_steps` batched decode steps fed transformers'
    greedy tokens: all equal transformers' logits. `compiled`: through the compiled forward, as
    served (~10 s to build, so once for a family whose ops differ from the others')."""
    from shard.sampler import SamplingParams
    from shard.step import Batch, RequestState

    hf = hf_model(model_dir)
    vocab = hf.config.get_text_config().vocab_size
    longest = max(prompt_lens) + decode_steps
    blocks_each = -(-longest // 16)
    r = runner(model_dir, max_num_blocks=blocks_each * len(prompt_lens) + 4, eager=not compiled)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    n = len(prompts)
    states = [
        RequestState(i, list(p), len(p), 0, list(range(i, n * blocks_each, n)), SamplingParams())
        for i, p in enumerate(prompts)
    ]
    ours = r.forward(Batch(states, [len(p) for p in prompts]), sample_rows_override=torch.arange(sum(prompt_lens)))
    torch.testing.assert_close(ours, torch.cat([hf_logits(hf, p) for p in prompts]), atol=atol, rtol=0)
    for s in states:
        s.num_computed_tokens = len(s.token_ids)
    for _ in range(decode_steps):
        for s in states:
            s.token_ids.append(int(hf_logits(hf, s.token_ids)[-1].argmax()))
        ours = r.forward(Batch(states, [1] * n))
        expected = torch.stack([hf_logits(hf, s.token_ids)[-1] for s in states])
        torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
        for s in states:
            s.num_computed_tokens += 1


def check_chunked_prefill(model_dir: Path, length: int = 50, first_chunk: int = 20, atol=ATOL) -> None:
    """A prompt prefilled in two chunks, the second reading the first through the cache, gives
    transformers' logits for the second chunk's positions."""
    from shard.sampler import SamplingParams
    from shard.step import Batch, RequestState

    hf = hf_model(model_dir)
    vocab = hf.config.get_text_config().vocab_size
    num_blocks = -(-length // 16)
    r = runner(model_dir, max_num_blocks=num_blocks + 4)
    ids = torch.randint(2, vocab, (length,), generator=torch.Generator().manual_seed(2)).tolist()
    blocks = torch.randperm(num_blocks + 4, generator=torch.Generator().manual_seed(3))[:num_blocks].tolist()
    state = RequestState(0, ids, length, 0, blocks, SamplingParams())
    r.forward(Batch([state], [first_chunk]))
    state.num_computed_tokens = first_chunk
    rows = torch.arange(length - first_chunk)
    ours = r.forward(Batch([state], [length - first_chunk]), sample_rows_override=rows)
    torch.testing.assert_close(ours, hf_logits(hf, ids)[first_chunk:], atol=atol, rtol=0)


def _fixed_run(r) -> list[torch.Tensor]:
    """Logits of a fixed prefill of two prompts and three decode steps on runner `r` (for an
    encoder-decoder model, each with an encoder input too)."""
    from shard.sampler import SamplingParams
    from shard.step import Batch, RequestState

    vocab = r.hf_config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    states = [
        RequestState(i, torch.randint(2, vocab, (n,), generator=g).tolist(), n, 0, [i, i + 2, i + 4], SamplingParams())
        for i, n in enumerate((29, 11))
    ]
    if r.is_encoder_decoder:
        for i, s in enumerate(states):
            s.encoder_token_ids = torch.randint(2, vocab, (21 + 9 * i,), generator=g).tolist()
            s.encoder_block_ids = [6 + i, 8 + i]
    results = [r.forward(Batch(states, [len(s.token_ids) for s in states]), torch.arange(40))]
    for step in range(3):
        for s in states:
            s.num_computed_tokens = len(s.token_ids)
            s.token_ids.append(100 + step)
        results.append(r.forward(Batch(states, [1, 1])))
    return results


def _rank_logits(model_dir, rank: int, world_size: int, port: int, queue, compiled: bool) -> None:
    """In a process: _fixed_run on one rank; rank 0 sends its logits."""
    from shard import dist

    torch.set_num_threads(1)
    dist.init(rank, world_size, "127.0.0.1", port, torch.device("cpu"))
    r = runner(model_dir, max_num_blocks=16, eager=not compiled, rank=rank, world_size=world_size)
    results = _fixed_run(r)
    if rank == 0:
        queue.put([x.tolist() for x in results])
    dist.shutdown()


def check_tensor_parallel(model_dir: Path, world_size: int = 2, atol=ATOL, compiled: bool = False) -> None:
    """Sharded over `world_size` gloo ranks (processes of tests/ranks.py; through the compiled forward, its
    all-reduces inside the graph, if `compiled`), the logits equal the unsharded ones computed here."""
    ctx = ranks.context()
    queue, port = ctx.Queue(), free_port()
    args = [(model_dir, i, world_size, port, queue, compiled) for i in range(world_size)]
    procs = [ctx.Process(target=_rank_logits, args=a) for a in args]
    for p in procs:
        p.start()
    sharded = queue.get(timeout=180)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    expected = _fixed_run(runner(model_dir, max_num_blocks=16))
    for e, s in zip(expected, sharded):
        torch.testing.assert_close(torch.tensor(s), e, atol=atol, rtol=0)


PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,")


def check_http_greedy(
    model_dir: Path, *launcher_args: str, prompts=PROMPTS, max_new_tokens: int = 12, then=None
) -> None:
    """Greedy tokens from /generate equal transformers' generate(do_sample=False) for each prompt;
    then `then(server)`, if given, checks more on the same server.

    The server runs in float32 like transformers (its CPU default, bfloat16, flips near-ties) with a
    small KV pool (zeroing the default 4 GiB takes seconds); `launcher_args` come after, so win."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = hf_model(model_dir)
    defaults = ("--dtype", "float32", "--max-batch-total-tokens", "1024")
    with LauncherProcess(model_dir, *EAGER, *defaults, *launcher_args) as server:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            r = requests.post(
                server.url + "/generate",
                json={"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            generated = out[0, 1:] if hf.config.is_encoder_decoder else out[0, ids.shape[1] :]  # after the start token
            assert [t["id"] for t in r.json()["details"]["tokens"]] == generated.tolist(), prompt
        if then is not None:
            then(server)
