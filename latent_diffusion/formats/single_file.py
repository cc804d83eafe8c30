"""Single-file checkpoints (the original Stable Diffusion key layout of civitai, AUTOMATIC1111, ComfyUI, kohya).

Reading: the file's family (SD 1.x, SD 2.x, SDXL; inpainting when the UNet takes 9 channels) comes from its
keys and shapes; its configuration from, in order, a diffusers folder given as `config=`, the configs our
`write_single_file` embeds in the file's metadata, or the released family's configs shipped in
`single_file_configs.json` (never the Hub). The weights are converted by diffusers' own single-file
functions (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`). A released model's file holds no tokenizer: pass `tokenizer=` (and
`tokenizer_2=` for SDXL) or `config=` a folder that has `tokenizer/`.

Writing: `write_single_file` stores the UNet, VAE and text encoder(s) under their original names
(`ldm_layout`), with `modelspec.*` metadata and our configs and tokenizer files as JSON metadata, so the
file reads back alone.
"""
from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from latent_diffusion.formats import ldm_layout
from latent_diffusion.formats.model_files import PICKLE_SUFFIXES, check_safetensors_file

FAMILIES = ("sd1", "sd2", "sdxl")
CONFIGS_KEY = "latent_diffusion.configs"
TOKENIZERS_KEY = "latent_diffusion.tokenizers"
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}
PICKLE_HINT = ("pickle checkpoints are never unpickled (they can run code): get the .safetensors release of the "
               "model, or convert it once in a trusted environment (load with torch.load, save with "
               "safetensors.torch.save_file)")
TEXT_ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}

PathLike = Union[str, os.PathLike]


def is_single_file(path: Any) -> bool:
    """True for a path that names a file (not a folder or a Hub id) ending in a weights suffix."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    return text.endswith((".safetensors",) + PICKLE_SUFFIXES) and not Path(text).is_dir()


def check_single_file(path: PathLike, argument: str) -> Path:
    """The file, if it exists, is safetensors and whole; else a ValueError naming `argument`."""
    file = Path(os.fspath(path)).expanduser()
    if file.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{argument} {str(path)!r} is a pickle ({file.suffix}); {PICKLE_HINT}")
    if not file.exists():
        raise ValueError(f"{argument} {str(path)!r} does not exist")
    if not file.is_file() or file.suffix != ".safetensors":
        raise ValueError(f"{argument} {str(path)!r} is a file but not a .safetensors checkpoint; give a diffusers "
                         "folder (model_index.json, unet/, vae/, ...) or a single .safetensors file")
    check_safetensors_file(file, f"{argument} {str(path)!r}:")
    return file


def read_single_file(path: PathLike, argument: str = "pretrained_model_name_or_path"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checked safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = check_single_file(path, argument)
    with safe_open(str(file), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(str(file)), metadata


def detect_family(checkpoint: Mapping[str, torch.Tensor], argument: str = "pretrained_model_name_or_path") -> str:
    """'sd1', 'sd2' or 'sdxl' from the text encoders' keys; ValueError for a file in no layout we know."""
    keys = list(checkpoint)
    has = lambda prefix: any(key.startswith(prefix) for key in keys)  # noqa: E731
    if not has(ldm_layout.UNET_PREFIX) or not has(ldm_layout.VAE_PREFIX):
        raise ValueError(f"{argument}: not a Stable Diffusion checkpoint in the original layout (no "
                         f"{ldm_layout.UNET_PREFIX}* UNet and {ldm_layout.VAE_PREFIX}* VAE keys; first keys: {keys[:3]})")
    if has(ldm_layout.CLIP_PREFIXES["sdxl"]) and has(ldm_layout.OPEN_CLIP_PREFIXES["sdxl"]):
        return "sdxl"
    if has(ldm_layout.OPEN_CLIP_PREFIXES["sd2"]):
        return "sd2"
    if has(ldm_layout.CLIP_PREFIXES["sd1"]):
        return "sd1"
    raise ValueError(f"{argument}: a UNet and VAE but no text encoder we know (SD 1.x cond_stage_model.transformer.*, "
                     "SD 2.x cond_stage_model.model.*, SDXL conditioner.embedders.*)")


