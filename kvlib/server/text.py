"""Token ids -> text, one piece per token, never splitting a character; and stop strings.

A byte-level BPE token is a run of bytes, and a character of UTF-8 is 1 to 4 bytes: "😀" is
four tokens of the book's tokenizer, one byte each. A stream that decoded each token alone
would send four replacement characters. `IncrementalDecoder` holds the bytes of a character
until it is whole (Python's incremental UTF-8 decoder does exactly that), so the pieces it
returns concatenate to `tokenizer.decode` of all the tokens, and each piece is valid text.

`StopStrings` cuts the text before the first stop string. Streamed, it holds back the end of
the text that could still become a stop string ("\\n" of "\\n\\n") until the next piece says
whether it does.
"""

from __future__ import annotations

import codecs

from kvlib.errors import KVLibValueError


class IncrementalDecoder:
    """push(token id) -> the text that is now complete ("" while a character is unfinished);
    flush() -> what is left (replacement characters for bytes that never formed one).
    The end-of-text id is not text: it gives ""."""

    def __init__(self, tokenizer) -> None:
        self.vocab, self.eot_id = tokenizer.vocab, tokenizer.eot_id
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id == self.eot_id:
            return ""
        return self._utf8.decode(self.vocab[token_id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class StopStrings:
    """push(text) -> (text that is safe to send, whether a stop string was reached);
    flush() -> the held-back text, once no more text comes."""

    def __init__(self, stops: list[str]) -> None:
        if any(not s for s in stops):
            raise KVLibValueError(f"stop strings must be non-empty, got {stops!r}")
        self.stops = stops
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        text = self._held + text
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text
