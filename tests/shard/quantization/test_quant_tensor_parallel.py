"""Quantized checkpoints sharded over 2 gloo ranks give the unsharded logits.

Each rank loads only its slices of the packed tensors (qweight, qzeros, scales, g_idx, zero points, block
scales), as their ParamDims say; the sizes (writers.TINY) put whole groups of 32 input features and whole
int32 words of 8 output features on each rank. One pair of processes serves all the checkpoints. Logits are
float32; sharding changes summation order only (1e-4, as tests/shard/test_tensor_parallel.py).
"""

import time
from queue import Empty

import torch

from tests import ranks
from tests.e2e.server import free_port
from tests.shard.quantization import writers as W


def _checkpoints() -> dict:
    dirs = {
        "gptq-act-order": W.cached("gptq", group_size=32, desc_act=True)[0],  # g_idx split, groups whole
        "gptq-v1": W.cached("gptq", group_size=32, sym=False, v1=True)[0],  # groups split with the inputs
        "awq": W.cached("awq", group_size=32)[0],
        "fp8-block": W.cached("fp8", block=(32, 32))[0],
    }
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return dirs
    weights, inputs, fmt = W.CT_SCHEMES["w4a16-asym-group"]  # zero points packed along the outputs
    dirs["ct-w4a16-asym"] = W.cached("ct", weights=weights, input_activations=inputs, fmt=fmt)[0]
    return dirs


def test_two_ranks_match_one():
    checkpoints = _checkpoints()
    names = list(checkpoints)
    ctx = ranks.context()
    queue, port = ctx.Queue(), free_port()
    dirs = [checkpoints[n] for n in names]
    procs = [ctx.Process(target=W.tp_logits, args=(dirs, r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                sharded = queue.get(timeout=1)
                break
            except Empty:  # a rank that failed (its traceback is in the output) leaves the other one waiting
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not failed and time.monotonic() < deadline, f"ranks exited with {failed} (or timed out)"
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for name, model_dir, logits in zip(names, dirs, sharded):
        torch.testing.assert_close(
            torch.tensor(logits), W.cached_logits(model_dir), atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )
