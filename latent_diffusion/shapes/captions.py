"""Captions of Shapes scenes, and prompts parsed back into what they ask for.

The grammar is the spec's, exactly (lower case, no final full stop):

    single:  a[n] [small |large ]<colour> <shape>[ <position>][ on a <bg> background]
    two:     a[n] <colour> <shape> <relation> a[n] <colour> <shape>[ on a <bg> background]

with "an" before "orange" and "a" before anything else (so "a small orange
circle", "an orange circle").

A `PromptSpec` is a prompt in numbers-free form (objects, position, relation,
background); `format_prompt` writes one, `parse_prompt` reads one.
`full_caption(scene)` states everything a scene has; `caption(scene, rng)`
drops each optional part (size word, position phrase, background phrase)
with probability 0.5 for training captions. Dropping only ever removes a
true statement, so every caption stays true of its image.

`parse_prompt` forgives what a person typing a prompt may add: upper case,
extra spaces and one final full stop. Anything else outside the grammar (a
wrong article, a size word in a two-object prompt, an unknown word) is a
ValueError that says what was expected.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np

from latent_diffusion.shapes.world import BACKGROUNDS, OBJECT_COLOURS, POSITIONS, RELATIONS, SHAPES, SIZE_CLASSES, Scene, is_held_out

KEEP_PROBABILITY = 0.5  # chance that caption() keeps each optional part

CATEGORIES: tuple[str, ...] = ("single", "position", "two_objects", "background", "held_out")


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One prompted object: colour, shape, and a size class ("small"/"large") or None when the prompt says none."""

    colour: str
    shape: str
    size: Optional[str] = None

    @property
    def held_out(self) -> bool:
        return is_held_out(self.colour, self.shape)


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for. `relation` reads "objects[0] <relation> objects[1]"; None fields are not asked for."""

    objects: tuple[ObjectSpec, ...]
    position: Optional[str] = None
    relation: Optional[str] = None
    background: Optional[str] = None

    @property
    def held_out(self) -> bool:
        return any(o.held_out for o in self.objects)

    @property
    def categories(self) -> tuple[str, ...]:
        """Every scoring category the prompt belongs to, in CATEGORIES order."""
        member = {
            "single": len(self.objects) == 1,
            "position": self.position is not None,
            "two_objects": self.relation is not None,
            "background": self.background is not None,
            "held_out": self.held_out,
        }
        return tuple(name for name in CATEGORIES if member[name])


# ---------------------------------------------------------------- writing


def _article(next_word: str) -> str:
    return "an" if next_word == "orange" else "a"


def _object_words(obj: ObjectSpec) -> str:
    words = ([obj.size] if obj.size else []) + [obj.colour, obj.shape]
    return " ".join([_article(words[0])] + words)


def format_prompt(spec: PromptSpec) -> str:
    """The caption text of a PromptSpec, in the spec's grammar."""
    text = _object_words(spec.objects[0])
    if spec.relation is not None:
        text += f" {spec.relation} {_object_words(spec.objects[1])}"
    if spec.position is not None:
        text += f" {spec.position}"
    if spec.background is not None:
        text += f" on a {spec.background} background"
    return text


def spec_from_scene(scene: Scene) -> PromptSpec:
    """Everything the scene states: objects (with size class where it has one), position, relation, background."""
    objects = tuple(ObjectSpec(o.colour, o.shape, o.size) for o in scene.objects)
    return PromptSpec(objects, scene.position, scene.relation, scene.background)


def drop_optional_parts(spec: PromptSpec, rng: np.random.Generator, keep_probability: float = KEEP_PROBABILITY) -> PromptSpec:
    """Drop the size word, position phrase and background phrase, each independently with 1 - keep_probability."""

    def keep(value):
        return value if value is not None and rng.random() < keep_probability else None

    objects = tuple(dataclasses.replace(o, size=keep(o.size)) for o in spec.objects)
    return PromptSpec(objects, keep(spec.position), spec.relation, keep(spec.background))


def full_caption(scene: Scene) -> str:
    """The caption that keeps every optional part the scene has."""
    return format_prompt(spec_from_scene(scene))


def caption(scene: Scene, rng: np.random.Generator, drop_optional: bool = True) -> str:
    """A training caption: with drop_optional, each optional part is dropped with probability 0.5; true of the image either way."""
    spec = spec_from_scene(scene)
    if drop_optional:
        spec = drop_optional_parts(spec, rng)
    return format_prompt(spec)


# ---------------------------------------------------------------- reading


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in words)


_OBJECT = r"(?P<art{i}>a|an) (?:(?P<size{i}>{sizes}) )?(?P<colour{i}>{colours}) (?P<shape{i}>{shapes})"
_BACKGROUND = rf"(?: on a (?P<background>{_alternatives(BACKGROUNDS)}) background)?"


def _object_pattern(i: int) -> str:
    return _OBJECT.format(
        i=i, sizes=_alternatives(SIZE_CLASSES), colours=_alternatives(OBJECT_COLOURS), shapes=_alternatives(SHAPES)
    )


_SINGLE_RE = re.compile(rf"{_object_pattern(0)}(?: (?P<position>{_alternatives(POSITIONS)}))?{_BACKGROUND}")
_TWO_RE = re.compile(rf"{_object_pattern(0)} (?P<relation>{_alternatives(RELATIONS)}) {_object_pattern(1)}{_BACKGROUND}")


def _normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding space and no final full stop."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def _object_from_match(match: re.Match, i: int, text: str) -> ObjectSpec:
    size, colour = match[f"size{i}"], match[f"colour{i}"]
    expected = _article(size or colour)
    if match[f"art{i}"] != expected:
        raise ValueError(f"prompt {text!r}: use {expected!r} before {(size or colour)!r}")
    return ObjectSpec(colour, match[f"shape{i}"], size)


def parse_prompt(text: str) -> PromptSpec:
    """Read a prompt in the Shapes grammar into a PromptSpec; ValueError (naming the grammar) for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str; got {type(text).__name__}")
    norm = _normalise(text)
    match = _SINGLE_RE.fullmatch(norm)
    if match:
        return PromptSpec((_object_from_match(match, 0, text),), match["position"], None, match["background"])
    match = _TWO_RE.fullmatch(norm)
    if match:
        if match["size0"] or match["size1"]:
            raise ValueError(f"prompt {text!r}: two-object prompts take no size word")
        objects = (_object_from_match(match, 0, text), _object_from_match(match, 1, text))
        return PromptSpec(objects, None, match["relation"], match["background"])
    raise ValueError(
        f"prompt {text!r} is outside the Shapes grammar: 'a[n] [small |large ]<colour> <shape>[ <position>]"
        f"[ on a <bg> background]' or 'a[n] <colour> <shape> <relation> a[n] <colour> <shape>[ on a <bg> background]'"
        f" with colours {OBJECT_COLOURS}, shapes {SHAPES}, positions {tuple(POSITIONS)},"
        f" relations {tuple(RELATIONS)}, backgrounds {BACKGROUNDS}"
    )
