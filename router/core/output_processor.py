"""From a request's generated tokens to the text clients see: text deltas from `tokenizers`'
DecodeStream, stop strings, and TGI's finish reasons.

The scheduler decides the finishes that depend on tokens alone (length, then EOS, where it
applies a step's tokens); the output processor decides the one that depends on text (a stop
string) and reports each finish with the generated text.
"""

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from router.core.request import FINISH_REASONS, RequestStatus
from router.tokenizer import Tokenizer

# Prompt tokens decoded before the first generated one, so that its leading space comes out
# as in the whole sequence (SentencePiece tokenizers drop it at the start of a text).
CONTEXT_TOKENS = 5


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """One generated token as clients see it."""

    text: str  # what the token adds to the generated text ("" inside a character); a special token's literal
    special: bool  # a special token: reported with its literal, kept out of the generated text
    stop_matched: bool  # the token completed a stop string: the caller ends the request
    finish_reason: str | None  # TGI's name, on the request's last token
    generated_text: str | None  # the whole generated text, on the request's last token


class OutputProcessor:
    """Turns one request's generated tokens into text, one token at a time.

    Text comes out only once its UTF-8 characters are complete, and the concatenation of every
    token's text (special tokens aside) is the generated text: the decode of the generated
    tokens after the prompt's. A stop string found in the text ends the request with it (TGI
    keeps the stop string in the generated text).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str]):
        self._tokenizer = tokenizer
        self._stop = stop
        self._max_stop_len = max(map(len, stop), default=0)
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        # A prompt cut inside a character would have the stream emit its context as text.
        while context and tokenizer.decode(context, skip_special_tokens=False).endswith("\ufffd"):
            context.pop()
        self._stream = DecodeStream(context, skip_special_tokens=False)
        self._last_ids = context  # the tokens of the stream's last text: what it decodes after
        self._pending_ids: list[int] = []  # tokens fed since, their text not complete yet
        self.text = ""  # the generated text so far

    def process(self, token_id: int, status: RequestStatus) -> TokenOutput:
        """The output of the request's next token; `status` is the request's after the scheduler
        applied the token (finished by length or EOS, or running). At the end, the text of an
        incomplete character left over is added to the last token's."""
        special = token_id in self._tokenizer.special_ids
        text = self._tokenizer.token_text(token_id) if special else self._step(token_id)
        stop_matched = bool(self._stop) and not status.is_finished and self._completes_stop(text)
        if stop_matched:
            status = RequestStatus.FINISHED_STOP_SEQUENCE
        if not status.is_finished:
            return TokenOutput(text, special, False, None, None)
        text += self._flush()
        return TokenOutput(text, special, stop_matched, FINISH_REASONS[status], self.text)

    def _step(self, token_id: int) -> str:
        delta = self._stream.step(self._tokenizer.backend, token_id)
        if delta is None:  # an incomplete character: wait for the next token
            self._pending_ids.append(token_id)
            return ""
        self._last_ids, self._pending_ids = self._pending_ids + [token_id], []
        self.text += delta
        return delta

    def _completes_stop(self, text: str) -> bool:
        """Whether a stop string is in the generated text's end: this token's `text` and, before
        it, as much as the longest stop string."""
        window = self.text[-(len(text) + self._max_stop_len) :]
        return any(s in window for s in self._stop)

    def _flush(self) -> str:
        """The text of the tokens fed since the stream's last text (an incomplete character)."""
        if not self._pending_ids:
            return ""
        t = self._tokenizer
        before = t.decode(self._last_ids, skip_special_tokens=False)
        delta = t.decode(self._last_ids + self._pending_ids, skip_special_tokens=False)[len(before) :]
        self._pending_ids = []
        self.text += delta
        return delta
