"""The `latent-diffusion` command line: generate images, export Shapes data, evaluate models.

The outermost layer: it may import the pipeline; heavy imports happen inside
the subcommands so that `--help` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from latent_diffusion.checks import check_finite
from latent_diffusion.control_images import PREPROCESSORS

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-diffusion", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_shapes_export(commands)
    _add_eval(commands)
    _add_serve(commands)
    return parser


def _add_shapes_export(commands) -> None:
    p = commands.add_parser("shapes-export", help="write N captioned Shapes images as an imagefolder (metadata.jsonl)")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=1000, help="number of (image, caption) pairs")
    p.add_argument("--size", type=int, default=64, help="canvas side: a multiple of 8 from 32 to 512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", help="train (no held-out pairs), heldout or all")
    p.add_argument("--full-captions", action="store_true", help="keep every optional caption part")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir")
    p.set_defaults(run=run_shapes_export)


def run_shapes_export(args: argparse.Namespace) -> list[Path]:
    from latent_diffusion.checks import check_int
    from latent_diffusion.shapes import export_imagefolder

    check_int("--n", args.n, 1)
    folder = export_imagefolder(args.out_dir, args.n, size=args.size, seed=args.seed, split=args.split,
                                drop_optional=not args.full_captions, overwrite=args.overwrite)
    return [folder]


def _add_generate(commands) -> None:
    from latent_diffusion.diffusion.samplers import SAMPLER_NAMES, SIGMA_SCHEDULES
    from latent_diffusion.diffusion.sdedit import IMG2IMG_STRENGTH, INPAINT_STRENGTH

    p = commands.add_parser("generate", help="generate images for a prompt")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (optional with --from-png)")
    p.add_argument("--from-png", default=None, metavar="PNG",
                   help="take every setting from a PNG made here, by AUTOMATIC1111 (infotext) or by a plain ComfyUI "
                        "text-to-image graph; the flags given override them")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; with --n K > 1, files NAME-0.png … NAME-(K-1).png")
    p.add_argument("--model", default=None, help="diffusers folder, single .safetensors checkpoint, Hub id, or default-lcm (the embedded model at few steps) (default: the embedded Shapes model, default-20-step)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--sampler", default=None, metavar="NAME",  # checked in check_generate_args, one error format
                   help=f"sampler, one of {', '.join(SAMPLER_NAMES)} (default: the model's)")
    p.add_argument("--sigma-schedule", default=None, choices=SIGMA_SCHEDULES,
                   help="σ schedule of euler, heun, dpm++, dpm++_sde, unipc (default: the scheduler config's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's η; TCD's γ")
    p.add_argument("--clip-skip", type=int, default=None, metavar="K",
                   help="condition on the text encoder's hidden states K layers before the usual one "
                        "(A1111's 'Clip skip: K+1'; prompt and negative prompt alike)")
    p.add_argument("--prompt-syntax", default="a1111", choices=("a1111", "plain"),
                   help="a1111: (emphasis), [less], (text:1.3), BREAK as AUTOMATIC1111 reads them; plain: text as is")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--image", default=None, help="input image (PNG, JPEG…) for image-to-image; its size is the default")
    p.add_argument("--strength", type=float, default=None,
                   help=f"with --image: how much to change it, in (0, 1] (default {IMG2IMG_STRENGTH}; "
                        f"with --mask {INPAINT_STRENGTH})")
    p.add_argument("--mask", default=None, help="with --image: inpainting mask, white = repaint, black = keep")
    p.add_argument("--device", default=None, help="cpu, cuda, mps… (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights' dtype (default: float32; bfloat16/float16 halve memory, fast where the device has them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA adapter (.safetensors file, folder or Hub id; diffusers or kohya layout) and its scale "
                        "(default 1); repeat to combine several")
    _add_single_file_flags(p)
    add_control_flags(p)
    p.set_defaults(run=run_generate)


def _add_single_file_flags(p) -> None:
    """--model-config and --vae: what a single-file --model (original SD layout) may need."""
    p.add_argument("--model-config", default=None, metavar="FOLDER",
                   help="with a .safetensors --model from another tool: a diffusers folder of the same family whose "
                        "configs and tokenizer(s) it uses (released files hold no tokenizer)")
    p.add_argument("--vae", default=None, metavar="FILE",
                   help="replace the model's VAE by this .safetensors VAE (original or diffusers key layout)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="textual-inversion embedding (.safetensors, SD or SDXL) usable as TOKEN in the prompt and "
                        "negative prompt (default token: the file's name); repeatable")


def _load_pipeline(args: argparse.Namespace, **kwargs):
    """The --model pipeline, with --model-config for a single file and --vae replacing its VAE."""
    from latent_diffusion.formats.single_file import is_single_file, load_vae_file
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    single = bool(args.model) and is_single_file(args.model)
    if getattr(args, "model_config", None) is not None:
        if not single:
            raise ValueError("--model-config is for a single-file --model (a .safetensors checkpoint)")
        kwargs["config"] = args.model_config
    if single:
        kwargs["argument"] = "--model"  # errors about the file name the flag
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, **kwargs)
    if getattr(args, "vae", None) is not None:
        vae = load_vae_file(args.vae, pipe.vae.config, "--vae")
        pipe.register_modules(vae=vae.to(pipe.unet.dtype))
    args.loaded_embeddings = [_load_embedding(pipe, spec) for spec in getattr(args, "embedding", [])]
    return pipe


def _load_embedding(pipe, spec: str) -> tuple[str, str]:
    """One --embedding PATH[:TOKEN], as (path, token); the file is checked first so that errors name the flag."""
    from latent_diffusion.pipelines.textual_inversion import parse_embedding_spec, read_embedding_file

    path, token = parse_embedding_spec(spec)
    read_embedding_file(path, "--embedding")
    try:
        pipe.load_textual_inversion(path, token=token)
    except ValueError as error:
        raise ValueError(f"--embedding {spec!r}: {error}") from None
    return path, token or Path(path).stem


def run_generate(args: argparse.Namespace) -> list[Path]:
    import torch

    from latent_diffusion.checks import one_line
    from latent_diffusion.formats.infotext import png_text
    from latent_diffusion.formats.pngmeta import save_png

    if args.from_png is not None:
        _settings_from_png(args)
    check_generate_args(args)  # before the model loads: a typo fails in milliseconds
    settings = generation_settings(args)
    call = opened_pictures(settings, args).pipeline_kwargs()  # --image / --mask read before the model loads, too
    dtype = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    pipe = _load_pipeline(args, **dtype, **control_loading_kwargs(args))
    if args.lora:
        _apply_loras(pipe, args.lora)
    pipe.to(device_of(args))
    pipe.set_progress_bar_config(disable=args.quiet)
    _check_call_memory(pipe, args, call.get("image"))
    images = pipe(**call).images
    records = settings.resolved(pipe).for_images(images)
    try:
        return [save_png(image, path, png_text(record))
                for image, path, record in zip(images, output_paths(args.output, args.n), records)]
    except OSError as error:  # checked up front, but a disk can fill or a folder vanish meanwhile: name the flag
        raise OSError(f"-o/--output {args.output!r}: could not write the image: {one_line(error)}") from None


def opened_pictures(settings, args: argparse.Namespace):
    """`settings` with --image / --mask / --control-image read as pictures, so that an unreadable file's error
    names the flag."""
    from latent_diffusion.settings import open_picture

    controls = tuple(unit.replace(image=open_picture("--control-image", unit.image)) for unit in settings.controls)
    return settings.replace(image=open_picture("--image", args.image), mask=open_picture("--mask", args.mask),
                            controls=controls)


# generate's flags (argparse dests) that are settings, and the GenerationSettings field of those named otherwise
GENERATE_SETTING_FLAGS = ("prompt", "negative_prompt", "steps", "guidance", "guidance_rescale", "sampler",
                          "sigma_schedule", "eta", "seed", "height", "width", "n", "clip_skip", "image", "mask",
                          "strength", "lora", "model", "prompt_syntax", "guess_mode")
SETTING_OF_FLAG = {"lora": "loras"}


def _check_call_memory(pipe, args: argparse.Namespace, image) -> None:
    """The pipeline's memory estimate for all --n images at once, its error naming --n / --height / --width."""
    from latent_diffusion.limits import check_pipeline_call
    from latent_diffusion.pipelines.image_inputs import default_size

    height, width = (args.height, args.width) if image is None else default_size(pipe, image, args.height, args.width)
    height, width = pipe.resolve_size(height, width)
    guidance = pipe.generation_defaults["guidance_scale"] if args.guidance is None else args.guidance
    check_pipeline_call(pipe, [args.prompt], [args.negative_prompt or ""], args.n, height, width, guidance != 1.0,
                        names={"images": "--n", "height": "--height", "width": "--width"})


