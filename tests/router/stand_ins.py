"""Stand-ins for the HTTP side's tests: a byte tokenizer with a chat template, limits, and a
server state whose engine and shards go no further than their health."""

import types

from router.core.shard_client import ModelInfo, ShardError
from router.http.state import ServerState
from router.limits import ValidationLimits
from router.metrics import Metrics

LIMITS = ValidationLimits(
    max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=1000, max_total_tokens=2000
)


class ByteTokenizer:
    """One token per UTF-8 byte, and a minimal chat template: enough for validation."""

    vocab_size = 256
    config: dict = {}
    special_ids: frozenset[int] = frozenset()
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list]:
        return self.encode(text), [(i, i + 1) for i in range(len(text))]  # ASCII only

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")


class StandInShards:
    def __init__(self, is_healthy: bool):
        self.is_healthy = is_healthy

    async def health(self) -> None:
        if not self.is_healthy:
            raise ShardError("shard 0 is gone")


def stand_in_state(max_concurrent_requests: int = 8, is_healthy: bool = True) -> ServerState:
    """No engine beyond its health flag: `build_app` reads only the metrics and the concurrency
    limit, handlers the rest."""
    return ServerState(
        engine=types.SimpleNamespace(is_healthy=True, recovering=False),
        shards=StandInShards(is_healthy),
        tokenizer=ByteTokenizer(),
        limits=LIMITS,
        model_info=ModelInfo("LlamaForCausalLM", "float32", "cpu", 256, [2], 16, 2048, 1, None, 1000),
        model_id="test-model",
        max_concurrent_requests=max_concurrent_requests,
        metrics=Metrics(max_input_tokens=16, max_total_tokens=32),
    )
