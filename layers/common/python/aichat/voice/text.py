"""What a reply sounds like: the text cleaned for speech, and split into pieces a TTS request accepts.

The rule (README "Voice"): stage directions in parentheses — （蹭蹭你）, (smiles), 【动作】 — are not spoken;
markdown marks are dropped but their text kept (links keep their label, code keeps its text); URLs,
emoji and other pictographs go; whitespace collapses. What is left is what the provider reads.
"""

from __future__ import annotations

import re
import unicodedata

_STAGE = re.compile(r"（[^（）]*）|\([^()]*\)|【[^【】]*】|\[[^\[\]]*\](?!\()|\*[^*\n]{1,40}\*(?!\*)")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"https?://\S+")
_MARKS = re.compile(r"(^|\n)\s{0,3}(#{1,6}\s+|>\s?|[-*+]\s+|\d+[.)]\s+)|```[a-zA-Z0-9_-]*|`|\*\*|__|~~|\*")
_SPACE = re.compile(r"[ \t\u3000]+")
_NEWLINES = re.compile(r"\s*\n\s*")
# Sentence ends (kept with their sentence); then the weaker breaks used for an overlong sentence.
_SENTENCE = re.compile(r"[^。！？!?；;…\n]*(?:[。！？!?；;…]+[”’」』）)]*|\n|$)")
_CLAUSE = re.compile(r"[^，,、：:]*(?:[，,、：:]+|$)")


def _pictograph(ch: str) -> bool:
    code = ord(ch)
    return (
        unicodedata.category(ch) in ("So", "Cs", "Co")
        or 0x1F000 <= code <= 0x1FAFF
        or 0x2600 <= code <= 0x27BF
        or code in (0x200D, 0xFE0E, 0xFE0F, 0x20E3)
        or 0x1F3FB <= code <= 0x1F3FF
    )


def speakable(text: str) -> str:
    """The reply as it is read aloud (see the module docstring)."""
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    previous = None
    while previous != text:  # nested directions: （她笑着（小声）说）
        previous, text = text, _STAGE.sub("", text)
    text = _MARKS.sub(lambda m: m.group(1) or "", text)
    text = "".join(ch for ch in text if not _pictograph(ch))
    text = _NEWLINES.sub("\n", _SPACE.sub(" ", text)).strip()
    return text


def weight(text: str) -> int:
    """Length as the providers count it: a CJK (wide) character counts 2, anything else 1."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def split(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` (weighted) each, cut at sentence ends, else at clause breaks, else hard."""
    pieces: list[str] = []
    current = ""
    for sentence in (s for s in _SENTENCE.findall(text) if s.strip()):
        for part in _fit(sentence.strip(), limit):
            if current and weight(current) + weight(part) > limit:
                pieces.append(current)
                current = ""
            current += part
    if current.strip():
        pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def _fit(sentence: str, limit: int) -> list[str]:
    if weight(sentence) <= limit:
        return [sentence]
    parts: list[str] = []
    for clause in (c for c in _CLAUSE.findall(sentence) if c):
        while weight(clause) > limit:  # no break at all: cut where the limit falls
            cut, total = 0, 0
            for i, ch in enumerate(clause):
                total += weight(ch)
                if total > limit:
                    cut = i
                    break
            parts.append(clause[:cut])
            clause = clause[cut:]
        parts.append(clause)
    return parts