def _settings_from_png(args: argparse.Namespace) -> None:
    """Fill the flags not given on the command line (`args.given`) from the settings --from-png records."""
    from latent_diffusion.formats.png_settings import settings_from_png

    if not Path(args.from_png).is_file():
        raise FileNotFoundError(f"--from-png: no such file {args.from_png!r}")
    try:
        recorded = settings_from_png(args.from_png)
    except ValueError as error:
        raise ValueError(f"--from-png {args.from_png}: {str(error).removeprefix('png: ')}") from None
    for dest in GENERATE_SETTING_FLAGS:
        if dest not in getattr(args, "given", ()):
            value = getattr(recorded, SETTING_OF_FLAG.get(dest, dest))
            setattr(args, dest, list(value) if dest == "lora" else value)
    controls_from_png(args, recorded, args.from_png)


def generation_settings(args: argparse.Namespace):
    """The `generate` flags as the library's GenerationSettings."""
    from latent_diffusion.settings import GenerationSettings

    return GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        guidance_rescale=args.guidance_rescale, sampler=args.sampler, sigma_schedule=args.sigma_schedule,
        eta=args.eta, seed=args.seed, height=args.height, width=args.width, n=args.n, clip_skip=args.clip_skip,
        image=args.image, mask=args.mask, strength=args.strength, loras=tuple(args.lora), model=args.model,
        prompt_syntax=args.prompt_syntax, controls=control_units(args), guess_mode=args.guess_mode)


