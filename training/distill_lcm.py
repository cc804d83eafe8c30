"""Latent consistency distillation (Luo et al. 2023, LCD): any SD/SDXL model -> an LCM-LoRA (default) or a full LCM UNet.

One process, or any number with accelerate (as training/train_text2img.py):

    accelerate launch training/distill_lcm.py --pretrained_model_name_or_path PATH \\
        --train_data_dir DIR --resolution 512 --train_batch_size 4 --max_train_steps 1000 --output_dir OUT

Each step (LCM Algorithm 1, "LCD"): draw t_{n+k} on the skipping-step grid of `--num_ddim_timesteps` N
(k = T/N), w ~ U[--w_min, --w_max] and z_{t_{n+k}} ~ q(z | z_0); the frozen teacher solves one DDIM step
with guidance w back to t_n (ẑ_{t_n}, eq. 8); the loss is d(f_θ(z_{t_{n+k}}, t_{n+k}), f_θ⁻(ẑ_{t_n}, t_n)),
d = Huber (`--loss_type huber`, --huber_c) or L2, f the consistency parametrisation c_skip x + c_out x̂_0
(samplers/lcm.py's `boundary_scalings`), θ⁻ the EMA target network (`--ema_decay`, default 0.95).

With `--lora_rank` (default 64) only a LoRA learns: the teacher is the base UNet with the adapter
switched off, the target the EMA of the adapter, and OUT/pytorch_lora_weights.safetensors is the
LCM-LoRA (load it with `load_lora_weights`, sample with `sampler="lcm"`). `--full_unet` trains the whole
UNet (teacher: a frozen copy) and saves a diffusers folder whose scheduler is LCMScheduler and whose
defaults are sampler "lcm", 4 steps, guidance 1. Everything else is train_text2img's: the flags, the
latent/text cache, checkpoints with exact resume (`--resume_from_checkpoint latest`), `--push_to_hub`.
Validation images are made at 1, 2, 4 and 8 LCM steps (OUT/lcm-K-steps/validation/).

`--num_phases M` distils a phased consistency model instead (Wang et al. 2024, PCM): the timesteps are split
at the M points where DDIM's M-step plan lands, and f_θ maps each point to the lower edge of its phase by a
DDIM jump from the student's own x̂_0 and ε̂, so the student samples deterministically with sampler "ddim" in
M steps (the folder's scheduler: DDIMScheduler, trailing; validation at M steps).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import sys
from contextlib import contextmanager
from typing import Optional

import torch
from accelerate.logging import get_logger

from latent_diffusion.diffusion.gaussian import predictions_from_output, q_sample
from latent_diffusion.diffusion.samplers.ddim import alpha_bars_at, ddim_previous_timesteps
from latent_diffusion.diffusion.samplers.lcm import boundary_scalings
from latent_diffusion.tensors import append_dims, gather, randn
from latent_diffusion.text.conditioners import Conditioning
from latent_diffusion.training import train_text2img as base
from latent_diffusion.training.args import build_parser, check_args
from latent_diffusion.training.cache import encode_caption_tensors
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.lora import trained_modules
from latent_diffusion.training.lora_weights import register_checkpoint_hooks
from latent_diffusion.training.settings import training_settings

VALIDATION_STEPS = (1, 2, 4, 8)
LCM_DEFAULTS = {"sampler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
MAX_PHASES = 50
DEFAULT_LORA_RANK = 64  # as diffusers' LCM-LoRA script and the published LCM-LoRAs

logger = get_logger(__name__)


def build_distill_parser():
    """train_text2img's flags, LCD's own, and the defaults LCD wants (EMA target decay 0.95, validation at w = 1)."""
    parser = build_parser()
    parser.prog = "distill_lcm.py"
    g = parser.add_argument_group("latent consistency distillation")
    g.add_argument("--num_ddim_timesteps", type=int, default=50, help="N of the skipping-step grid (k = T / N)")
    g.add_argument("--w_min", type=float, default=3.0, help="guidance scales w ~ U[w_min, w_max] for the teacher")
    g.add_argument("--w_max", type=float, default=15.0)
    g.add_argument("--loss_type", default="huber", choices=("huber", "l2"))
    g.add_argument("--huber_c", type=float, default=0.001, help="c of the pseudo-Huber loss √(d² + c²) − c")
    g.add_argument("--timestep_scaling", type=float, default=10.0, help="s of c_skip, c_out at s·t (LCMScheduler's)")
    g.add_argument("--num_phases", type=int, default=None,
                   help="phased consistency distillation (PCM) with M phases: the student samples with DDIM, M steps "
                        "(default: LCM)")
    g.add_argument("--full_unet", action="store_true", help="train the whole UNet (default: an LCM-LoRA)")
    g.add_argument("--average_decay", type=float, default=None,
                   help="also keep a slow EMA of the student (e.g. 0.999) and save and validate it instead of the target")
    parser.set_defaults(ema_decay=0.95, validation_guidance_scale=1.0, learning_rate=1e-4, lr_warmup_steps=0,
                        output_dir="lcm-distilled", tracker_project_name="lcm-distill")
    return parser


def parse_distill_args(argv: Optional[list[str]] = None):
    """Checked flags; the LoRA rank defaults to 64 unless --full_unet, and the EMA (the target network) is always on."""
    parser = build_distill_parser()
    args = parser.parse_args(argv)
    if args.full_unet and args.lora_rank is not None:
        parser.error("--full_unet trains the whole UNet; it cannot be combined with --lora_rank")
    if not args.full_unet and args.lora_rank is None:
        args.lora_rank = DEFAULT_LORA_RANK
    args.use_ema = True
    problems = check_args(args)
    problems += [f"--{f} must be >= 0" for f in ("w_min", "huber_c") if not getattr(args, f) >= 0]
    if args.average_decay is not None and not 0 < args.average_decay < 1:
        problems.append(f"--average_decay must be in (0, 1), got {args.average_decay}")
    problems += [f"--{f} is not part of consistency distillation (it weighs the denoising loss)"
                 for f in ("masked_loss", "with_prior_preservation", "reg_data_dir") if getattr(args, f)]
    if not args.w_min <= args.w_max:
        problems.append(f"--w_min {args.w_min} must be <= --w_max {args.w_max}")
    if not 1 <= args.num_ddim_timesteps <= 1000:
        problems.append(f"--num_ddim_timesteps must be in [1, 1000], got {args.num_ddim_timesteps}")
    if args.num_phases is not None and not 1 <= args.num_phases <= MAX_PHASES:
        problems.append(f"--num_phases must be in [1, {MAX_PHASES}], got {args.num_phases}")
    if problems:
        parser.error("; ".join(problems))
    return args


class ConsistencyDistillationLoss:
    """LCD's loss for one batch: `loss(model_fn, z0, cond, generator)`, the DenoisingLoss interface of the loop.

    `model_fn(z_t, t, cond)` is the student (with gradients, through DDP); `teacher(z_t, t, cond)` the frozen
    model; `target()` a context in which the student module holds the EMA weights θ⁻.
    """

    def __init__(self, schedule, teacher, student, ema: EMA, uncond_texts: dict, resolution: int, flags,
                 phases: Optional["Phases"] = None):
        self.schedule, self.teacher, self.student, self.ema = schedule, teacher, student, ema
        self.uncond_texts, self.resolution, self.phases = uncond_texts, resolution, phases
        self.k = schedule.num_train_timesteps // flags.num_ddim_timesteps  # the skipping step
        self.num_ddim, self.w_min, self.w_max = flags.num_ddim_timesteps, flags.w_min, flags.w_max
        self.loss_type, self.huber_c, self.scaling = flags.loss_type, flags.huber_c, flags.timestep_scaling

    def __call__(self, model_fn, z0: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        batch, device = z0.shape[0], z0.device
        t, s = self.draw_timesteps(batch, generator)
        t, s = t.to(device), s.to(device)
        w = (self.w_min + (self.w_max - self.w_min) * torch.rand(batch, generator=generator)).to(device)
        noise = randn(tuple(z0.shape), generator, z0.dtype, device)
        z_t = q_sample(z0, noise, gather(self.schedule.alphas_cumprod, t, z0))
        with torch.no_grad():  # first: swapping θ⁻ in and out rewrites the student's weights in place
            z_s = self.teacher_ddim_step(z_t, t, s, w, cond)  # ẑ_{t_n}
            with self.ema.swapped_into(self.student):
                target = self.consistency(base.unet_prediction(self.student, z_s, s.clamp(min=0), cond), z_s, s)
            if self.phases is not None:  # at its phase's edge the solution is ẑ itself (PCM's boundary condition)
                target = torch.where(append_dims(self.phases.at_edge(s).to(z_s.device), z_s.ndim), z_s, target)
        online = self.consistency(model_fn(z_t, t, cond), z_t, t)  # f_θ(z_{t_{n+k}}, t_{n+k})
        return self.distance(online.float(), target.float())

    def draw_timesteps(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, t_n) for each sample: LCD's t_{n+k} = (j + 1) k − 1 on the grid, t_n = t_{n+k} − k (clamped
        at 0), as diffusers' LCD scripts; with phases, the phase's grid and t_n no lower than its edge."""
        if self.phases is not None:
            return self.phases.draw(batch, generator)
        j = torch.randint(0, self.num_ddim, (batch,), generator=generator)
        t = (j + 1) * self.k - 1
        return t, (t - self.k).clamp(min=0)

    def consistency(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x̂_0 (LCM eq. 9), x̂_0 from the network output (ε, v or x_0); with
        phases, the DDIM jump to the lower edge of t's phase (PCM)."""
        eps, x0 = predictions_from_output(output.float(), x, gather(self.schedule.alphas_cumprod, t.clamp(min=0), x),
                                          self.schedule.prediction_type)
        if self.phases is not None:
            return self.phases.jump(x0, eps, t)
        c_skip, c_out = (gather(c, torch.arange(len(t)), x) for c in boundary_scalings(t.cpu(), self.scaling))
        return c_skip * x + c_out * x0

    def teacher_ddim_step(self, z_t, t, s, w, cond) -> torch.Tensor:
        """One DDIM step t → s of the teacher under guidance w (LCM eq. 8): x̂_0, ε̂ each ε_u + (1 + w)(ε_c − ε_u)
        in diffusers' form x_c + w (x_c − x_u), then ẑ_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s) ε̂ (DDIM eq. 12, η = 0)."""
        alpha_bar = gather(self.schedule.alphas_cumprod, t, z_t)
        uncond = self.unconditional(cond)
        eps_c, x0_c = predictions_from_output(self.teacher(z_t, t, cond).float(), z_t, alpha_bar,
                                              self.schedule.prediction_type)
        eps_u, x0_u = predictions_from_output(self.teacher(z_t, t, uncond).float(), z_t, alpha_bar,
                                              self.schedule.prediction_type)
        w = w.view(-1, 1, 1, 1)
        x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        alpha_bar_s = (gather(self.schedule.alphas_cumprod, s, z_t) if self.phases is None
                       else append_dims(self.phases.alpha_bar(s).to(z_t), z_t.ndim))
        return alpha_bar_s.sqrt() * x0 + (1 - alpha_bar_s).sqrt() * eps

    def unconditional(self, cond: Conditioning) -> Conditioning:
        """The empty prompt's conditioning for this batch (SDXL: its pooled embedding, the caption's size ids)."""
        batch = cond.context.shape[0]
        texts = {k: v.to(cond.context.device, cond.context.dtype) for k, v in self.uncond_texts.items()}
        pooled = texts.get("pooled_embeds")
        return Conditioning(texts["text_embeds"].expand(batch, -1, -1),
                            None if pooled is None else pooled.expand(batch, -1), cond.time_ids)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pseudo-Huber √((a − b)² + c²) − c (Song & Dhariwal 2023), or the mean squared error."""
        if self.loss_type == "l2":
            return torch.nn.functional.mse_loss(a, b)
        return (torch.sqrt((a - b) ** 2 + self.huber_c**2) - self.huber_c).mean()


class Phases:
    """PCM's phases (Wang et al. 2024, phased consistency models): the timesteps split at the M edges where
    DDIM's M-step plan lands (t_i − ⌊T/M⌋, the last one past the end), each point mapped to the lower edge of
    its phase by a DDIM jump, so that the student samples deterministically with DDIM in M steps.

    Training timesteps are each phase's top t_i and every k below it, above its edge; the teacher's step from t
    stops at the edge, where the target is ẑ itself.
    """

    def __init__(self, ddim, num_phases: int, k: int):
        tops = ddim.plan(num_phases)  # (M,) descending
        self.edges = ddim_previous_timesteps(ddim.schedule.num_train_timesteps, tops, num_phases)  # (M,) descending
        self.alphas_cumprod, self.final = ddim.schedule.alphas_cumprod, ddim.final_alpha_bar
        points = [(t, e) for top, e in zip(tops.tolist(), self.edges.tolist()) for t in range(top, e, -k)]
        self.grid, self.grid_edges = (torch.tensor(v) for v in zip(*points))
        self.k = k

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, s): t uniform over the training timesteps, s = max(t − k, its phase's edge)."""
        i = torch.randint(0, len(self.grid), (batch,), generator=generator)
        return self.grid[i], torch.maximum(self.grid[i] - self.k, self.grid_edges[i])

    def edge_of(self, t: torch.Tensor) -> torch.Tensor:
        """The largest edge below each t."""
        below = self.edges.view(1, -1) < t.cpu().view(-1, 1)  # (B, M); edges descend, so the first True
        return self.edges[below.int().argmax(dim=1)]

    def at_edge(self, s: torch.Tensor) -> torch.Tensor:
        return torch.isin(s.cpu(), self.edges)

    def alpha_bar(self, s: torch.Tensor) -> torch.Tensor:
        """ᾱ at each s, DDIM's final ᾱ past the end."""
        return alpha_bars_at(self.alphas_cumprod, s.cpu(), self.final)

    def jump(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The DDIM step (η = 0, DDIM eq. 12) from t to the lower edge e of its phase: √ᾱ_e x̂_0 + √(1 − ᾱ_e) ε̂."""
        alpha_bar = append_dims(self.alpha_bar(self.edge_of(t)).to(x0), x0.ndim)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


class TargetAndAverage:
    """The EMA interface of the training loop over two averages of the student: `target`, θ⁻ of the loss
    (decay μ = --ema_decay), and, with --average_decay, a slow `average` that is what validation and the saved
    model use. The target's short memory (μ = 0.95) lets its weights keep the step-to-step noise of a
    constant learning rate; averaging it away raised 4-step adherence of the embedded default by about 0.05
    (benchmarks/RESULTS.md). Without --average_decay, the target is saved, as in diffusers' LCD scripts."""

    def __init__(self, model: torch.nn.Module, target_decay: float, average_decay: Optional[float]):
        self.target = EMA(model, target_decay)
        self.average = None if average_decay is None else EMA(model, average_decay)

    @property
    def saved(self) -> EMA:
        return self.target if self.average is None else self.average

    def update(self, model: torch.nn.Module) -> None:
        for ema in (self.target, self.average):
            if ema is not None:
                ema.update(model)

    def copy_to(self, model: torch.nn.Module) -> None:
        self.saved.copy_to(model)

    def swapped_into(self, model: torch.nn.Module):
        return self.saved.swapped_into(model)

    def save(self, path: str) -> None:
        """The target in `path` (the format of every other EMA file); the average beside it, `path`'s stem + -average."""
        self.target.save(path)
        if self.average is not None:
            self.average.save(average_path(path))

    def load(self, path: str) -> None:
        self.target.load(path)
        if self.average is not None:
            if not os.path.isfile(average_path(path)):
                raise ValueError(f"--average_decay is set but the checkpoint has no {os.path.basename(average_path(path))}")
            self.average.load(average_path(path))


def average_path(ema_path: str) -> str:
    stem, ext = os.path.splitext(ema_path)
    return f"{stem}-average{ext}"


# ----------------------------------------------------------------------------- the run


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_distill_args(argv)
    settings = training_settings(args)
    if settings.text_encoder_trains:
        raise ValueError("--train_text_encoder and --train_text_encoder_lora are not supported by distill_lcm.py "
                         "(only the UNet is distilled)")
    accelerator = base.make_accelerator(settings)
    models = base.load_models(settings, accelerator)  # with --lora_rank: the UNet frozen, an adapter added
    models.scheduler = student_scheduler(models.scheduler, args)  # saved with full UNets
    frozen_teacher = None if settings.lora is not None else frozen_copy(models.unet, accelerator.device,
                                                                        models.weight_dtype)
    data = base.load_training_data(settings, accelerator, models)
    max_steps = settings.optim.max_train_steps or settings.optim.num_train_epochs * data.steps_per_epoch
    trained = trained_modules(settings.lora, models.unet, models.text_encoder)
    optimizer, lr_scheduler = base.make_optimizer(settings, accelerator, trained, max_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    if settings.lora is not None:  # checkpoints hold the adapter only
        register_checkpoint_hooks(accelerator, None)
    student = accelerator.unwrap_model(unet)
    ema = TargetAndAverage(student, settings.optim.ema_decay, args.average_decay)  # checkpointed and resumed
    state = base.resume(settings.output, accelerator, ema)
    base.start_trackers(settings, accelerator)
    teacher = teacher_fn(student if frozen_teacher is None else frozen_teacher, adapter=frozen_teacher is None)
    loss_fn = ConsistencyDistillationLoss(models.schedule, teacher, student, ema.target, empty_prompt_texts(models),
                                          settings.data.resolution, args, phases_of(models.scheduler, args))
    trainee = base.Trainee(unet, optimizer, lr_scheduler, ema)
    state = base.train(settings, accelerator, models, data, trainee, state, max_steps, loss_fn=loss_fn,
                       validate_fn=functools.partial(validate, defaults=sampling_defaults(args)))
    save(settings, accelerator, models, unet, ema, state.global_step, args)
    accelerator.end_training()


def student_scheduler(scheduler, args):
    """The scheduler the student samples with: LCM's, or with --num_phases DDIM's (trailing, no clipping)."""
    if args.num_phases is None:
        return lcm_scheduler(scheduler, args.num_ddim_timesteps, args.timestep_scaling)
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", clip_sample=False)


def phases_of(scheduler, args) -> Optional[Phases]:
    """--num_phases' Phases on the student's DDIM plan (None for LCM)."""
    if args.num_phases is None:
        return None
    from latent_diffusion.diffusion.schedules import NoiseSchedule
    from latent_diffusion.diffusion.samplers import get_sampler

    ddim = get_sampler("ddim", NoiseSchedule.from_config(scheduler.config))
    return Phases(ddim, args.num_phases, ddim.schedule.num_train_timesteps // args.num_ddim_timesteps)


def sampling_defaults(args) -> dict:
    """How the student samples by default: LCM, 4 steps; with --num_phases M, DDIM in M steps; guidance 1."""
    if args.num_phases is None:
        return dict(LCM_DEFAULTS)
    return {"sampler": "ddim", "num_inference_steps": args.num_phases, "guidance_scale": 1.0}


def lcm_scheduler(scheduler, original_inference_steps: int, timestep_scaling: float):
    """LCMScheduler with the base model's noise schedule (betas, prediction type, T), the distillation's
    skipping-step grid N (`--num_ddim_timesteps`: its plans pick timesteps the student was trained at) and
    its boundary scaling s."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(scheduler.config, original_inference_steps=original_inference_steps,
                                    timestep_scaling=timestep_scaling)


def frozen_copy(unet, device, dtype) -> torch.nn.Module:
    """The teacher of a full-UNet distillation: the base UNet as it was, frozen, in the frozen parts' dtype."""
    teacher = copy.deepcopy(unet).requires_grad_(False).eval()
    return teacher.to(device, dtype=dtype)


@contextmanager
def adapters_off(unet):
    """The base model inside a LoRA-adapted UNet: the teacher of an LCM-LoRA distillation."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def teacher_fn(unet, adapter: bool):
    """teacher(z_t, t, cond): the base model's prediction (the adapter switched off when `adapter`)."""

    def teacher(z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if not adapter:
            return base.unet_prediction(unet, z_t.to(unet.dtype), t, cond.to(dtype=unet.dtype))
        with adapters_off(unet):
            return base.unet_prediction(unet, z_t, t, cond)

    return teacher


@torch.no_grad()
def empty_prompt_texts(models) -> dict[str, torch.Tensor]:
    """The empty prompt's text embeddings (1, L, D) (SDXL: and its pooled (1, P)): the teacher's unconditional branch."""
    return encode_caption_tensors(models.tokenizer, models.text_encoder, [""], models.tokenizer_2,
                                  models.text_encoder_2)


def student_pipeline(models, unet, defaults: dict):
    """Our pipeline on the student with its sampling `defaults` (`sampling_defaults`)."""
    pipe = base.make_pipeline(models, unet)
    pipe.generation_defaults.update(defaults)
    pipe.trace_unet = False  # weights change between validations
    return pipe


def validation_steps(defaults: dict) -> tuple[int, ...]:
    """An LCM's 1, 2, 4 and 8 steps; a phased model's own M."""
    return VALIDATION_STEPS if defaults["sampler"] == "lcm" else (defaults["num_inference_steps"],)


def student_validation(settings, models, unet, step: int, defaults: dict, trackers=()) -> dict[int, str]:
    """The validation prompts at each of `validation_steps`: OUT/SAMPLER-K-steps/validation/step-N.png for each K."""
    from latent_diffusion.training.validation import run_validation

    val, out = settings.validation, settings.output.output_dir
    pipe, grids = student_pipeline(models, unet, defaults), {}
    for k in validation_steps(defaults):
        folder = os.path.join(out, f"{defaults['sampler']}-{k}-steps")
        grids[k], _ = run_validation(pipe, val.validation_prompts, step=step, output_dir=folder,
                                     seed=settings.optim.seed, num_inference_steps=k,
                                     guidance_scale=val.validation_guidance_scale, resolution=settings.data.resolution,
                                     metric_names=val.validation_metrics, trackers=trackers)
    return grids


def validate(settings, accelerator, models, unet, ema: TargetAndAverage, step: int, defaults: dict) -> None:
    """train()'s validation hook (with `defaults` bound): the saved average (the target without --average_decay) at
    `validation_steps`, on the main process."""
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        model.eval()
        with ema.swapped_into(model):
            grids = student_validation(settings, models, model, step, defaults, accelerator.trackers)
        model.train()
        logger.info(f"validation grids {grids}")
    accelerator.wait_for_everyone()


def save(settings, accelerator, models, unet, ema: TargetAndAverage, step: int, args) -> None:
    """train_text2img's output (LoRA file or diffusers folder, EMA weights), then LCM's defaults, grids, card, upload."""
    quiet = dataclasses.replace(settings, validation=dataclasses.replace(settings.validation, validation_prompts=None),
                                output=dataclasses.replace(settings.output, push_to_hub=False))
    base.save_pipeline(quiet, accelerator, models, unet, ema, step)
    if not accelerator.is_main_process:
        return
    out, defaults = settings.output.output_dir, sampling_defaults(args)
    if settings.lora is None:  # a full UNet: its folder samples as the student by default
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump(defaults, f, indent=2)
    grids = {}
    if settings.validation.validation_prompts:
        model = accelerator.unwrap_model(unet)
        model.eval()
        with ema.swapped_into(model):
            grids = student_validation(settings, models, model, step, defaults)
    append_card_section(out, args, step, grids)
    if settings.output.push_to_hub:
        from latent_diffusion.formats.hub import push_folder

        push_folder(out, settings.output.hub_model_id, token=settings.output.hub_token,
                    commit_message="End of latent consistency distillation")


def append_card_section(out: str, args, step: int, grids: dict[int, str]) -> None:
    """The model card's LCD section: what was distilled, with which settings, and how to sample it."""
    student = "LCM" if args.num_phases is None else "PCM"
    kind = f"an {student}-LoRA" if not args.full_unet else f"a full {student} UNet"
    rows = [f"| {k} | {getattr(args, k)} |" for k in ("num_ddim_timesteps", "num_phases", "w_min", "w_max", "loss_type", "huber_c",
                                                       "ema_decay", "average_decay", "timestep_scaling", "lora_rank",
                                                       "learning_rate", "lr_scheduler", "train_batch_size",
                                                       "max_train_steps")]
    images = "".join(f"\n![{k} steps]({os.path.relpath(path, out)})" for k, path in grids.items())
    how = ("`sampler=\"lcm\"` (or `\"tcd\"`), 2–8 steps, `guidance_scale` 1–2" if args.num_phases is None else
           f"`sampler=\"ddim\"` (diffusers' DDIMScheduler with `timestep_spacing=\"trailing\"`), {args.num_phases} steps, "
           "`guidance_scale` 1")
    method = "Luo et al. 2023" if args.num_phases is None else "phased, Wang et al. 2024"
    text = (f"\n## Latent consistency distillation\n\n{kind} distilled from `{args.pretrained_model_name_or_path}` by "
            f"latent_diffusion's `training/distill_lcm.py` ({step} steps; {method}). Sample it with "
            f"{how}.\n\n| Setting | Value |\n|---|---|\n"
            + "\n".join(rows) + "\n" + images + "\n")
    with open(os.path.join(out, "README.md"), "a") as f:
        f.write(text)


def cli(argv: Optional[list[str]] = None) -> int:
    """main() as a command: one line and status 2 for a bad flag, data or model; 1 for a failed run."""
    return base.run_as_command(main, "distill_lcm.py", argv)


if __name__ == "__main__":
    sys.exit(cli())
