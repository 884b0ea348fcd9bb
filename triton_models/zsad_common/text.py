"""Class-name text: CLIP's BPE tokeniser on the standard library alone, and the class name -> token ids rule.

Part of ``zsad_common``: the served class-name model runs it in a stock Triton container, and Bayes-PFL's eager
encoder (zsad.methods.bayespfl.class_name_tokens) applies the same :func:`class_name_ids` to open_clip's tokeniser.

:class:`ClipTokenizer` produces the ids of open_clip's ``SimpleTokenizer`` (clean="lower", the tokeniser of every
CLIP architecture zsad uses) from the same vocabulary file, ``bpe_simple_vocab_16e6.txt.gz``, which zsad-export
copies beside the served model. open_clip cleans text with ftfy and splits it with the ``regex`` package; here the
cleaning repeats ftfy's deterministic fixes (HTML entities, C1 controls, Latin ligatures, character width, curly
quotes, line breaks, terminal escapes, control characters, NFC) and the split classifies characters with
``unicodedata``. Not repeated: ftfy's heuristic repair of mojibake (UTF-8 text mis-decoded as Latin-1 /
Windows-125x, e.g. "cafÃ©"), so such already-broken text can tokenise differently.
tests/test_triton_repo_standalone.py compares both on many strings.
"""
from __future__ import annotations

import gzip
import html
import re
import unicodedata
from collections.abc import Callable, Sequence

from .guard import BadInput

SOT, EOT = "<start_of_text>", "<end_of_text>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_MERGES = 49152 - 256 - 2  # merges CLIP's vocabulary uses (the file holds more)

_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_ESCAPE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_LINE_BREAK = re.compile("\r\n|\r|\u2028|\u2029|\u0085")
_C1 = re.compile("[\x80-\x9f]")
_QUOTES = {0x02BC: "'", **{c: "'" for c in range(0x2018, 0x201C)}, **{c: '"' for c in range(0x201C, 0x2020)}}
_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl",
    "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"})
_WIDTH = {0x3000: " ", **{c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(c)) != chr(c)}}
_CONTROL = {c: None for c in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)]}


def _c1_as_cp1252(match) -> str:
    try:
        return match.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)  # the five bytes cp1252 leaves undefined stay as they are


def _fix_text(text: str) -> str:
    """ftfy.fix_text's deterministic steps, in its order, repeated until the text stops changing."""
    while True:
        before = text
        if "<" not in text:  # ftfy leaves entities alone in text that looks like HTML
            text = _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        text = _C1.sub(_c1_as_cp1252, text)
        text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES)
        text = _LINE_BREAK.sub("\n", text)
        text = _ANSI_ESCAPE.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def clean(text: str) -> str:
    """open_clip's clean="lower": ftfy, HTML-unescape twice, collapse whitespace, lower case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, 's' whitespace, 'o' anything else (the split pattern's classes)."""
    if ch.isspace():
        return "s"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "o"


def split_words(text: str) -> list[str]:
    """The pieces open_clip's pattern finds: special tokens, contractions, letter runs, single numbers, and runs
    of other non-space characters; whitespace separates them and is dropped."""
    out, i, n = [], 0, len(text)
    while i < n:
        special = next((t for t in (SOT, EOT) if text.startswith(t, i)), None)
        contraction = next((c for c in _CONTRACTIONS if text[i:i + len(c)].lower() == c), None)
        whole = special or contraction  # taken as one piece
        kind = _kind(text[i])
        if whole:
            j = i + len(whole)
        elif kind == "s":
            i += 1
            continue
        elif kind == "N":
            j = i + 1
        else:
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        out.append(text[i:j])
        i = j
    return out


def _byte_symbols() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    others map to code points from 256 up. Its order (printable bytes first) is the vocabulary's order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


class ClipTokenizer:
    def __init__(self, vocab_path: str):
        with gzip.open(vocab_path) as f:
            lines = f.read().decode("utf-8").split("\n")[1:_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_symbols = _byte_symbols()
        ordered = list(self.byte_symbols.values())
        ordered += [s + "</w>" for s in ordered]
        ordered += ["".join(m) for m in merges] + [SOT, EOT]
        self.ids = {tok: i for i, tok in enumerate(ordered)}
        self.rank = {m: r for r, m in enumerate(merges)}
        self.sot, self.eot = self.ids[SOT], self.ids[EOT]
        self._cache: dict[str, list[str]] = {}

    def _merge(self, word: str) -> list[str]:
        """Byte-level BPE of one word: repeatedly join the adjacent pair with the lowest merge rank."""
        if word in (SOT, EOT):
            return [word]
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False) if (a, b) in self.rank}
            if not pairs:
                break
            best = min(pairs, key=self.rank.__getitem__)
            joined, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    joined.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    joined.append(parts[i])
                    i += 1
            parts = joined
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start / end tokens (open_clip's ``SimpleTokenizer.encode``)."""
        ids = []
        for word in split_words(clean(text)):
            symbols = word if word in (SOT, EOT) else "".join(self.byte_symbols[b] for b in word.encode("utf-8"))
            ids += [self.ids[p] for p in self._merge(symbols)]
        return ids

    def __call__(self, text: str, context_length: int = 77) -> list[int]:
        """[SOT] ids [EOT] padded with 0 to ``context_length``; too long: cut, the last kept id replaced by EOT."""
        ids = [self.sot] + self.encode(text) + [self.eot]
        if len(ids) > context_length:
            ids = ids[:context_length - 1] + [self.eot]
        return ids + [0] * (context_length - len(ids))


def class_name(name: object) -> str:
    """``name`` if it is a non-empty string (not only whitespace); BadInput otherwise (the name is never echoed)."""
    if not isinstance(name, str) or not name.strip():
        raise BadInput("a class name must be a non-empty string")
    return name


def class_name_ids(name: object, tokenize: Callable[[str], Sequence[int]], length: int,
                   label: str = "the class name") -> list[int]:
    """One class name, as given -> its ``length`` token ids "[SOT] words [EOT] 0..." (Bayes-PFL's class tokens).

    ``tokenize``: text -> CLIP's padded ids (:class:`ClipTokenizer`, or open_clip's tokeniser in eager code). No
    renaming: the client's words as given (CLIP's cleaning lower-cases them and collapses whitespace). The end token
    is the largest id, as the graph finds it (argmax); BadInput if the name is empty or its end token falls at or
    after ``length`` (``label`` names the name in that message).
    """
    ids = list(tokenize(class_name(name)))
    end = ids.index(max(ids))
    if end >= length:
        raise BadInput(f"{label} is {end - 1} BPE tokens; with {length} class tokens at most {length - 2} fit")
    return ids[:length]
