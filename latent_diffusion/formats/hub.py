"""The Hub side: model cards and uploads of model folders and checkpoint weights.

    write_model_card(folder, ...)                       folder/README.md: Hub metadata (YAML) + a readable body
    push_folder(folder, repo_id, ...)                   create the repo if needed, upload the model files
    push_checkpoint_weights(checkpoint_dir, repo_id, step, ...)   weights of checkpoint-N -> checkpoints/step-N/

Uploads go through `huggingface_hub.HfApi` (`create_repo(exist_ok=True)`, then
`upload_folder`). What is uploaded is decided by two pattern lists, applied to
paths relative to the folder with `fnmatch` rules (`*` also crosses `/`):
`MODEL_FILE_PATTERNS` lets through what a diffusers model folder is made of
(configs, safetensors weights, tokenizer files, the card and its images), and
`TRAINING_STATE_PATTERNS` then drops training state (optimizer, LR scheduler,
RNG, AMP scaler, any pickle or `.bin`/`.pt` file) and the run folders that
`training/train_text2img.py` writes next to the model (`checkpoint-N/`,
`latent_cache/`, `logs/`, `validation/`). Weights are uploaded as
safetensors only; optimizer state never leaves the machine.

A model card's metadata names `base_model` and `datasets` only when they are Hub
ids: a local path there would make the Hub reject the README, so local paths
are named in the card's body instead.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from latent_diffusion.formats.atomic import atomic_write

PathLike = Union[str, os.PathLike]

# What a diffusers model folder is made of (tokenizers bring merges.txt / vocab.json / spiece.model).
MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "*.json", "*.safetensors", "*.txt", "*.model", "*.md", "*.png", "*.jpg", "*.jpeg", "*.webp", ".gitattributes",
)
# Training state and training-run folders: never uploaded with a model.
TRAINING_STATE_PATTERNS: tuple[str, ...] = (
    "optimizer*", "*/optimizer*", "scheduler.bin", "*/scheduler.bin", "random_states*", "*/random_states*",
    "scaler.pt", "*/scaler.pt", "training_state.json", "*/training_state.json",
    "*.pkl", "*.pickle", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.tmp",
    "checkpoint-*", ".checkpoint-*", "latent_cache/*", "logs/*", "validation/*",
)
DEFAULT_IGNORE_PATTERNS = TRAINING_STATE_PATTERNS
# From a training checkpoint: its weights and configs only.
CHECKPOINT_FILE_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.json")

CARD_TAGS = ("stable-diffusion", "text-to-image", "latent-diffusion", "diffusers")
GRID_NAME = "validation_grid"


# ----------------------------------------------------------------------------- argument checks


def _existing_folder(path: PathLike, argument: str) -> Path:
    """`path` as a Path; ValueError naming `argument` when it is not an existing folder."""
    if path is None or not os.path.isdir(path):
        raise ValueError(f"{argument}={str(path)!r} is not an existing folder")
    return Path(path)


def _checked_repo_id(repo_id: str) -> str:
    """`repo_id` when it is a valid Hub id ("name" or "namespace/name"); a ValueError naming it otherwise."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repo id ('namespace/name'): {err}") from None
    return repo_id


def _checked_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative integer")
    return step


def _hub_id_or_none(value: Optional[str]) -> Optional[str]:
    """`value` when it reads as a Hub repo id and is not a local path; None otherwise."""
    if not value or os.path.exists(value):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


# ----------------------------------------------------------------------------- model card


