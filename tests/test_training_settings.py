"""training/settings.py: the flags typed once, the LoRA α default worked out once, explicit text-encoder training."""
import dataclasses

import pytest
import torch

from latent_diffusion.tiny import tiny_components
from latent_diffusion.training.args import build_parser, parse_args
from latent_diffusion.training.settings import BucketSettings, TrainingSettings, training_settings


def settings_of(tmp_path, *flags) -> TrainingSettings:
    return training_settings(parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path),
                                         *flags]))


def test_every_group_field_is_a_flag_and_carries_its_value(tmp_path):
    settings = settings_of(tmp_path, "--learning_rate", "3e-4", "--resolution", "64", "--output_dir", "o",
                           "--validation_prompts", "a", "b", "--loss_log_steps", "3")
    flags = {action.dest for action in build_parser()._actions}
    for group in (settings.model, settings.data, settings.optim, settings.output, settings.validation, settings.speed):
        for field in dataclasses.fields(group):
            assert field.name in flags
            assert getattr(group, field.name) == settings.flags[field.name]
    assert (settings.optim.learning_rate, settings.data.resolution, settings.output.output_dir) == (3e-4, 64, "o")
    assert settings.validation.validation_prompts == ["a", "b"] and settings.speed.loss_log_steps == 3
    assert settings.lora is None and settings.bucket is None and not settings.text_encoder_trains


def test_lora_alpha_defaults_to_the_rank_once(tmp_path):
    from latent_diffusion.training.lora import lora_config

    default = settings_of(tmp_path, "--lora_rank", "4", "--lora_target_modules", " to_q , to_v,")
    assert default.lora.alpha == 4 and default.lora.target_modules == ("to_q", "to_v")
    assert lora_config(default.lora, default.lora.target_modules).lora_alpha == 4
    explicit = settings_of(tmp_path, "--lora_rank", "4", "--lora_alpha", "8")
    assert explicit.lora.alpha == 8.0 and lora_config(explicit.lora, ["to_q"]).lora_alpha == 8.0
    assert explicit.tracker_config()["lora_rank"] == 4 and "lora_alpha" in explicit.flags  # the flags as given


def test_text_encoder_trains_is_a_setting(tmp_path):
    assert settings_of(tmp_path, "--lora_rank", "2", "--train_text_encoder_lora", "--no_cache").text_encoder_trains
    assert not settings_of(tmp_path, "--lora_rank", "2").text_encoder_trains
    bucketed = settings_of(tmp_path, "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
                           "--bucket_reso_steps", "32")
    assert bucketed.bucket == BucketSettings(64, 128, 32)


@pytest.mark.parametrize("trains", [True, False])
def test_captions_get_gradients_only_when_the_setting_says_so(trains):
    from latent_diffusion.training.train_text2img import Models, batch_inputs

    parts = tiny_components()
    parts["text_encoder"].eval()  # its train mode is no signal any more
    models = Models(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                    torch.float32, text_encoder_trains=trains)
    batch = {"pixels": torch.zeros(1, 3, 32, 32), "caption": ["a red circle"]}
    _, cond = batch_inputs(batch, models, torch.device("cpu"), torch.Generator().manual_seed(0), 32)
    assert cond.context.requires_grad == trains
