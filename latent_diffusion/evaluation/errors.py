"""Errors in what an evaluation was asked to do, naming the parameter so a front end can name its own spelling.

The library calls a parameter by its Python name (`samplers`, `out_dir`); the
`latent-diffusion eval` command maps those names to its flags (`--samplers`,
`--out`) in `latent_diffusion/apps/cli.py`, so the flags are spelled in one place.
"""
from __future__ import annotations

from typing import Mapping


class EvalArgumentError(ValueError):
    """A bad value of one evaluation parameter: `argument` (its name) and `problem` (what is wrong and allowed)."""

    def __init__(self, argument: str, problem: str):
        self.argument, self.problem = argument, problem
        super().__init__(self.message())

    def message(self, names: Mapping[str, str] | None = None) -> str:
        """The one-line message, the parameter called by `names` (a front end's spellings) when listed there."""
        return f"{(names or {}).get(self.argument, self.argument)} {self.problem}"


class EvalFileNotFoundError(EvalArgumentError, FileNotFoundError):
    """A file or folder an evaluation parameter names does not exist."""
