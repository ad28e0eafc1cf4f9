"""Ticket text handling: cleaning untrusted input, Jira markup, stack traces, and tokens for the lexical index."""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Anything a Jira description may carry that is noise for similarity: control characters (except
# newline / tab), markup, URLs, long hex ids, timestamps.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_CODE_BLOCK = re.compile(r"\{(code|noformat|quote)(?::[^}]*)?\}(.*?)\{\1\}", re.S | re.I)
_MARKUP = re.compile(r"\{(?:code|noformat|quote|color|panel)(?::[^}]*)?\}|\[~[^\]]*\]|!\S+?!|h[1-6]\.\s|\*(?=\S)|(?<=\S)\*")
_URL = re.compile(r"https?://\S+")
_LINK = re.compile(r"\[([^|\]]*)\|[^\]]*\]")
_HEX = re.compile(r"\b(?:0x)?[0-9a-f]{12,}\b", re.I)
_TIMESTAMP = re.compile(r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\S*")
_FRAME = re.compile(r"^\s*at [\w$.<>]+\([^)]*\)\s*$", re.M)
_WS = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n{3,}")


def clean(text: str | None) -> str:
    """Make untrusted text safe to process: NFC, no control characters, no lone surrogates, tidy space."""
    if not text:
        return ""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates from JSON \ud800 escapes
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _WS.sub(" ", text)
    return _BLANKS.sub("\n\n", text).strip()


def _compress_traces(text: str, keep: int) -> str:
    """Keep the first `keep` frames of each stack trace: the exception and where it starts say the most."""
    out: list[str] = []
    run = 0
    for line in text.split("\n"):
        if _FRAME.match(line):
            run += 1
            if run > keep:
                continue
        else:
            run = 0
        out.append(line)
    return "\n".join(out)


def for_embedding(summary: str, description: str, max_chars: int = 2000) -> str:
    """The text the dense model sees: summary first, then the description without markup and noise."""
    # Cut before the regexes: a 1 MB description costs no more than a long one.
    desc = _CODE_BLOCK.sub(lambda m: "\n" + m.group(2) + "\n", description[: max_chars * 4])
    desc = _compress_traces(desc, keep=3)
    desc = _LINK.sub(r"\1", desc)
    desc = _URL.sub(" ", desc)
    desc = _MARKUP.sub(" ", desc)
    desc = _TIMESTAMP.sub(" ", desc)
    desc = _HEX.sub(" ", desc)
    desc = _WS.sub(" ", desc)
    desc = _BLANKS.sub("\n\n", desc).strip()
    # Oversized descriptions are truncated here, never rejected; the model's window is shorter anyway.
    return (summary.strip() + ".\n" + desc)[:max_chars]


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|\d+(?:\.\d+)+|\d+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
STOPWORDS = frozenset("""a an and are as at be been but by can could do does did for from has have had if in into is it
its not no of on or so such that the their then there these they this to was were will with when which while would
should we i you he she our your my me us after before also any all some than too very via using use used""".split())


@lru_cache(maxsize=200_000)
def stem(word: str) -> str:
    """A light English suffix stripper: enough to join fail/fails/failed/failing, cheap enough for 100k tickets."""
    if len(word) <= 4 or not word.isalpha():
        return word
    for suffix, repl in (("ational", "ate"), ("ization", "ize"), ("iveness", "ive"), ("fulness", "ful"),
                         ("ousness", "ous"), ("ations", "ate"), ("ation", "ate"), ("ments", ""), ("ment", ""),
                         ("ingly", ""), ("edly", ""), ("ings", ""), ("ing", ""), ("ies", "y"), ("ied", "y"),
                         ("ers", "er"), ("ed", ""), ("es", "e"), ("ly", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            base = word[: len(word) - len(suffix)] + repl
            # "running" -> "runn" -> "run": undouble a final consonant left by -ing / -ed.
            if suffix in ("ing", "ed", "ings") and len(base) > 3 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]
            return base
    return word


def tokens(text: str) -> list[str]:
    """Lexical tokens: words stemmed, code identifiers kept whole *and* split (FileSystem -> filesystem, file, system)."""
    out: list[str] = []
    for m in _WORD.finditer(text):
        raw = m.group(0)
        if raw[0].isdigit():
            if "." in raw:  # a version number is a strong signal (2.9.10.3)
                out.append(raw)
            continue
        # org.apache.hadoop.fs.FileSystem.getFileStatus: the class and member say the most, packages little.
        parts = raw.split(".")[-2:]
        for part in parts:
            low = part.lower()
            subs = _CAMEL.findall(part) if not part.islower() or "_" in part else []
            subs = [s.lower() for s in subs if len(s) > 1]
            if len(subs) > 1:
                out.append(low)
                out.extend(stem(s) for s in subs if s not in STOPWORDS)
            elif low not in STOPWORDS and len(low) > 1:
                out.append(stem(low))
    return out
