"""AUTOMATIC1111's prompt syntax: emphasis weights and BREAK, turned into weighted 75-token chunks.

Syntax (A1111's "Attention/emphasis" rules): `(text)` multiplies the weight of `text` by 1.1, `((text))`
by 1.1², `(text:w)` by w, `[text]` divides by 1.1; brackets nest (weights multiply); `\\(` `\\)` `\\[`
`\\]` `\\\\` are the literal characters; `BREAK` (a whole word, upper case) ends the current 75-token
chunk, padding it. Malformed syntax never raises and reads as in A1111: a bracket that is never closed
applies to the rest of the prompt, a closing bracket with nothing open is text, `(x:abc)` is `x:abc`
with weight 1.1, a lone backslash is dropped; a weight A1111 fails on (`(x:1.2.3)`) reads like `(x:abc)`.

Semantics (A1111's `EmphasisOriginal`): each fragment is tokenized on its own and the token lists are
concatenated; chunks hold 75 tokens, each gets its own start/end tokens; the encoder's hidden states of
a chunk are multiplied token by token by their weights, then scaled so that the chunk's mean (over
tokens and channels, start/end/padding included) is what it was (unless that mean is within rounding of
0, where A1111 would divide noise by noise). Two documented differences: A1111
takes that mean over the whole batch of a chunk (the same number when the batch repeats one prompt, as
A1111 batches do) and ours per prompt; and `BREAK` always breaks (A1111 multiplies its marker inside
brackets, turning it into a negatively weighted word). A1111's optional comma back-tracking is off, so
a prompt with no syntax gives exactly the plain chunking.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

PROMPT_SYNTAXES = ("a1111", "plain")
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers of ( ) and [ ]
Fragment = tuple[str, Optional[float]]  # (text, weight); weight None marks a BREAK
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# One piece of syntax per match, tried in this order: an escape (a lone backslash is dropped, as in A1111),
# a bracket, `:w)` closing a round bracket with weight w, a run of plain text, a colon.
_PIECE = re.compile(r"\\[()\[\]\\]?|[()\[\]]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[^\\()\[\]:]+|:")


def check_prompt_syntax(prompt_syntax: str) -> str:
    """The syntax name, or ValueError naming `prompt_syntax` and the allowed values."""
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(map(repr, PROMPT_SYNTAXES))}, got {prompt_syntax!r}")
    return prompt_syntax


def parse_emphasis(prompt: str) -> list[Fragment]:
    """`prompt` as (text, weight) fragments, neighbours of equal weight merged; BREAK as ("BREAK", None).

    A closing bracket with nothing open is text, as in A1111.
    """
    fragments: list[list] = []  # [text, weight] while weights are still being multiplied
    open_brackets: dict[str, list[int]] = {"(": [], "[": []}  # index of the first fragment inside each

    def close(bracket: str, factor: float) -> None:
        for fragment in fragments[open_brackets[bracket].pop():]:
            if fragment[1] is not None:
                fragment[1] *= factor

    for piece in _PIECE.finditer(prompt):
        text, weight = piece.group(0), piece.group(1)
        if text.startswith("\\"):
            fragments.append([text[1:], 1.0])
        elif text in open_brackets:
            open_brackets[text].append(len(fragments))
        elif weight is not None and open_brackets["("]:
            close("(", float(weight))
        elif text == ")" and open_brackets["("]:
            close("(", ROUND)
        elif text == "]" and open_brackets["["]:
            close("[", SQUARE)
        else:
            _add_text(fragments, text)
    for bracket, factor in (("(", ROUND), ("[", SQUARE)):  # never closed: to the end of the prompt
        while open_brackets[bracket]:
            close(bracket, factor)
    return _merge(fragments)


def _add_text(fragments: list[list], text: str) -> None:
    """Append literal text, each BREAK in it as a break marker."""
    for k, part in enumerate(_BREAK.split(text)):
        if k:
            fragments.append(["BREAK", None])
        fragments.append([part, 1.0])


def _merge(fragments: list[list]) -> list[Fragment]:
    merged: list[Fragment] = []
    for text, weight in fragments:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def plain_text(prompt: str) -> str:
    """The words of an A1111 prompt with the syntax removed (for encoders that take no weights, e.g. T5)."""
    return " ".join(" ".join(text.split()) for text, weight in parse_emphasis(prompt) if weight is not None).strip()


Chunk = tuple[list[int], list[float]]  # up to 75 body token ids and their weights


def weighted_chunks(tokenizer, prompt: str, per_chunk: int) -> list[Chunk]:
    """The prompt's chunk bodies (no start/end tokens) and token weights, as A1111 forms them.

    A chunk is closed when a token finds it full or at a BREAK (an empty chunk if nothing came since the
    last one); a trailing empty chunk is dropped unless it is the only one.
    """
    fragments = parse_emphasis(prompt)
    texts = [text for text, weight in fragments if weight is not None]
    ids = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids if texts else [])
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    for _, weight in fragments:
        if weight is None:
            chunks.append((tokens, weights))
            tokens, weights = [], []
            continue
        for token in next(ids):
            if len(tokens) == per_chunk:
                chunks.append((tokens, weights))
                tokens, weights = [], []
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        chunks.append((tokens, weights))
    return chunks


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, K·L, D) hidden states × (B, K, L) token weights, each chunk's mean restored (A1111's rule).

    With every weight 1 the states come back untouched (the same tensor). A chunk whose weighted mean is
    within rounding of 0 (states that average to zero, e.g. a final LayerNorm without bias) keeps its
    weighted states: the ratio of two rounding errors would be noise (A1111 divides regardless).
    """
    if bool((weights == 1).all()):
        return hidden
    batch, chunks, length = weights.shape
    z = hidden.reshape(batch, chunks, length, hidden.shape[-1])
    before = z.mean(dim=(2, 3), keepdim=True)
    z = z * weights.to(z.device, z.dtype)[..., None]
    after = z.mean(dim=(2, 3), keepdim=True)
    rounding = 1e-4 * z.abs().mean(dim=(2, 3), keepdim=True)  # far above float32 error of a mean, far below real means
    z = torch.where(after.abs() > rounding, z * (before / after), z)
    return z.reshape(hidden.shape)
