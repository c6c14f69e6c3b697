"""Prompts as AUTOMATIC1111 reads them: emphasis weights, BREAK, and chunks of 75 tokens for prompts of any length.

Written from A1111's documented behaviour (its wiki's "Attention/emphasis" and "Infinite prompt length" sections and
the examples of its `parse_prompt_attention`), not from its code:

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3;
  brackets nest and multiply. An unclosed bracket applies to the rest of the prompt; a closing bracket with no
  opening one is literal text. `\\(`, `\\)`, `\\[`, `\\]` are the literal characters, `\\\\` a backslash.
- `BREAK` (the word, in capitals) ends the current chunk: what follows starts a new one.
- The text is tokenized without special tokens and cut into chunks of 75 tokens; each chunk is encoded on its own
  as BOS + its tokens + EOS, padded to 77 as the tokenizer pads, and the chunks' embeddings are concatenated.
  When a chunk fills up, the text after the last comma within its last 20 tokens moves to the next chunk
  (A1111's "comma padding backtrack", default 20), so that a phrase is not cut in two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHUNK_TOKENS = 75  # tokens of text per chunk: CLIP's 77 positions less BOS and EOS
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack": how far back a full chunk looks for a comma
ROUND = 1.1  # (text)
SQUARE = 1 / 1.1  # [text]

# One token of the emphasis syntax per match, in order of precedence: escapes, brackets, a weight closing a round
# bracket, plain text (anything else, up to the next special character), or a lone ":" or "\".
_SYNTAX = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_EMPHASIS_CHARS = re.compile(r"[\\()\[\]]|\bBREAK\b")


@dataclass(frozen=True)
class Chunk:
    """Up to 75 token ids of a prompt (no BOS, EOS or padding) and the emphasis weight of each."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


BREAK = None  # parse_prompt_attention's marker for BREAK: a new chunk starts here


def has_syntax(text: str) -> bool:
    """Whether `text` holds any emphasis or BREAK syntax; text without it is read as it is, unweighted."""
    return _EMPHASIS_CHARS.search(text) is not None


def parse_prompt_attention(text: str) -> list[tuple[str, float] | None]:
    """`text` as (fragment, weight) pairs in order, with BREAK (None) where a new chunk starts.

    Neighbouring fragments of equal weight are merged; a prompt with no text is [("", 1.0)].
    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    return _parse(text)[0]


def unclosed_brackets(text: str) -> int:
    """How many `(` and `[` of `text` are never closed: each weights the rest of the text, often by mistake."""
    return _parse(text)[1]


def _parse(text: str) -> tuple[list[tuple[str, float] | None], int]:
    """parse_prompt_attention's result, and the number of brackets left open."""
    parts: list[list] = []  # [fragment, weight], or [None, None] for BREAK
    open_round: list[int] = []  # where each open bracket's span starts in `parts`
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part[0] is not None:
                part[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):  # an escaped character; a lone backslash is dropped, as A1111 drops it
            parts.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round and _is_number(weight):
            scale(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append([None, None])
                parts.append([piece, 1.0])
    # Unclosed brackets reach to the end of the prompt.
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    merged: list[tuple[str, float] | None] = []
    for fragment, weight in parts:
        if fragment is None:
            merged.append(BREAK)
        elif fragment == "":
            continue  # no tokens: nothing to weight or to merge with
        elif merged and merged[-1] is not BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    return merged or [("", 1.0)], len(open_round) + len(open_square)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def prompt_chunks(tokenizer, text: str) -> list[Chunk]:
    """`text` cut into chunks of at most 75 tokens, with their emphasis weights (at least one chunk, maybe empty).

    Text without syntax is tokenized whole, so its tokens are the tokenizer's own for that text.
    """
    parsed = parse_prompt_attention(text) if has_syntax(text) else [(text, 1.0)]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.unk_token_id else comma
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position in `ids` of the last comma, -1 if none

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(Chunk(tuple(ids), tuple(weights)))
        ids, weights, last_comma = [], [], -1

    for part in parsed:
        if part is BREAK:
            close()
            continue
        fragment, weight = part
        for token in tokenizer(fragment, add_special_tokens=False, truncation=False).input_ids:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma >= 0 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                # The chunk is full mid-phrase: the words after its last comma move to the next chunk.
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == CHUNK_TOKENS:
                close()  # (a comma that arrives here starts the next chunk, and is not remembered as its last comma)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def chunk_input_ids(tokenizer, chunk: Chunk) -> tuple[list[int], list[int]]:
    """A chunk as the text encoder takes it, as the tokenizer pads a whole prompt: BOS, its tokens, EOS, then the
    pad token up to the tokenizer's length (77); and the attention mask (1 up to EOS)."""
    length = tokenizer.model_max_length
    ids = [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (length - len(ids)), [1] * len(ids) + [0] * (length - len(ids))


def empty_chunk() -> Chunk:
    """The chunk of an empty prompt: what pads a row's shorter text to its longer one's chunk count, as A1111 does."""
    return Chunk((), ())
