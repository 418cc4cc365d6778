"""pycocoevalcap's caption tokenization without Java.

pycocoevalcap writes all captions, one per line, to a file, runs Stanford's PTBTokenizer over it
(``-preserveLines -lowerCase``), then drops the tokens in its PUNCTUATIONS list. The same text goes through the same
lexer rules here, so context that crosses a line ("No." before a line starting with a digit) is seen as Java sees
it. The lowercasing happens after the Java tokenizer's bracket names are made, so "(" becomes "-lrb-", which the
(upper-case) list no longer removes; that is reproduced.
"""

from __future__ import annotations

import regex

from .ptb_lexer import COMPILED, NEWLINE, SKIP

PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])


# A plain word followed by a space: no rule makes anything else of it but these (split "can not", "gon na"...), so
# it is taken without trying every rule (the lexer's time goes there otherwise)
_PLAIN_WORD = regex.compile(r"[A-Za-z]+(?=[ \n]|$)")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "wanna", "gotta", "lemme", "gimme"])
_SPACE = regex.compile(r" +")


def _longest(text: str, pos: int):
    """(main text, output) of the rule matching the most text at ``pos`` (main part plus trailing context)."""
    best_length, best = 0, None
    for quick, longest, out in COMPILED:
        if quick.match(text, pos) is None:
            continue
        m = longest.match(text, pos)
        if m is not None and m.end() - pos > best_length and m.end(1) > pos:
            best_length, best = m.end() - pos, (m.group(1), out)
    return best


def ptb_tokens(text: str, stop: int | None = None) -> list[str]:
    """Stanford PTBTokenizer tokens (before lowercasing) of ``text[:stop]``; the rest is only trailing context."""
    tokens: list[str] = []
    pos, end = 0, len(text) if stop is None else stop
    while pos < end:
        plain = _PLAIN_WORD.match(text, pos) or _SPACE.match(text, pos)
        if plain is not None and plain.group(0).lower() not in _SPLIT_WORDS:
            if plain.group(0)[0] != " ":
                tokens.append(plain.group(0))
            pos = plain.end()
            continue
        best = _longest(text, pos)
        if best is None:  # no rule covers this character: the Java tokenizer drops it
            pos += 1
            continue
        main, out = best
        pos += len(main)
        if out is not SKIP and out is not NEWLINE:
            tokens.append(main if out is None else out if isinstance(out, str) else out(main))
    return tokens


def _finish(tokens: list[str]) -> str:
    return " ".join(w for w in (t.lower() for t in tokens) if w not in PUNCTUATIONS)


def tokenize_captions(captions: list[str]) -> list[str]:
    """Captions as pycocoevalcap scores them: PTB tokens, lowercased, punctuation dropped, joined by spaces."""
    lines = [c.replace("\n", " ") for c in captions]
    if any(c in "\r\u2028\u2029\u000B\u000C\u0085" for line in lines for c in line):
        raise ValueError("a caption holds a line-separator character other than \\n; pycocoevalcap would misalign")
    # each line is lexed with the next one after it, the trailing context the Java tokenizer sees in its file
    following = lines[1:] + [None]
    return [_finish(ptb_tokens(line if after is None else f"{line}\n{after}", len(line)))
            for line, after in zip(lines, following)]


def tokenize(captions_for_image: dict) -> dict:
    """``{id: [{"caption": str}, ...]}`` (or ``{id: [str, ...]}``) to ``{id: [tokenized str, ...]}``, in one pass over
    the captions in dict order, as pycocoevalcap's PTBTokenizer.tokenize does."""
    keys = [key for key, caps in captions_for_image.items() for _ in caps]
    texts = [c["caption"] if isinstance(c, dict) else c for caps in captions_for_image.values() for c in caps]
    out: dict = {}
    for key, tokens in zip(keys, tokenize_captions(texts)):
        out.setdefault(key, []).append(tokens)
    return out
