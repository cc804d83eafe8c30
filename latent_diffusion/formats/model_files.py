"""Checks on a model path before anything is loaded from it: it exists, is complete, and holds safetensors only.

diffusers and transformers fall back to `torch.load` (unpickling) when a folder has only `.bin`/`.ckpt`
weights, and a truncated `.safetensors` file fails deep inside them with an error that names neither the
file nor the fix. `check_model_path` looks first: it reads only safetensors headers (never tensor data,
never a pickle), so it costs milliseconds even for large models.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path
from typing import Sequence, Union

from latent_diffusion.formats.assets import missing_components

WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the last: SDXL only
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ARGUMENT = "pretrained_model_name_or_path"


def looks_like_local_path(path: str) -> bool:
    """True for what can only be a path (absolute, ./, ~, or deeper than the one slash of a Hub id)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def check_model_path(path: Union[str, os.PathLike], argument: str = ARGUMENT,
                     components: Sequence[str] = WEIGHT_COMPONENTS) -> None:
    """ValueError naming `argument` when `path` is empty, missing, incomplete, pickle-only or truncated.

    A string that may be a Hub id ("user/model") and is not a local folder is left to the Hub client.
    """
    text = os.fspath(path)
    if not text.strip():
        raise ValueError(f"{argument} must be a diffusers folder or a Hub id, got {text!r}")
    folder = Path(text).expanduser()
    try:
        folder.stat()
    except OSError as error:  # ENAMETOOLONG, EACCES, ELOOP, ...: Path.exists() lets some of these out
        if error.errno != errno.ENOENT:
            raise ValueError(f"{argument} {text[:200]!r} cannot be opened ({error.strerror})") from None
    if not folder.exists():
        if looks_like_local_path(text):
            raise ValueError(f"{argument} {text!r} does not exist (give a diffusers folder or a Hub id)")
        return
    if not folder.is_dir():
        from latent_diffusion.formats.single_file import check_single_file

        check_single_file(folder, argument)  # a single-file checkpoint: .safetensors, whole; pickles refused
        return
    if (folder / "model_index.json").is_file():  # before missing_components reads it
        check_json_files(folder, f"{argument} {text!r}:")
    missing = missing_components(folder)
    if missing:
        raise ValueError(f"{argument} {text!r} is missing {missing}; a diffusers text-to-image folder "
                         "holds model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/")
    for name in components:
        if (folder / name).is_dir():  # missing_components has checked that every one the folder needs is there
            check_weights_folder(folder / name, f"{argument} {text!r}: {name}/")
    check_network_configs(folder, f"{argument} {text!r}:")


def check_json_files(folder: Path, label: str) -> None:
    """Every .json file of the folder and its component folders parses to a JSON object; errors name the file."""
    for path in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        where = f"{label} {path.relative_to(folder).as_posix()}"
        try:
            value = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{where} is not valid JSON ({error})") from None
        except OSError as error:
            raise ValueError(f"{where} cannot be read ({error.strerror})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where} must hold a JSON object, got {type(value).__name__}")


def check_network_configs(folder: Path, label: str) -> None:
    """The UNet's and VAE's sizes and channels are ones a machine could hold (sample_size 10⁶ is refused)."""
    from latent_diffusion.checks import MAX_IMAGE_SIDE
    from latent_diffusion.limits import check_model_config

    for name, max_sample_size in (("unet", MAX_IMAGE_SIDE // 8), ("vae", MAX_IMAGE_SIDE)):
        path = folder / name / "config.json"
        if path.is_file():
            check_model_config(json.loads(path.read_bytes()), f"{label} {name}/config.json", max_sample_size)


def check_weights_folder(folder: Path, label: str) -> None:
    """The component folder holds safetensors weights, each file whole; pickle-only folders are refused."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    if not safetensors:
        pickles = [p.name for p in files if p.name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(f"{label} holds only pickle weights {pickles}; they are never unpickled. Convert them "
                             "to .safetensors (e.g. load and save_pretrained(..., safe_serialization=True) in a "
                             "trusted environment)")
        raise ValueError(f"{label} has no .safetensors weights")
    for path in safetensors:
        check_safetensors_file(path, label)


def check_safetensors_file(path: Path, label: str = "") -> None:
    """The file's size matches its header: 8-byte length, JSON header, then exactly the tensors' bytes."""
    where = f"{label} {path.name}".strip()
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{where} is truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(f"{where} is truncated or not a safetensors file (header of {header_len} bytes, "
                             f"file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{where} is not a safetensors file (unreadable header)") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ValueError(f"{where} is truncated: {size} bytes of the {expected} its header describes; "
                         "download or copy it again")
