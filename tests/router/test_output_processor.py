"""The output processor: text deltas of complete characters whose concatenation is the decode of
the generated tokens, special tokens, stop strings and finish reasons."""

import asyncio
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from router.core.engine import Engine, Timings
from router.core.kv_cache_manager import KVCacheManager
from router.core.output_processor import OutputProcessor
from router.core.request import GenerationRequest, RequestStatus, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig
from router.metrics import Metrics
from router.tokenizer import Tokenizer
from tests.router.test_engine_overlap import FakeShards

BUNDLED_TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"
SPECIAL = ["<unk>", "<s>", "</s>"]
RUNNING = RequestStatus.RUNNING
TEXTS = [
    "Hello world, this is plain ASCII text.",
    "大海啊，全是水。🌊🐟 Biển cả thật đẹp, tiếng Việt có dấu.",
    "emoji 👩‍👩‍👧‍👦 family and ñandú and Ωmega",
]


def _save(tok: HFTokenizer, path: Path) -> Tokenizer:
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer(path)


@pytest.fixture(scope="module")
def byte_fallback_tokenizer(tmp_path_factory) -> Tokenizer:
    """SentencePiece-style, as Llama's: a few words, "▁" for spaces, bytes for anything else."""
    words = ["▁", "▁Hello", "▁world", "▁Say", ":", "▁ST", "OP", "大", "▁the"]
    pieces = [(t, 0.0) for t in SPECIAL] + [(f"<0x{b:02X}>", 0.0) for b in range(256)] + [(w, -1.0) for w in words]
    tok = HFTokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SPECIAL)
    return _save(tok, tmp_path_factory.mktemp("byte-fallback"))


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory) -> Tokenizer:
    """GPT-2-style byte-level BPE, trained on ASCII: other characters are split into bytes."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Hello world, this is plain ASCII text. Say something: the end."] * 20, trainer)
    return _save(tok, tmp_path_factory.mktemp("byte-level"))


@pytest.fixture(scope="module")
def bundled_tokenizer() -> Tokenizer:
    if not (BUNDLED_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"{BUNDLED_TOKENIZER} is missing: run `make model`")
    return Tokenizer(BUNDLED_TOKENIZER)


def feed(processor: OutputProcessor, ids: list[int], last_status=RequestStatus.FINISHED_LENGTH) -> list:
    """Process `ids` as a request's tokens, the last one finishing it with `last_status`."""
    return [processor.process(t, last_status if i == len(ids) - 1 else RUNNING) for i, t in enumerate(ids)]


