"""Settings from a ComfyUI PNG's `prompt` chunk (its API graph), when the graph is plain text-to-image.

A plain graph is the default workflow: CheckpointLoaderSimple -> CLIPTextEncode (positive, negative,
text typed in) -> KSampler (denoise 1) on an EmptyLatentImage -> VAEDecode -> SaveImage / PreviewImage,
optionally with CLIPSetLastLayer (clip skip). Anything else (LoRA loaders, img2img, upscalers, several
samplers, text coming from other nodes) is refused with one line naming what is refused: its image could
not be remade from settings alone. ComfyUI's checkpoint is not loaded (the model is the caller's), and
ComfyUI weighs `(word:1.2)` without A1111's mean restoration, so images match only where prompts are plain.
"""
from __future__ import annotations

import json
from typing import Any

from latent_diffusion.settings import GenerationSettings

PLAIN_NODES = ("CheckpointLoaderSimple", "CLIPTextEncode", "CLIPSetLastLayer", "EmptyLatentImage", "KSampler",
               "VAEDecode", "SaveImage", "PreviewImage")
COMFY_SAMPLERS = {"dpmpp_2m": "dpm++", "dpmpp_2m_sde": "dpm++_sde", "uni_pc": "unipc", "euler": "euler",
                  "euler_ancestral": "euler_a", "heun": "heun", "ddim": "ddim", "ddpm": "ddpm", "lcm": "lcm",
                  "tcd": "tcd"}
COMFY_SCHEDULERS = {"normal": None, "karras": "karras", "exponential": "exponential"}


def is_comfy_graph(text: str) -> bool:
    """Whether a PNG `prompt` chunk is a ComfyUI graph (JSON of nodes with class_type), not a prompt."""
    try:
        graph = json.loads(text)
    except ValueError:
        return False
    return isinstance(graph, dict) and bool(graph) and all(isinstance(n, dict) and "class_type" in n
                                                           for n in graph.values())


def settings_from_comfy_graph(text: str) -> GenerationSettings:
    """The settings of a plain ComfyUI text-to-image graph; ValueError (argument `png`) naming what is refused."""
    graph = json.loads(text)
    others = sorted({node["class_type"] for node in graph.values()} - set(PLAIN_NODES))
    if others:
        raise ValueError(f"png: ComfyUI graph with {', '.join(others)} refused: only plain text-to-image graphs "
                         f"({', '.join(PLAIN_NODES)}) are read")
    samplers = [node["inputs"] for node in graph.values() if node["class_type"] == "KSampler"]
    if len(samplers) != 1:
        raise ValueError(f"png: ComfyUI graph with {len(samplers)} KSamplers refused: a plain graph has one")
    k = samplers[0]
    if float(k.get("denoise", 1.0)) != 1.0:
        raise ValueError(f"png: ComfyUI KSampler with denoise {k['denoise']} refused: text-to-image has denoise 1")
    for name, table in (("sampler_name", COMFY_SAMPLERS), ("scheduler", COMFY_SCHEDULERS)):
        if k[name] not in table:
            raise ValueError(f"png: ComfyUI {name} {k[name]!r} refused (known: {', '.join(table)})")
    latent = _linked(graph, k["latent_image"], "latent_image")["inputs"]
    layer = [node["inputs"]["stop_at_clip_layer"] for node in graph.values()
             if node["class_type"] == "CLIPSetLastLayer"]
    return GenerationSettings(
        prompt=_text(graph, k["positive"], "positive"), negative_prompt=_text(graph, k["negative"], "negative") or None,
        steps=int(k["steps"]), guidance=float(k["cfg"]), sampler=COMFY_SAMPLERS[k["sampler_name"]],
        sigma_schedule=COMFY_SCHEDULERS[k["scheduler"]], seed=int(k["seed"]), height=int(latent["height"]),
        width=int(latent["width"]), clip_skip=-int(layer[0]) - 1 if layer and int(layer[0]) < -1 else None)


def _linked(graph: dict[str, Any], link: Any, name: str) -> dict[str, Any]:
    """The node a KSampler input links to ([node id, output index])."""
    if not (isinstance(link, list) and link and str(link[0]) in graph):
        raise ValueError(f"png: ComfyUI KSampler's {name} is not linked to a node of the graph")
    return graph[str(link[0])]


def _text(graph: dict[str, Any], link: Any, name: str) -> str:
    node = _linked(graph, link, name)
    text = node["inputs"].get("text")
    if node["class_type"] != "CLIPTextEncode" or not isinstance(text, str):
        raise ValueError(f"png: ComfyUI {name} prompt refused: it is not text typed into a CLIPTextEncode node")
    return text
