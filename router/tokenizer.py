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
    def backend(self) -> tokenizers.Tokenizer:
        """The Hugging Face tokenizer, for `tokenizers.decoders.DecodeStream`."""
        return self._tok

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