def shipped_configs(family: str, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """The released family's configs, the UNet's input channels read from the file (9: inpainting)."""
    table = json.loads(resources.files("latent_diffusion.formats").joinpath("single_file_configs.json").read_text())
    configs = {name: dict(table[value][name] if isinstance(value, str) else value)
               for name, value in table[family].items()}
    conv_in = checkpoint[ldm_layout.UNET_PREFIX + "input_blocks.0.0.weight"]
    configs["unet"]["in_channels"] = int(conv_in.shape[1])
    return configs


def folder_configs(folder: PathLike, family: str) -> dict[str, dict]:
    """The component configs of a diffusers folder (`config=`), as diffusers' from_single_file reads them."""
    root = Path(os.fspath(folder))
    names = ("unet", "vae", "scheduler") + TEXT_ENCODERS[family]
    missing = [name for name in names if not (root / name / ("scheduler_config.json" if name == "scheduler"
                                                               else "config.json")).is_file()]
    if missing:
        raise ValueError(f"config {str(folder)!r} must be a diffusers folder with {list(names)}; it lacks {missing}")
    read = lambda name, file="config.json": json.loads((root / name / file).read_text())  # noqa: E731
    return {name: read(name, "scheduler_config.json" if name == "scheduler" else "config.json") for name in names}


def resolve_configs(family: str, checkpoint: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                    config: Optional[PathLike], prediction_type: Optional[str],
                    image_size: Optional[int]) -> dict[str, dict]:
    """Configs from `config=`, else the file's own, else the family's; prediction type and size as asked."""
    if config is not None:
        configs = folder_configs(config, family)
    elif CONFIGS_KEY in metadata:
        configs = json.loads(metadata[CONFIGS_KEY])
    else:
        configs = shipped_configs(family, checkpoint)
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        configs["scheduler"]["prediction_type"] = prediction_type
    if image_size is not None:  # the UNet's sample size is in latents: the VAE halves the image per level but one
        factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        configs["unet"]["sample_size"] = int(image_size) // factor
    return configs


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Load `state` into `model`; a weight missing, left over or of another shape is a ValueError naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(key for key in set(state) - set(own) if not key.endswith("position_ids"))
    wrong = [key for key in own if key in state and tuple(own[key].shape) != tuple(state[key].shape)]
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the config wants {tuple(own[wrong[0]].shape)}")
        raise ValueError(f"{what} does not fit its configuration ({detail}); pass config= a diffusers folder of "
                         "the same architecture")
    model.load_state_dict({key: state[key] for key in own}, strict=True)
    return model.eval()


def build_unet(checkpoint, config: dict, what: str):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel.from_config(config)
    return load_strict(unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), f"{what}: the UNet")


def build_vae(checkpoint, config: dict, what: str):
    """An AutoencoderKL from LDM keys (prefixed `first_stage_model.`/`vae.`, or bare as in VAE-only files)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = AutoencoderKL.from_config(config)
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in checkpoint):
        state = dict(checkpoint)  # a VAE file already in diffusers' names
    else:
        state = convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    return load_strict(vae, state, f"{what}: the VAE")


def build_text_encoder(checkpoint, config: dict, family: str, name: str, what: str):
    """A transformers CLIP text model from the file's CLIP (transformers names) or OpenCLIP keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with_projection = name == "text_encoder_2"
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(CLIPTextConfig.from_dict(dict(config)))
    if family == "sd1" or (family == "sdxl" and name == "text_encoder"):
        prefix = ldm_layout.CLIP_PREFIXES[family]
        state = convert_ldm_clip_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(prefix)})
    else:
        state = convert_open_clip_checkpoint(model, checkpoint, prefix=ldm_layout.OPEN_CLIP_PREFIXES[family])
        if not with_projection:
            state.pop("text_projection.weight", None)
    if not hasattr(model, "text_model"):  # transformers ≥ 5.6 flattened CLIPTextModel
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    return load_strict(model, state, f"{what}: {name}")


def build_scheduler(config: dict):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name") or "DDIMScheduler", diffusers.DDIMScheduler)
    return cls.from_config(config)


def tokenizers_for(family: str, metadata: Mapping[str, str], config: Optional[PathLike],
                   given: Mapping[str, Any], what: str) -> dict[str, Any]:
    """tokenizer (and tokenizer_2): given, else from `config=`'s folder, else the file's own; else ValueError."""
    from transformers import CLIPTokenizer

    names = ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])
    embedded = json.loads(metadata.get(TOKENIZERS_KEY, "{}"))
    found = {}
    for name in names:
        if given.get(name) is not None:
            found[name] = given[name]
        elif config is not None and (Path(os.fspath(config)) / name).is_dir():
            found[name] = CLIPTokenizer.from_pretrained(Path(os.fspath(config)) / name)
        elif name in embedded:
            found[name] = tokenizer_from_files(embedded[name])
        else:
            raise ValueError(f"{what} holds no {name} (released checkpoints never do): pass {name}= a CLIP tokenizer, "
                             "or config= a diffusers folder of the same family that has tokenizer/ (e.g. a copy of "
                             "stable-diffusion-v1-5's configs and tokenizer, without weights)")
    return found


