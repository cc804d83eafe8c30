"""Checks of how the training script was launched that accelerate itself lets pass.

accelerate (1.16) turns FSDP on only for accelerator devices (CUDA, XPU, NPU, ...): with
`ACCELERATE_USE_CPU=1` the processes join a gloo group as plain data parallelism (MULTI_CPU) and the
`--use_fsdp` request is dropped without a word, and without it on a machine with no accelerator every
process runs alone (distributed type NO). torch's own FSDP2 (`fully_shard`) does run on CPU over gloo;
accelerate does not route to it. A run that asked for sharding and silently got something else is
refused here by name.
"""
import os

from accelerate.utils import DistributedType


def fsdp_requested() -> bool:
    """Whether `accelerate launch --use_fsdp` (or a config with `distributed_type: FSDP`) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_fsdp_is_active(distributed_type: DistributedType) -> None:
    """Refuse an FSDP launch that accelerate did not turn into FSDP (CPU processes): one line naming it."""
    if fsdp_requested() and distributed_type != DistributedType.FSDP:
        raise ValueError(
            f"--use_fsdp (ACCELERATE_USE_FSDP) was asked for but accelerate set up {distributed_type.value}: "
            "accelerate runs FSDP on GPUs/accelerators only, not on CPU (ACCELERATE_USE_CPU=1); "
            "use --multi_gpu with ACCELERATE_USE_CPU=1 for data parallelism over gloo")
