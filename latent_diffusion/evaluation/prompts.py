"""The prompts an evaluation draws: balanced Shapes prompts, or a prompt file (text lines or JSONL).

A prompt that parses in the Shapes grammar is scored for adherence and takes its categories from the
grammar; any other prompt is generated and measured (speed, FID, CLIP score) but not judged.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

from latent_diffusion.shapes import evaluation_prompts, parse_prompt
from latent_diffusion.evaluation.errors import EvalArgumentError, EvalFileNotFoundError


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """A prompt of the evaluation set; `shapes` when it parses in the Shapes grammar (then it is scored)."""

    index: int
    text: str
    categories: tuple[str, ...] = ()
    shapes: bool = False

    def as_dict(self) -> dict:
        return dict(index=self.index, prompt=self.text, categories=list(self.categories), shapes=self.shapes)


def is_shapes_prompt(text: str) -> bool:
    try:
        parse_prompt(text)
    except ValueError:
        return False
    return True


def make_prompt(index: int, text: str, categories: Sequence[str] = ()) -> EvalPrompt:
    """An EvalPrompt; a Shapes prompt takes its categories from the grammar, others keep the given ones."""
    try:
        return EvalPrompt(index, text, parse_prompt(text).categories, True)
    except ValueError:
        return EvalPrompt(index, text, tuple(categories), False)


def shapes_eval_prompts(num: int, seed: int = 0) -> list[EvalPrompt]:
    """`num` balanced Shapes prompts (`latent_diffusion.shapes.evaluation_prompts`)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise EvalArgumentError("num_prompts", f"must be an integer >= 1; got {num!r}")
    return [EvalPrompt(i, text, tuple(cats), True) for i, (text, cats) in enumerate(evaluation_prompts(num, seed))]


def _jsonl_prompt(path: Path, line_number: int, line: str) -> tuple[str, tuple[str, ...]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise EvalArgumentError("prompt_file", f"{str(path)!r} line {line_number}: not JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise EvalArgumentError("prompt_file",
                                f"{str(path)!r} line {line_number}: each JSONL line needs a \"prompt\" string")
    categories = record.get("categories") or ()
    return record["prompt"], (categories,) if isinstance(categories, str) else tuple(map(str, categories))


def load_prompt_file(path: str | os.PathLike) -> list[EvalPrompt]:
    """Prompts from a text file (one per line; blank lines and lines starting with # skipped) or a JSONL file
    of {"prompt": ..., "categories": [...]} (a .jsonl name, or a first line starting with "{")."""
    path = Path(path)
    if not path.is_file():
        raise EvalFileNotFoundError("prompt_file", f"file not found: {str(path)!r}")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise EvalArgumentError("prompt_file", f"{str(path)!r} holds no prompts")
    jsonl = path.suffix == ".jsonl" or lines[0][1].startswith("{")
    entries = [_jsonl_prompt(path, n, line) if jsonl else (line, ()) for n, line in lines]
    return [make_prompt(i, text, categories) for i, (text, categories) in enumerate(entries)]