def byte_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return [tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in text.encode()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("name", ["byte_level_tokenizer", "bundled_tokenizer"])
def test_deltas_concatenate_to_the_decode_of_the_generated_ids(request, name, text):
    tokenizer = request.getfixturevalue(name)
    prompt, ids = tokenizer.encode("Say something:"), tokenizer.encode(" " + text, add_special_tokens=False)
    outputs = feed(OutputProcessor(tokenizer, prompt, []), ids)
    assert all("\ufffd" not in o.text for o in outputs)
    assert "".join(o.text for o in outputs) == outputs[-1].generated_text == tokenizer.decode(ids) == " " + text


@pytest.mark.parametrize("text", TEXTS)
def test_the_first_token_keeps_its_leading_space_after_the_prompt(byte_fallback_tokenizer, text):
    tokenizer = byte_fallback_tokenizer
    prompt, ids = tokenizer.encode("Say:"), tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text  # on its own, the first "▁" is no space
    outputs = feed(OutputProcessor(tokenizer, prompt, []), ids)
    assert all("\ufffd" not in o.text for o in outputs)
    assert "".join(o.text for o in outputs) == outputs[-1].generated_text == " " + text


@pytest.mark.parametrize("char", ["🌊", "海", "ñ"])
def test_a_character_split_across_byte_tokens_comes_out_with_its_last_byte(byte_fallback_tokenizer, char):
    tokenizer = byte_fallback_tokenizer
    ids = byte_ids(tokenizer, char) + tokenizer.encode("the", add_special_tokens=False)
    outputs = feed(OutputProcessor(tokenizer, tokenizer.encode("Say:"), []), ids)
    assert [o.text for o in outputs] == [""] * (len(char.encode()) - 1) + [char, " the"]


def test_byte_level_tokens_split_a_character_too(byte_level_tokenizer):
    tokenizer = byte_level_tokenizer
    ids = tokenizer.encode("🌊", add_special_tokens=False)
    assert len(ids) == 4  # one token a byte
    outputs = feed(OutputProcessor(tokenizer, tokenizer.encode("Say:"), []), ids)
    assert [o.text for o in outputs] == ["", "", "", "🌊"]


def test_a_character_cut_off_by_the_end_is_flushed_with_the_last_token(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    ids = tokenizer.encode("Hello", add_special_tokens=False) + byte_ids(tokenizer, "🌊")[:2]
    outputs = feed(OutputProcessor(tokenizer, [], []), ids)
    assert [o.text for o in outputs[:-1]] == ["Hello", ""]
    assert outputs[-1].text == tokenizer.decode(ids)[len("Hello") :] and outputs[-1].text.startswith("\ufffd")
    assert outputs[-1].generated_text == tokenizer.decode(ids)


def test_a_prompt_cut_inside_a_character_is_not_emitted(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    wave = byte_ids(tokenizer, "🌊")
    prompt = tokenizer.encode("Say", add_special_tokens=False) + wave[:2]
    outputs = feed(
        OutputProcessor(tokenizer, prompt, []), wave[2:] + tokenizer.encode("world", add_special_tokens=False)
    )
    assert "Say" not in outputs[-1].generated_text and outputs[-1].generated_text.endswith(" world")


def test_special_tokens_show_their_literal_but_stay_out_of_the_text(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    hello, world = (tokenizer.encode(w, add_special_tokens=False) for w in ("Hello", "world"))
    bos = tokenizer.backend.token_to_id("<s>")
    outputs = feed(OutputProcessor(tokenizer, tokenizer.encode("Say:"), []), hello + [bos] + world)
    assert [(o.text, o.special) for o in outputs] == [(" Hello", False), ("<s>", True), (" world", False)]
    assert outputs[-1].generated_text == " Hello world"


def test_eos_reports_its_literal_and_finishes_the_text_without_it(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    eos = tokenizer.backend.token_to_id("</s>")
    ids = tokenizer.encode("Hello", add_special_tokens=False) + [eos]
    first, last = feed(OutputProcessor(tokenizer, tokenizer.encode("Say:"), []), ids, RequestStatus.FINISHED_EOS)
    assert first.finish_reason is None and first.generated_text is None
    assert (last.text, last.special, last.finish_reason, last.generated_text) == ("</s>", True, "eos_token", " Hello")
    assert not last.stop_matched


def test_length_finishes_with_the_generated_text(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    outputs = feed(OutputProcessor(tokenizer, tokenizer.encode("Say:"), []), ids)
    assert [o.finish_reason for o in outputs] == [None, "length"]
    assert outputs[-1].generated_text == " Hello world"


def test_a_stop_string_spanning_two_tokens_finishes_the_request_and_stays_in_the_text(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    ids = tokenizer.encode("Hello STOP world", add_special_tokens=False)
    assert [tokenizer.token_text(i) for i in ids] == ["Hello", "ST", "OP", "world"]  # "▁ST" alone decodes bare
    processor = OutputProcessor(tokenizer, tokenizer.encode("Say:"), ["STOP", "nowhere"])
    outputs = [processor.process(i, RUNNING) for i in ids[:3]]
    assert [(o.text, o.stop_matched, o.finish_reason) for o in outputs] == [
        (" Hello", False, None),
        (" ST", False, None),
        ("OP", True, "stop_sequence"),
    ]
    assert outputs[-1].generated_text == " Hello STOP"


def test_a_stop_string_is_not_checked_once_the_request_finished(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    ids = tokenizer.encode("Hello STOP", add_special_tokens=False)
    outputs = feed(OutputProcessor(tokenizer, [], ["STOP"]), ids)
    assert not outputs[-1].stop_matched and outputs[-1].finish_reason == "length"


def test_the_engine_ends_a_request_on_its_stop_string(tiny_tokenizer):
    async def generate():
        scheduler = Scheduler(SchedulerConfig(8, 64), KVCacheManager(32, 16))
        engine = Engine(scheduler, FakeShards(), tiny_tokenizer, [2], Metrics(100, 200))
        task = asyncio.create_task(engine.run())
        spec = GenerationRequest([5, 6, 7], SamplingParams(), 10, stop=["w105"])  # tokens w103, w104, ...
        events = [e async for e in engine.generate(spec, Timings(queued_s=0.0))]
        task.cancel()
        return events, scheduler

    events, scheduler = asyncio.run(generate())
    assert [e.token.text for e in events] == [" w103", " w104", " w105"]
    assert (events[-1].finish_reason, events[-1].generated_text) == ("stop_sequence", " w103 w104 w105")
    assert scheduler.kv_cache_manager.num_free_blocks == 32 and not scheduler.has_work
