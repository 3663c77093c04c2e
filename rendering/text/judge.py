"""What a rewrite becomes before a later stage renders it: cleaned, trimmed to the video
model's prompt limit, or judged unusable (and why).

Pure functions of the generated text; no torch. The steps, in order:

1. **Clean**: a reasoning model's ``<think>...</think>`` block is dropped, then a leading label
   (``Rewritten prompt:``, ``Enhanced prompt -``), wrapping quotes or backticks, and runs of
   whitespace (newlines included) become single spaces.
2. **Finish**: a text that stopped at ``max_new_tokens`` (no end token) loses its unfinished
   last sentence, when it has a finished one before it.
3. **Judge**: an empty text is ``empty``; one with control characters or U+FFFD (bytes that
   were not UTF-8), or without a single letter, is ``not_text``; one over the video model's
   prompt limit (its text encoder's tokens) loses whole sentences from its end until it fits,
   and is ``too_long`` if even its first sentence does not.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

REASONS = ("empty", "not_text", "too_long")
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:(?:rewritten|enhanced|expanded|improved|refined|final|"
                    r"new|video)\s+)?prompt(?:\*\*)?\s*[:\-\u2013\u2014]\s*(?:\*\*)?", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
# A sentence ends at . ! ? (or their CJK forms), with any closing quotes or brackets after it.
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*(?=\s|$)")


def cleaned(text: str) -> str:
    """Step 1: the generated text without reasoning, label, wrapping quotes or extra space."""
    text = _THINK.sub(" ", text)
    text = " ".join(text.split())
    text = _LABEL.sub("", text, count=1).strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def finished(text: str, ended: bool) -> str:
    """Step 2: a text cut off by the token budget without its unfinished last sentence."""
    if ended:
        return text
    ends = list(_SENTENCE_END.finditer(text))
    return text[:ends[-1].end()].strip() if ends else text


def sentences(text: str) -> list[str]:
    """``text`` split after each sentence end; the last piece may be unfinished."""
    pieces, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        pieces.append(text[start:end.end()].strip())
        start = end.end()
    if text[start:].strip():
        pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def judged(text: str, count_tokens: Callable[[str], int] | None = None,
           limit: int | None = None) -> tuple[str, str | None]:
    """Step 3: (the text a later stage renders, None) or (the text, the reason it is unusable:
    one of ``REASONS``)."""
    if not text:
        return text, "empty"
    if "\ufffd" in text or any(unicodedata.category(c) in ("Cc", "Cs") for c in text) \
            or not any(c.isalpha() for c in text):
        return text, "not_text"
    if count_tokens is None or limit is None or count_tokens(text) <= limit:
        return text, None
    kept = sentences(text)
    while len(kept) > 1:
        kept.pop()
        trimmed = " ".join(kept)
        if count_tokens(trimmed) <= limit:
            return trimmed, None
    return text, "too_long"


def rewrite(generated: str, ended: bool, count_tokens: Callable[[str], int] | None = None,
            limit: int | None = None) -> tuple[str, str | None]:
    """Steps 1 to 3: (usable text, None), or (what was made of it, why it is unusable)."""
    return judged(finished(cleaned(generated), ended), count_tokens, limit)