def _check_image_flags(args: argparse.Namespace) -> None:
    """--mask and --strength need --image; the files must exist. Errors name the flag."""
    if args.image is None:
        for flag, value in (("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                raise ValueError(f"{flag} needs --image (the picture to edit)")
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: no such file {path!r}")


def check_generate_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for values no model could take (the model checks sizes against itself)."""
    from latent_diffusion.checks import MAX_IMAGE_SIDE, check_choice, check_finite, check_int
    from latent_diffusion.diffusion.samplers import SAMPLER_NAMES
    from latent_diffusion.limits import MAX_IMAGES_PER_CALL, check_prompt_length

    if args.prompt is None:
        raise ValueError("prompt: give a prompt, or --from-png PNG to take it from an image")
    check_prompt_length("prompt", [args.prompt])
    check_prompt_length("--negative-prompt", [args.negative_prompt or ""])
    check_int("--n", args.n, 1)
    check_int("--n", args.n, 1, MAX_IMAGES_PER_CALL)
    check_finite("--guidance-rescale", args.guidance_rescale, 0, 1)
    check_finite("--eta", args.eta, 0)
    if args.steps is not None:
        check_int("--steps", args.steps, 1)
    if args.guidance is not None:
        check_finite("--guidance", args.guidance, 0)
    if args.sampler is not None:
        check_choice("--sampler", args.sampler, SAMPLER_NAMES)
    if args.strength is not None:
        check_finite("--strength", args.strength, 0, 1)
    _check_image_flags(args)
    check_control_flags(args)
    for flag, side in (("--height", args.height), ("--width", args.width)):
        if side is not None:
            check_int(flag, side, 1, MAX_IMAGE_SIDE)
    if args.model is not None:
        from latent_diffusion.formats.model_files import check_model_path

        check_model_path(args.model, "--model")
    check_int("--seed", args.seed, 0, 2 ** 64 - args.n)  # image k uses seed + k: all must be valid torch seeds
    check_output_path(args.output)
    device_of(args)  # a device this machine lacks fails before the model loads


def device_of(args: argparse.Namespace) -> str:
    """--device, checked (ValueError naming it), or cuda when available, else cpu."""
    import torch

    from latent_diffusion.checks import check_device

    if args.device is not None:
        return str(check_device("--device", args.device))
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_output_path(output: str) -> None:
    """ValueError naming -o/--output for a path that cannot take a PNG: a folder, another format, no write access."""
    path, folder = Path(output), Path(output).parent
    if not folder.is_dir():
        raise ValueError(f"-o/--output {output!r}: folder {str(folder)!r} does not exist (create it first)")
    if path.is_dir():
        raise ValueError(f"-o/--output {output!r} is a folder; give a file name ending in .png")
    if path.suffix and path.suffix.lower() != ".png":
        raise ValueError(f"-o/--output {output!r}: images are written as PNG (with the settings in its text "
                         f"chunks); give a name ending in .png, not {path.suffix!r}")
    from latent_diffusion.formats.atomic import cannot_create_files_in

    if not os.access(folder, os.W_OK):
        raise ValueError(f"-o/--output {output!r}: folder {str(folder)!r} is not writable")
    reason = cannot_create_files_in(str(folder))  # os.access says yes to root in /proc: make and remove a file
    if reason:
        raise ValueError(f"-o/--output {output!r}: folder {str(folder)!r} is not writable (no file can be "
                         f"created there: {reason})")


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}") for k in range(n)]


def _add_eval(commands) -> None:
    from latent_diffusion.diffusion.samplers import SAMPLER_NAMES

    p = commands.add_parser(
        "eval", help="quality report over sampler settings: Shapes adherence, FID/FD-CLIP, CLIP score, speed, memory",
        description="Generate one image per (prompt, seed) for every setting (sampler, steps, guidance), score them "
                    "and write report.md, results.json, grids and plots into --out. Rerunning resumes.")
    p.add_argument("--model", default=None, help="diffusers folder, single .safetensors checkpoint, Hub id, or default-lcm (the embedded model at few steps) (default: the embedded Shapes model, default-20-step)")
    p.add_argument("--prompts", default=None,
                   help="prompt file: one per line, or JSONL {\"prompt\", \"categories\"} (default: Shapes prompts)")
    p.add_argument("--num-prompts", type=int, default=100, help="Shapes evaluation prompts when --prompts is not given")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the Shapes evaluation prompt list")
    p.add_argument("--samplers", nargs="+", default=None, help=f"any of {' '.join(SAMPLER_NAMES)} (default: the model's)")
    p.add_argument("--steps", nargs="+", type=int, default=None, help="step counts (default: the model's)")
    p.add_argument("--guidance", nargs="+", type=float, default=None, help="guidance scales (default: the model's)")
    p.add_argument("--settings", nargs="+", default=None, metavar="SAMPLER:STEPS[,STEPS...]",
                   help="paired lists instead of --samplers/--steps, e.g. ddpm:1000,250,50 dpm++:20,10,5")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt and setting (seeds 0..N-1)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    p.add_argument("--reference", default=None, help="real images (folder) or an .npz of statistics, for FID/FD-CLIP")
    p.add_argument("--clip", default=None, help="transformers CLIP model folder, for CLIP score and FD-CLIP")
    p.add_argument("--fid-weights", default=None,
                   help="FID Inception weights file (default: $LATENT_DIFFUSION_FID_WEIGHTS)")
    p.add_argument("--out", default="eval", help="output folder (reused to resume)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps… (default: cuda when available)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report in --out from saved images")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_eval)


# the evaluation library names its parameters; the command names them by its flags
EVAL_FLAGS = {"samplers": "--samplers", "steps": "--steps", "guidance": "--guidance", "pairs": "--settings",
              "num_prompts": "--num-prompts", "prompt_file": "--prompts", "batch_size": "--batch-size",
              "out_dir": "--out"}


def run_eval(args: argparse.Namespace) -> list[Path]:
    """The evaluation, its errors naming this command's flags where the library names its parameters."""
    from latent_diffusion.evaluation.errors import EvalArgumentError

    try:
        return _run_eval(args)
    except EvalArgumentError as error:
        kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
        raise kind(error.message(EVAL_FLAGS)) from None


def _run_eval(args: argparse.Namespace) -> list[Path]:
    from latent_diffusion.evaluation import report

    device = device_of(args)
    measures = lambda: report.QualityMeasures(args.reference, args.clip, args.fid_weights, device,  # noqa: E731
                                              names={"reference": "--reference", "clip": "--clip"})
    if args.report_only:
        return report.rebuild_report(args.out, measures, progress=not args.quiet)[:2]
    check_eval_args(args)
    request = report.SettingsRequest.from_lists(args.samplers, args.steps, args.guidance, args.settings)
    for flag, value in (("--seeds", args.seeds), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    prompts = (report.load_prompt_file(args.prompts) if args.prompts
               else report.shapes_eval_prompts(args.num_prompts, args.prompt_seed))
    pipe, model = _load_eval_pipeline(args.model)
    pipe.to(device)
    run = report.EvalRun(out_dir=Path(args.out), model=model, settings=request.settings(pipe.generation_defaults),
                         prompts=prompts, seeds=list(range(args.seeds)), batch_size=args.batch_size,
                         height=_eval_size(pipe, args.size), width=_eval_size(pipe, args.size))
    return report.run_evaluation(pipe, run, measures, progress=not args.quiet)[:2]


MAX_EVAL_PROMPTS = 100_000  # eval's prompt list and seed list are built whole before the first image
MAX_EVAL_SEEDS = 10_000


def check_eval_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for eval values no model could take (sampler names: the settings check them)."""
    from latent_diffusion.checks import MAX_IMAGE_SIDE, check_finite, check_int
    from latent_diffusion.limits import MAX_IMAGES_PER_CALL

    for scale in args.guidance or []:
        check_finite("--guidance", scale, 0)
    for steps in args.steps or []:
        check_int("--steps", steps, 1)
    for flag, most in (("num_prompts", MAX_EVAL_PROMPTS), ("seeds", MAX_EVAL_SEEDS), ("batch_size", MAX_IMAGES_PER_CALL)):
        check_int(f"--{flag.replace('_', '-')}", getattr(args, flag), 1)
        check_int(f"--{flag.replace('_', '-')}", getattr(args, flag), 1, most)  # lists built before the model loads
    if args.size is not None:
        check_int("--size", args.size, 1, MAX_IMAGE_SIDE)
    if args.model is not None:
        from latent_diffusion.formats.model_files import check_model_path

        check_model_path(args.model, "--model")


def _load_eval_pipeline(model: Optional[str]):
    """The pipeline and the model's name as recorded in run.json (a local folder's absolute path)."""
    from latent_diffusion.formats.assets import generation_default_path, resolve_model_name
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    path = Path(resolve_model_name(model)) if model else generation_default_path()
    name = str(path.resolve()) if path.exists() else str(model)
    return LatentDiffusionPipeline.from_pretrained(str(path) if path.exists() else model), name


def _eval_size(pipe, size: Optional[int]) -> int:
    try:
        return pipe._check_size("height", size)
    except ValueError as error:
        raise ValueError(f"--size: {error}") from None


def _add_serve(commands) -> None:
    p = commands.add_parser("serve", help="a web page and HTTP API for generating images (needs the ui extra: pip install -e '.[ui]')",
                            description="Serve a Gradio page and its `generate` API over one loaded model.")
    p.add_argument("--model", default=None, help="diffusers folder, single .safetensors checkpoint, Hub id, or default-lcm (the embedded model at few steps) (default: the embedded Shapes model, default-20-step)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more are refused")
    p.add_argument("--output-dir", default=None, help="where the PNGs go (default: a new temporary folder)")
    p.add_argument("--no-example", action="store_true", help="skip the example image generated at start")
    p.add_argument("--device", default=None, help="cpu, cuda, mps… (default: cuda when available)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA adapter loaded for every request (as in generate; repeatable); the page gets a "
                        "LoRA strength slider that multiplies the scales")
    add_serve_control_flags(p)
    _add_api_flags(p)
    _add_single_file_flags(p)
    p.set_defaults(run=run_serve)


def _add_api_flags(p) -> None:
    """serve's flags for the HTTP APIs (A1111's /sdapi/v1, OpenAI's /v1/images): limits, keys, more models."""
    p.add_argument("--max-steps", type=int, default=None, help="most denoising steps per API request (default 150)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="most width×height per image in API requests (default: 4× the model's native size)")
    p.add_argument("--max-images", type=int, default=None, help="most images per API request (default 8)")
    p.add_argument("--api-key", default=None, help="key the HTTP APIs require (Authorization: Bearer KEY)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="login for the page")
    p.add_argument("--extra-model", action="append", default=[], metavar="PATH",
                   help="another model the HTTP APIs can switch to (A1111 sd_model_checkpoint, OpenAI model)")


def _api_settings(args: argparse.Namespace) -> dict:
    """serve()'s limits and auth from the flags; ValueError naming a bad flag."""
    from latent_diffusion.checks import check_int

    limits = {name: getattr(args, name) for name in ("max_steps", "max_pixels", "max_images")}
    for name, value in limits.items():
        if value is not None:
            check_int(f"--{name.replace('_', '-')}", value, 1)
    user, colon, password = (args.auth or "").partition(":")
    if args.auth is not None and not (user and colon and password):
        raise ValueError("--auth must be USER:PASSWORD, both non-empty")
    return {"limits": limits, "api_key": args.api_key, "auth": (user, password) if args.auth else None}


def run_serve(args: argparse.Namespace) -> list[Path]:
    from latent_diffusion.apps.webui import SERVE_LIMITS, serve
    from latent_diffusion.checks import check_int
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    for name, limits in SERVE_LIMITS.items():  # before the model loads; errors name the flag
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), *limits)
    api_settings = _api_settings(args)
    check_serve_control_flags(args)
    try:
        import gradio  # noqa: F401  (the optional ui extra)
    except ImportError:
        raise SystemExit("latent-diffusion serve: the web UI needs gradio: pip install -e '.[ui]'") from None
    pipe = _load_pipeline(args, **control_loading_kwargs(args))
    loras = _load_loras(pipe, args.lora)
    device = device_of(args)
    pipe.to(device)
    extra = [(path, LatentDiffusionPipeline.from_pretrained(path).to(device)) for path in args.extra_model]
    serve(pipe, args.model, host=args.host, port=args.port, share=args.share, max_queue=args.max_queue,
          output_dir=args.output_dir, example=not args.no_example, loras=loras, extra_models=extra,
          embeddings=args.loaded_embeddings, controlnets=_served_controlnets(args), **api_settings)
    return []


def _served_controlnets(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(name, default weight) of each serve --controlnet, for the page and the A1111 API."""
    scales = args.control_scale or [1.0]
    scales = scales * len(args.controlnet) if len(scales) == 1 else scales
    return list(zip(args.controlnet, scales))


def _load_loras(pipe, specs: Sequence[str]) -> list[tuple[str, str, float]]:
    """Load each --lora PATH[:SCALE] into `pipe`; (adapter name, path, scale) of each, for the web UI."""
    if not specs:
        return []
    from latent_diffusion.pipelines.lora import parse_lora_spec

    names = _apply_loras(pipe, specs)
    return [(name, *parse_lora_spec(spec)) for name, spec in zip(names, specs)]


def _apply_loras(pipe, specs: Sequence[str]) -> list[str]:
    """apply_loras, its errors naming this command's --lora flag where the library names the spec."""
    from latent_diffusion.pipelines.lora import LoraSpecError, apply_loras

    try:
        return apply_loras(pipe, specs)
    except LoraSpecError as error:
        raise ValueError(f"--lora {error.spec!r}: {error.problem}") from None


def silence_loading_bars() -> None:
    """--quiet: no diffusers "Loading pipeline components" nor transformers "Loading weights" bars either."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def given_flags(argv: Optional[Sequence[str]]) -> set[str]:
    """The dests of the options and arguments given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions + [a for sub in parser._subparsers._group_actions
                                     for p in sub.choices.values() for a in p._actions]:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _failure(error: Exception) -> str:
    """One line for a failed run; errors that only say "offline" get the fix."""
    from latent_diffusion.checks import NonFiniteError, one_line

    text = one_line(error)
    if isinstance(error, NonFiniteError):
        return text
    name = type(error).__name__
    if "offline" in text.lower() or "LocalEntryNotFound" in name or "HF_HUB_OFFLINE" in text:
        return f"{text} (the Hub cannot be reached: give a local folder, or download the model first)"
    return text if isinstance(error, OSError) else f"{name}: {text}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.given = given_flags(argv)

    if getattr(args, "quiet", False):
        silence_loading_bars()

    try:
        written = args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # usage errors: argparse's status 2
        print(f"latent-diffusion {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latent-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the run itself failed (diverged, disk full, offline...): one line, status 1
        if os.environ.get("LATENT_DIFFUSION_TRACEBACK"):  # for debugging: the full traceback
            raise
        print(f"latent-diffusion {args.command}: error: {_failure(error)}", file=sys.stderr)
        return 1
    for path in written or []:
        print(path)
    return 0


# ----------------------------------------------------------------------------- ControlNet flags
# `generate`'s --controlnet, --control-image, --control-scale, --control-start, --control-end,
# --control-preprocess; `serve`'s --controlnet and --control-scale (the page's default weight).
#
# Each flag repeats, one per ControlNet (all but --controlnet and --control-image may also be given once for all).
# They become `GenerationSettings.controls` (one `ControlUnit` per net), which the PNG records and `--from-png`
# reads back (`controls_from_png`). Errors name the flag; the library's ValueErrors name its parameters.

# generate's per-net flags (argparse dest, ControlUnit field, default) that may be given once for all nets
PER_NET_FLAGS = (("control_scale", "scale", 1.0), ("control_start", "start", 0.0), ("control_end", "end", 1.0),
                 ("control_preprocess", "preprocess", "none"))


def add_serve_control_flags(parser: argparse.ArgumentParser) -> None:
    """serve's --controlnet (repeatable) and --control-scale (the page's default weight of each)."""
    _add_controlnet_flag(parser, "; the page then has a control-image input for each, the A1111 API takes "
                                 "sd-webui-controlnet units naming it")
    parser.add_argument("--control-scale", action="append", type=float, default=[], metavar="SCALE",
                        help="the page's default ControlNet weight (default 1.0); once for all, or once per --controlnet")


def _add_controlnet_flag(parser: argparse.ArgumentParser, more: str) -> None:
    parser.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                        help="diffusers ControlNet folder, Hub id, or 'default-outline' (the embedded model's Shapes "
                             "outline ControlNet); repeat for several" + more)


def add_control_flags(parser: argparse.ArgumentParser) -> None:
    _add_controlnet_flag(parser, " (one --control-image each)")
    parser.add_argument("--control-image", action="append", default=[], metavar="PATH",
                        help="control image for the matching --controlnet (its size is the default output size)")
    parser.add_argument("--control-scale", action="append", type=float, default=[], metavar="SCALE",
                        help="ControlNet conditioning scale (default 1.0); once for all, or once per --controlnet")
    parser.add_argument("--control-start", action="append", type=float, default=[], metavar="FRACTION",
                        help="fraction of the steps after which the ControlNet starts acting (default 0)")
    parser.add_argument("--control-end", action="append", type=float, default=[], metavar="FRACTION",
                        help="fraction of the steps after which it stops (default 1)")
    parser.add_argument("--control-preprocess", action="append", default=[], choices=tuple(PREPROCESSORS),
                        help="turn the control image into what the ControlNet reads first (canny: its edges); "
                             "once for all, or once per --controlnet")
    parser.add_argument("--guess-mode", action="store_true",
                        help="ControlNet guess mode: the nets see the conditional branch only, residuals ramped "
                             "0.1 to 1 (sd-webui-controlnet's 'ControlNet is more important')")


def check_control_flags(args: argparse.Namespace) -> None:
    """ValueError / FileNotFoundError naming the flag, before any model loads."""
    nets, images = len(args.controlnet), len(args.control_image)
    if images != nets:
        raise ValueError(f"--control-image given {images} time(s) for {nets} --controlnet; give one per --controlnet")
    for dest, _, _ in PER_NET_FLAGS:
        values, flag = getattr(args, dest), "--" + dest.replace("_", "-")
        if values and len(values) not in (1, nets):
            raise ValueError(f"{flag} given {len(values)} times for {nets} --controlnet; give it once or once each")
    for scale in args.control_scale:
        check_finite("--control-scale", scale, 0)
    for flag, values in (("--control-start", args.control_start), ("--control-end", args.control_end)):
        for value in values:
            check_finite(flag, value, 0, 1)
    for unit in control_units(args):
        if unit.start >= unit.end:
            raise ValueError(f"--control-start ({unit.start:g}) must be below --control-end ({unit.end:g})")
    for path in args.control_image:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--control-image: no such file {path!r}")
    check_controlnet_paths(args.controlnet)


def check_controlnet_paths(paths) -> None:
    """Each --controlnet an existing folder, a Hub id or a shipped name (ValueError naming the flag)."""
    from latent_diffusion.formats.model_files import looks_like_local_path

    for path in paths:
        if Path(path).expanduser().is_file() or (looks_like_local_path(path) and not Path(path).expanduser().exists()):
            raise ValueError(f"--controlnet {path!r}: give an existing diffusers ControlNet folder or a Hub id")


def check_serve_control_flags(args: argparse.Namespace) -> None:
    """serve's --control-scale: once, or once per --controlnet, each >= 0."""
    if args.control_scale and len(args.control_scale) not in (1, len(args.controlnet)):
        raise ValueError(f"--control-scale given {len(args.control_scale)} times for {len(args.controlnet)} "
                         "--controlnet; give it once or once each")
    for scale in args.control_scale:
        check_finite("--control-scale", scale, 0)
    check_controlnet_paths(args.controlnet)


def control_loading_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`from_pretrained` keywords: the ControlNet folders (none: nothing, so a folder's own ControlNet stays)."""
    if not args.controlnet:
        return {}
    return {"controlnet": args.controlnet[0] if len(args.controlnet) == 1 else list(args.controlnet)}


def control_units(args: argparse.Namespace) -> tuple:
    """The flags as `GenerationSettings.controls`: one ControlUnit per --controlnet, its image the --control-image path."""
    from latent_diffusion.settings import ControlUnit

    nets = len(args.controlnet)
    per_net = {}
    for dest, field, default in PER_NET_FLAGS:
        values = list(getattr(args, dest)) or [default]
        per_net[field] = values * nets if len(values) == 1 else values
    return tuple(ControlUnit(model, image, **{field: per_net[field][k] for field in per_net})
                 for k, (model, image) in enumerate(zip(args.controlnet, args.control_image)))


def controls_from_png(args: argparse.Namespace, recorded, png: str) -> None:
    """--from-png: take the recorded ControlNets and their settings unless --controlnet is given; the control
    image is not in the PNG, so it comes from --control-image (or our PNG's recorded path, when that file exists)."""
    if "controlnet" in args.given or not recorded.controls:
        return
    args.controlnet = [unit.model for unit in recorded.controls]
    for dest, field, _ in PER_NET_FLAGS:
        if dest not in args.given:
            setattr(args, dest, [getattr(unit, field) for unit in recorded.controls])
    if "control_image" not in args.given:
        paths = [unit.image for unit in recorded.controls]
        if not all(path is not None and Path(path).is_file() for path in paths):
            raise ValueError(f"--from-png {png}: it was made with {len(paths)} ControlNet(s) "
                             f"({', '.join(args.controlnet)}) and holds no control image; give --control-image "
                             "(one per --controlnet)")
        args.control_image = paths


if __name__ == "__main__":
    sys.exit(main())
