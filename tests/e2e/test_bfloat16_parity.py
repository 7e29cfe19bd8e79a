"""bfloat16 through the HTTP API against transformers in bfloat16 on the same weights.

Rounding differs between the two (fused kernels, oneDNN, another accumulation order), so exact
equality cannot be asked for all the way: the greedy tokens are equal, or at the first position
where they differ each side's token is among the other's five most likely there.
"""

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.server import LauncherProcess
from tests.e2e.test_greedy_parity import _prompts

MAX_NEW_TOKENS = 24
TOP = 5


@pytest.fixture(scope="module")
def bf16_server(bundled_model_dir):
    with LauncherProcess(bundled_model_dir, "--dtype", "bfloat16") as launcher:
        yield launcher


def _ours(url: str, prompt: str) -> tuple[list[int], list[set[int]]]:
    """Greedy ids, and the top-5 ids at each step."""
    r = requests.post(
        url + "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True, "top_n_tokens": TOP}},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    tokens = r.json()["details"]["tokens"]
    tops = r.json()["details"]["top_tokens"]
    return [t["id"] for t in tokens], [{t["id"] for t in step} for step in tops]


def test_bfloat16_greedy_tokens_match_transformers_up_to_near_ties(bf16_server, bundled_model_dir):
    check_parity_with_transformers(bf16_server.url, bundled_model_dir, "cpu")


def check_parity_with_transformers(url: str, model_dir, device: str, max_diverged: float = 0.5) -> None:
    """Greedy tokens from `url` equal transformers' in bf16 on `device`, up to near ties; at most
    `max_diverged` of the prompts may reach one (random weights have many more near ties)."""
    assert requests.get(url + "/info", timeout=10).json()["model_dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    diverged = 0
    for prompt in _prompts(tokenizer):
        ids, our_tops = _ours(url, prompt)
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.eos_token_id,
            )
        theirs = out.sequences[0, inputs.input_ids.shape[1] :].tolist()
        n = min(len(ids), len(theirs))
        first = next((i for i in range(n) if ids[i] != theirs[i]), None)
        if first is None:
            assert ids[:n] == theirs[:n]
            continue
        diverged += 1
        their_top = set(out.scores[first][0].topk(TOP).indices.tolist())
        assert ids[first] in their_top, (prompt[:40], first, ids[first], their_top)
        assert theirs[first] in our_tops[first], (prompt[:40], first, theirs[first], our_tops[first])
    # With the bundled model near ties are rare: most prompts keep transformers' tokens all the way
    # (2 of 8 diverged here).
    assert diverged <= len(_prompts(tokenizer)) * max_diverged, f"{diverged} prompts diverged"
