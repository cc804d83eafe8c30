"""Issue 31, item 5: one-line warnings for prompt words a model does not know and sizes it was not trained at."""
import logging

import pytest

from latent_diffusion.text import vocabulary
from latent_diffusion.text.vocabulary import prompt_words, request_warnings, shapes_vocabulary, unknown_words


@pytest.fixture(scope="module")
def default_pipe():
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_pretrained()


def test_shapes_vocabulary_covers_every_caption():
    import numpy as np

    from latent_diffusion.shapes import caption, full_caption, sample_scene

    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        for text in (full_caption(scene), caption(scene, rng)):
            assert set(prompt_words([text])) <= shapes_vocabulary(), text


def test_default_model_names_words_outside_its_captions(default_pipe):
    lines = request_warnings(default_pipe, ["a cat on a sofa", "a red circle"], 64, 64)
    assert lines == ["prompt words this model does not know (the Shapes captions it was trained on): cat, sofa; "
                     "expect them to be ignored"]
    assert request_warnings(default_pipe, ["A small red circle on the left, on a black background."], 64, 64) == []


def test_default_model_names_a_size_it_was_not_trained_at(default_pipe):
    (line,) = request_warnings(default_pipe, ["a red circle"], 512, 256)
    assert line.startswith("size 512x256 differs from the 64x64 this model was trained at")


def test_tokenizer_unknown_token_counts_as_unknown():
    class Tokenizer:
        unk_token_id = 0

        def __call__(self, word, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": [0] if word == "ŋ" else [5, 6]})()

    assert unknown_words(["a ŋ dog"], Tokenizer()) == ["ŋ"]
    assert unknown_words(["a ŋ dog"], Tokenizer(), frozenset({"a"})) == ["ŋ", "dog"]


def test_pipeline_warns_once_in_one_line(sd_folder, caplog, monkeypatch):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    monkeypatch.setattr(vocabulary, "_said", set())
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    native = pipe.resolve_size()
    big = (native[0] * 2, native[1])
    with caplog.at_level(logging.WARNING, logger="latent_diffusion.text.vocabulary"):
        for _ in range(2):
            pipe("a red circle", num_inference_steps=1, height=big[0], width=big[1], output_type="latent")
        pipe("a red circle", num_inference_steps=1, output_type="latent")
    said = [r.getMessage() for r in caplog.records if r.name == "latent_diffusion.text.vocabulary"]
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"size {big[0]}x{big[1]} differs from the {native[0]}x{native[1]}")


def test_a_lora_on_the_default_may_teach_new_words(tmp_path):
    """examples/train_lora.sh teaches the default "cobalt": with a LoRA active, only the tokenizer's unknown
    token counts, so the word is not reported as ignored; the size warning stays."""
    from latent_diffusion.formats.assets import default_model_path
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from test_lora_loading import make_lora

    pipe = LatentDiffusionPipeline.from_pretrained()
    assert request_warnings(pipe, ["a cobalt circle"], 64, 64)  # the base does not know it
    pipe.load_lora_weights(make_lora(default_model_path(), tmp_path))
    assert request_warnings(pipe, ["a cobalt circle"], 64, 64) == []
    (line,) = request_warnings(pipe, ["a cobalt circle"], 128, 64)
    assert line.startswith("size 128x64 differs")
    pipe.unload_lora_weights()
    assert request_warnings(pipe, ["a cobalt circle"], 64, 64)  # no adapter: the Shapes vocabulary again