def write_model_card(
    folder: PathLike,
    *,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
    tags: Iterable[str] = (),
    hyperparameters: Optional[Mapping[str, Any]] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    validation_grid: Optional[PathLike] = None,
    prompts: Sequence[str] = (),
    description: str = "",
    license: str = "apache-2.0",
    model_id: Optional[str] = None,
) -> str:
    """Write `folder/README.md`: Hub metadata in YAML front matter, then what the model is and how to use it.

    `validation_grid` (an image file) is copied into the folder and shown with its `prompts`;
    `model_id` (a Hub id or path) is what the usage snippets load, the folder's name by default.
    Returns the README's path.
    """
    folder = _existing_folder(folder, "folder")
    tags, prompts = _as_list(tags), _as_list(prompts)  # a lone string is one tag / one prompt
    grid_name = _copy_grid(folder, validation_grid) if validation_grid is not None else None
    data = card_metadata(base_model=base_model, dataset=dataset, tags=tags, license=license, prompts=prompts)
    body = card_body(
        model_id or folder.resolve().name, folder, base_model=base_model, dataset=dataset,
        hyperparameters=hyperparameters or {}, metrics=metrics or {}, grid_name=grid_name,
        prompts=prompts, description=description,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = folder / "README.md"
    with atomic_write(path) as tmp:
        card.save(tmp)
    return str(path)


def card_metadata(*, base_model: Optional[str], dataset: Optional[str], tags: Iterable[str], license: str,
                  prompts: Sequence[str] = ()) -> ModelCardData:
    """The YAML front matter: license, library, pipeline tag, tags, base model and dataset (Hub ids only)."""
    hub_dataset = _hub_id_or_none(dataset)
    return ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=list(dict.fromkeys([*CARD_TAGS, *tags])),
        base_model=_hub_id_or_none(base_model),
        datasets=[hub_dataset] if hub_dataset else None,
        inference=True,
        widget=[{"text": prompt} for prompt in prompts] or None,
    )


