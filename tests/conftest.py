"""Shared fixtures: tiny Stable Diffusion folders built from config, offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Our samplers beyond DDPM/DDIM and the diffusers scheduler (with its settings) each one mirrors.
DIFFUSERS_SCHEDULER_OF = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}


def diffusers_scheduler_of(sampler: str):
    """(scheduler class, extra settings) of diffusers for one of our sampler names."""
    import diffusers

    name, settings = DIFFUSERS_SCHEDULER_OF[sampler]
    return getattr(diffusers, name), settings


def save_sd_folder(path, prediction_type="epsilon", scheduler="pndm"):
    """A diffusers StableDiffusionPipeline folder of tiny components, as a real SD checkpoint is laid out."""
    from diffusers import StableDiffusionPipeline

    from latent_diffusion.tiny import tiny_components

    components = tiny_components(prediction_type=prediction_type, scheduler=scheduler)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def save_sdxl_folder(path, scheduler="euler"):
    """A diffusers StableDiffusionXLPipeline folder of tiny components (two text encoders, size conditioning)."""
    from diffusers import StableDiffusionXLPipeline

    from latent_diffusion.tiny import tiny_sdxl_components

    StableDiffusionXLPipeline(**tiny_sdxl_components(scheduler=scheduler), add_watermarker=False).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    return save_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    return save_sd_folder(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def sd_folder_v(tmp_path_factory):
    return save_sd_folder(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


def run_script_main(main, argv):
    """A training script's main(argv) in this process, with a fresh accelerate state (it is a process singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return main(argv)



def same_pixels(a, b, levels: int = 1) -> bool:
    """Whether two uint8-range pictures agree within `levels` grey levels everywhere: the same request made in a
    batch of another size computes the same floats up to the last bits (CPU kernels block by batch), and a value
    on a .5 boundary then rounds one level apart (measured: 3e-4 of a level before rounding)."""
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    return a.shape == b.shape and int(np.abs(a - b).max(initial=0)) <= levels


def two_cpu_processes(script) -> tuple[list[str], dict]:
    """(command prefix, environment) that `accelerate launch` `script` on two CPU processes over gloo, on a free
    port so concurrent test runs do not collide; append the script's flags to the command."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), str(script)], env
