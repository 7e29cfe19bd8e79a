"""The model's tokenizer (Hugging Face `tokenizers`, no torch) and its configuration."""

import json
from pathlib import Path

import tokenizers


class Tokenizer:
    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        self._tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        config_path = model_dir / "tokenizer_config.json"
        self.config: dict = json.loads(config_path.read_text()) if config_path.exists() else {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{name, template}], pick "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens as their literal)."""
        return self._tok.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a request's tokens into text one token at a time.

    Text is emitted only once it is complete UTF-8; decoding keeps a few preceding tokens as
    context so that word-joining spaces come out right (TGI's prefix/read offsets). The
    concatenation of everything emitted, including the final `flush()`, is the generated text.
    Special tokens are reported with their literal text but are not part of the generated text.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT_TOKENS :])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # generated text so far

    def add(self, token_id: int) -> str:
        """Text this token completes (may be empty); for special tokens, their literal."""
        if token_id in self.tokenizer.special_ids:
            return self.tokenizer.token_text(token_id)
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=False)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still pending at the end of generation (possibly an incomplete character)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=False)
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