def card_body(model_id: str, folder: Path, *, base_model: Optional[str], dataset: Optional[str],
              hyperparameters: Mapping[str, Any], metrics: Mapping[str, Any], grid_name: Optional[str],
              prompts: Sequence[str], description: str) -> str:
    """The card's Markdown: title, what it is, components, usage, validation grid, hyperparameters, metrics."""
    sections = [
        f"# {model_id}",
        _about_section(base_model, dataset, description),
        _components_section(folder),
        _usage_section(model_id, prompts[0] if prompts else "a red circle above a blue square"),
        _grid_section(grid_name, prompts) if grid_name else "",
        _table_section("Training hyperparameters", "Hyperparameter", hyperparameters),
        _table_section("Metrics", "Metric", metrics),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _about_section(base_model: Optional[str], dataset: Optional[str], description: str) -> str:
    parts = [
        "A latent text-to-image diffusion model in the Stable Diffusion format: a frozen text encoder turns the "
        "prompt into embeddings, a UNet with cross-attention denoises in the latent space of a VAE, and the VAE "
        "decoder turns the final latent into an image. The noise schedule is in `scheduler/scheduler_config.json`.",
        description,
    ]
    facts = [f"- Base model: {_link_if_hub(base_model)}" if base_model else "",
             f"- Training data: {_link_if_hub(dataset, 'datasets/')}" if dataset else ""]
    parts.append("\n".join(f for f in facts if f))
    return "\n\n".join(p for p in parts if p)


def _link_if_hub(value: str, prefix: str = "") -> str:
    hub_id = _hub_id_or_none(value)
    return f"[{hub_id}](https://huggingface.co/{prefix}{hub_id})" if hub_id else f"`{value}` (local)"


def _components_section(folder: Path) -> str:
    """A table of the pipeline's components, read from model_index.json (empty when the folder has none)."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        return ""
    index = json.loads(index_path.read_text())
    rows = {name: ".".join(str(p) for p in spec) for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and None not in spec}
    return _table_section("Components", "Component", rows, value_header="Class")


def _usage_section(model_id: str, prompt: str) -> str:
    from latent_diffusion.settings import FALLBACK_DEFAULTS

    steps, scale, sampler = (FALLBACK_DEFAULTS[k] for k in ("num_inference_steps", "guidance_scale", "sampler"))
    return f"""## How to use

With `latent_diffusion`:

```python
import torch
from latent_diffusion import LatentDiffusionPipeline

pipe = LatentDiffusionPipeline.from_pretrained("{model_id}")
image = pipe({json.dumps(prompt)}, num_inference_steps={steps}, guidance_scale={scale}, sampler="{sampler}",
             generator=torch.Generator().manual_seed(0)).images[0]
image.save("image.png")
```

With diffusers:

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{model_id}", safety_checker=None)
image = pipe({json.dumps(prompt)}, num_inference_steps={steps}, guidance_scale={scale}).images[0]
```"""


def _grid_section(grid_name: str, prompts: Sequence[str]) -> str:
    lines = ["## Validation samples", "", f"![validation grid]({grid_name})"]
    if prompts:
        lines += ["", "Prompts, left to right and top to bottom:", ""]
        lines += [f"{i}. {_cell(p)}" for i, p in enumerate(prompts, start=1)]
    return "\n".join(lines)


def _table_section(title: str, key_header: str, values: Mapping[str, Any], value_header: str = "Value") -> str:
    if not values:
        return ""
    rows = [f"| {key_header} | {value_header} |", "|---|---|"]
    rows += [f"| {_cell(key)} | {_cell(value)} |" for key, value in values.items()]
    return f"## {title}\n\n" + "\n".join(rows)


def _cell(value: Any) -> str:
    """A value as one Markdown table cell: short floats, lists joined, pipes escaped, one line."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _copy_grid(folder: Path, validation_grid: PathLike) -> str:
    """Copy the grid image into `folder` as validation_grid.<ext> (unless it is that file); return its name."""
    source = Path(validation_grid)
    if not source.is_file():
        raise ValueError(f"validation_grid={str(validation_grid)!r} is not an existing image file")
    name = GRID_NAME + (source.suffix.lower() or ".png")
    target = folder / name
    if not (target.exists() and os.path.samefile(source, target)):
        shutil.copyfile(source, target)
    return name


# ----------------------------------------------------------------------------- uploads


def select_upload_files(folder: PathLike, allow_patterns: Optional[Sequence[str]] = MODEL_FILE_PATTERNS,
                        ignore_patterns: Optional[Sequence[str]] = DEFAULT_IGNORE_PATTERNS) -> list[str]:
    """The relative paths (with `/`) under `folder` that an upload with these patterns sends, sorted."""
    folder = _existing_folder(folder, "folder")
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, allow_patterns=_as_list(allow_patterns),
                                    ignore_patterns=_as_list(ignore_patterns)))


def _as_list(items: Optional[Iterable[str]]) -> Optional[list[str]]:
    """None stays None; a lone string becomes a one-item list."""
    if items is None:
        return None
    return [items] if isinstance(items, str) else list(items)


def push_folder(
    folder: PathLike,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: str = "Upload model with latent_diffusion",
    path_in_repo: Optional[str] = None,
    allow_patterns: Optional[Sequence[str]] = MODEL_FILE_PATTERNS,
    ignore_patterns: Optional[Sequence[str]] = DEFAULT_IGNORE_PATTERNS,
    revision: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> str:
    """Create `repo_id` if needed and upload the model files of `folder` in one commit; return the commit URL.

    `allow_patterns` / `ignore_patterns` choose the files (see the module docstring; None lets all
    through); `revision` is a branch, created from main when missing; `endpoint` overrides the Hub URL.
    """
    folder = _existing_folder(folder, "folder")
    _checked_repo_id(repo_id)
    if not select_upload_files(folder, allow_patterns, ignore_patterns):
        raise ValueError(f"folder={str(folder)!r} has no files to upload with allow_patterns={allow_patterns} "
                         f"and ignore_patterns={ignore_patterns}")
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = _ensure_repo(api, repo_id, private=private, revision=revision)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=folder, path_in_repo=path_in_repo, commit_message=commit_message,
        revision=revision, allow_patterns=_as_list(allow_patterns), ignore_patterns=_as_list(ignore_patterns),
    )
    return info.commit_url


def _ensure_repo(api: HfApi, repo_id: str, *, private: bool, revision: Optional[str]) -> str:
    """Create the model repo (no-op when it exists) and the branch `revision` (when not main).

    Returns the full "namespace/name" id (a bare "name" lives under the token's user).
    """
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return repo_id


def push_checkpoint_weights(
    checkpoint_dir: PathLike,
    repo_id: str,
    step: int,
    *,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> str:
    """Upload the safetensors weights and configs of a training checkpoint to `checkpoints/step-<step>/`.

    Optimizer, LR-scheduler, RNG and scaler state and `training_state.json` stay local.
    Returns the commit URL.
    """
    checkpoint_dir = _existing_folder(checkpoint_dir, "checkpoint_dir")
    _checked_step(step)
    if not any(name.endswith(".safetensors") for name in select_upload_files(checkpoint_dir, CHECKPOINT_FILE_PATTERNS)):
        raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} holds no .safetensors weights")
    return push_folder(
        checkpoint_dir, repo_id, token=token, private=private,
        commit_message=commit_message or f"Checkpoint weights at step {step}",
        path_in_repo=f"checkpoints/step-{step}", allow_patterns=CHECKPOINT_FILE_PATTERNS,
        ignore_patterns=DEFAULT_IGNORE_PATTERNS, revision=revision, endpoint=endpoint,
    )
