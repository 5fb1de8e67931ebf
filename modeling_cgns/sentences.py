"""Report text -> sentence list (docs/method.md D.3).

The reference builds one training text per image as ``impression + " " + findings`` and cuts it
into sentences: split on numbered-list markers, then on full stops; every piece is lower-cased,
reduced to its ``\\w+`` tokens (punctuation dropped), stripped of non-ASCII characters, and kept
only when it has at least two tokens. A report is usable only when it has at least
``min_report_tokens`` tokens in total.

The result is lower-case, punctuation-free and whitespace-separated, which is what makes the
per-sentence word-piece counts add up to the joint tokenisation (see ``processing_cgns``).
"""
import re
from itertools import chain, islice
from typing import List, Optional

_NUMBERED_ITEM = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")


def report_text(impression: Optional[str], findings: Optional[str]) -> str:
    """Join the two sections the way the reference does (impression first), newlines -> spaces."""
    parts = [p for p in (impression, findings) if p and p.strip()]
    return " ".join(parts).replace("\r", " ").replace("\n", " ")


def split_sentences(text: Optional[str], min_sentence_tokens: int = 2,
                    max_tokens: Optional[int] = None) -> List[str]:
    """Cut a report into normalised sentences (D.3 steps 2-3).

    Returns a list of lower-case strings of ``\\w+`` tokens joined by single spaces; pieces with
    fewer than ``min_sentence_tokens`` tokens are dropped. ``None`` or empty text gives ``[]``.

    ``max_tokens`` stops once the sentences hold that many tokens (the last one cut there): the
    result is then the start of the full one, and since every token is at least one word piece,
    a tokenizer truncating at ``max_tokens`` pieces sees exactly what it would have seen of the
    full result. A megabyte-long report costs no more than its first ``max_tokens`` words.
    """
    if not text:
        return []
    budget = None if max_tokens is None else max(0, int(max_tokens))
    if budget is None:
        text = text.replace("\r", " ").replace("\n", " ")
        pieces = (piece for item in _NUMBERED_ITEM.split(text) for piece in item.split("."))
    else:  # the same pieces, found one at a time: the text after the budget is never scanned
        pieces = (piece.replace("\r", " ").replace("\n", " ") for piece in _iter_pieces(text))
    sentences = []
    for piece in pieces:
        if budget is not None and budget <= 0:
            break
        if not piece.strip():
            continue
        piece = piece.replace("\ufffd\ufffd", " ").lower()
        if budget is None:
            tokens = _WORD.findall(piece)
            if len(tokens) < min_sentence_tokens:
                continue
            tokens = [t for t in (t.encode("ascii", "ignore").decode() for t in tokens) if t]
        else:
            tokens = _first_tokens(piece, min_sentence_tokens, budget)
        if tokens:
            if budget is not None:
                budget -= len(tokens)
            sentences.append(" ".join(tokens))
    return sentences


def _iter_pieces(text: str):
    """The pieces of ``split_sentences``' split (numbered-list markers, then full stops), lazily."""
    start = 0
    for marker in _NUMBERED_ITEM.finditer(text):
        yield from _dot_pieces(text, start, marker.start())
        start = marker.end()
    yield from _dot_pieces(text, start, len(text))


def _dot_pieces(text: str, start: int, end: int):
    while True:
        stop = text.find(".", start, end)
        if stop < 0:
            yield text[start:end]
            return
        yield text[start:stop]
        start = stop + 1


def _first_tokens(piece: str, min_sentence_tokens: int, limit: int) -> List[str]:
    """``split_sentences``' tokens of one piece, read lazily: ``[]`` when the piece has fewer than
    ``min_sentence_tokens`` words, else its first ``limit`` non-empty ASCII tokens."""
    words = _WORD.finditer(piece)
    first = list(islice(words, min_sentence_tokens))
    if len(first) < min_sentence_tokens:
        return []
    tokens = []
    for m in chain(first, words):
        token = m.group().encode("ascii", "ignore").decode()
        if token:
            tokens.append(token)
            if len(tokens) == limit:
                break
    return tokens


def count_tokens(sentences: List[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def is_usable_report(sentences: List[str], min_report_tokens: int = 3) -> bool:
    """D.3 step 4: keep a report only when its sentences hold at least ``min_report_tokens`` tokens."""
    return count_tokens(sentences) >= min_report_tokens


__all__ = ["report_text", "split_sentences", "count_tokens", "is_usable_report"]
