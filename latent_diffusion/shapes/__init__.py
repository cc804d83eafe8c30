"""The Shapes world: seeded (image, caption) data for the embedded default model, and a strict scorer.

The contract is `docs/shapes.md`; `world` holds its tables, sampling and
rendering, `captions` its grammar, `dataset` the datasets.Dataset and
streaming forms and the imagefolder export, `scorer` the detector and judge,
`prompts` the evaluation prompt sets.
"""
from latent_diffusion.shapes.captions import (
    CATEGORIES,
    ObjectSpec,
    PromptSpec,
    caption,
    format_prompt,
    full_caption,
    parse_prompt,
    spec_from_scene,
)
from latent_diffusion.shapes.dataset import export_imagefolder, shapes_dataset, shapes_stream
from latent_diffusion.shapes.prompts import evaluation_prompts
from latent_diffusion.shapes.scorer import (
    Detection,
    DetectedObject,
    Judgement,
    detect_objects,
    format_report,
    judge,
    judge_detection,
    score_images,
)
from latent_diffusion.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    OBJECT_COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZE_CLASSES,
    Scene,
    SceneObject,
    render,
    render_array,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS", "CATEGORIES", "COLOURS", "HELD_OUT_PAIRS", "OBJECT_COLOURS", "POSITIONS", "RELATIONS",
    "SHAPES", "SIZE_CLASSES",
    "Scene", "SceneObject", "sample_scene", "render", "render_array",
    "ObjectSpec", "PromptSpec", "caption", "full_caption", "format_prompt", "parse_prompt", "spec_from_scene",
    "shapes_dataset", "shapes_stream", "export_imagefolder",
    "Detection", "DetectedObject", "Judgement", "detect_objects", "judge", "judge_detection", "score_images", "format_report",
    "evaluation_prompts",
]