def tokenizer_from_files(files: Mapping[str, str]):
    """A CLIPTokenizer from the {file name: text} that `tokenizer_files` embedded."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / Path(name).name).write_text(text)
        return CLIPTokenizer.from_pretrained(folder)


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The text files `save_pretrained` writes for `tokenizer`, by name."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_text() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def load_single_file(path: PathLike, *, config: Optional[PathLike] = None, prediction_type: Optional[str] = None,
                     image_size: Optional[int] = None, argument: str = "pretrained_model_name_or_path",
                     **given: Any) -> dict[str, Any]:
    """The pipeline components (unet, vae, text_encoder[_2], tokenizer[_2], scheduler) of a single file.

    `given` components (e.g. tokenizer=..., vae=...) are used as they are instead of the file's.
    """
    checkpoint, metadata = read_single_file(path, argument)
    family = detect_family(checkpoint, f"{argument} {os.fspath(path)!r}")
    configs = resolve_configs(family, checkpoint, metadata, config, prediction_type, image_size)
    what = f"{argument} {os.fspath(path)!r}"
    parts: dict[str, Any] = {"family": family, **tokenizers_for(family, metadata, config, given, what)}  # cheap: first
    parts["unet"] = given.get("unet") or build_unet(checkpoint, configs["unet"], what)
    parts["vae"] = given.get("vae") or build_vae(checkpoint, configs["vae"], what)
    for name in TEXT_ENCODERS[family]:
        parts[name] = given.get(name) or build_text_encoder(checkpoint, configs[name], family, name, what)
    parts["scheduler"] = given.get("scheduler") or build_scheduler(configs["scheduler"])
    return parts


def load_vae_file(path: PathLike, config: Mapping[str, Any], argument: str = "vae"):
    """An AutoencoderKL from a VAE-only (or whole-model) single file, in the architecture `config` describes."""
    checkpoint, _ = read_single_file(path, argument)
    return build_vae(checkpoint, dict(config), f"{argument} {os.fspath(path)!r}")


def family_of(components: Mapping[str, Any]) -> str:
    """'sdxl' with a second text encoder; 'sd2' for an OpenCLIP-style (GELU) encoder; else 'sd1'."""
    if components.get("text_encoder_2") is not None:
        return "sdxl"
    return "sd2" if components["text_encoder"].config.hidden_act == "gelu" else "sd1"


def single_file_state(components: Mapping[str, Any], family: str) -> dict[str, torch.Tensor]:
    """All weights of the components under their original names."""
    unet, vae = components["unet"], components["vae"]
    state = ldm_layout.unet_to_ldm(unet.state_dict(), unet.config)
    state.update(ldm_layout.vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    encoder = components["text_encoder"].state_dict()
    if family == "sd2":
        state.update(ldm_layout.open_clip_to_ldm(encoder, ldm_layout.OPEN_CLIP_PREFIXES["sd2"]))
    else:
        state.update(ldm_layout.clip_to_ldm(encoder, ldm_layout.CLIP_PREFIXES[family]))
    if family == "sdxl":
        state.update(ldm_layout.open_clip_to_ldm(components["text_encoder_2"].state_dict(),
                                                 ldm_layout.OPEN_CLIP_PREFIXES["sdxl"]))
    return state


def single_file_metadata(components: Mapping[str, Any], family: str, extra: Optional[Mapping[str, str]]) -> dict[str, str]:
    """modelspec fields (read by A1111, ComfyUI, kohya), our configs and tokenizer files, and `extra`."""
    configs = {name: json.loads(components[name].to_json_string()) for name in ("unet", "vae", "scheduler")}
    configs.update({name: components[name].config.to_dict() for name in TEXT_ENCODERS[family]})
    tokenizers = {name: tokenizer_files(components[name]) for name in ("tokenizer", "tokenizer_2")
                  if components.get(name) is not None}
    prediction = components["scheduler"].config.get("prediction_type", "epsilon")
    metadata = {"modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": ARCHITECTURES[family] + ("-v" if prediction == "v_prediction" else ""),
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.prediction_type": prediction,
                CONFIGS_KEY: json.dumps(configs), TOKENIZERS_KEY: json.dumps(tokenizers)}
    metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
    return metadata


def write_single_file(components: Mapping[str, Any], path: PathLike, dtype: Optional[torch.dtype] = torch.float16,
                      metadata: Optional[Mapping[str, str]] = None, family: Optional[str] = None) -> Path:
    """Write the model as one safetensors file in the original layout; `dtype` None keeps the weights' own."""
    from safetensors.torch import save_file

    from latent_diffusion.formats.atomic import atomic_write

    family = family or family_of(components)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    state = single_file_state(components, family)
    state = {key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value)
             .detach().cpu().contiguous() for key, value in state.items()}
    target = Path(os.fspath(path))
    if target.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(path)!r}")
    with atomic_write(target) as temporary:
        save_file(state, str(temporary), metadata=single_file_metadata(components, family, metadata))
    return target
