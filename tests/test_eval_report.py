"""`latent-diffusion eval`: the report over a grid of settings, resuming, scoring, measures, errors; the
training-time Shapes adherence metric; the PIL plots."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.apps.cli import main
from latent_diffusion.evaluation import WEIGHTS_ENV_VAR
from latent_diffusion.evaluation import generation, report
from latent_diffusion.evaluation.prompts import load_prompt_file, make_prompt, shapes_eval_prompts
from latent_diffusion.evaluation.run_folder import EvalRun, prepare_out_dir
from latent_diffusion.evaluation.settings import Setting, SettingsRequest
from latent_diffusion.evaluation.plots import Series, line_chart, linear_ticks, log_ticks
from latent_diffusion.shapes import evaluation_prompts, score_images
from latent_diffusion.shapes.dataset import shapes_example

GRID = ["--samplers", "ddim", "dpm++", "--steps", "2", "3", "--guidance", "1", "3"]
SETTING_NAMES = sorted(f"{s}-{n}-w{g}" for s in ("ddim", "dpmpp") for n in (2, 3) for g in (1, 3))


def eval_args(model, out, *extra):
    return ["eval", "--model", str(model), "--num-prompts", "3", "--seeds", "1", "--size", "32",
            "--out", str(out), "--quiet", *extra]


@pytest.fixture
def generated(monkeypatch):
    """Counts the images generate_batch makes (the warm-up call is not counted)."""
    made = []
    original = generation.generate_batch

    def counting(pipe, run, setting, items):
        made.extend((setting.name, p.index, s) for p, s in items)
        return original(pipe, run, setting, items)

    monkeypatch.setattr(generation, "generate_batch", counting)
    return made


@pytest.fixture(scope="module")
def grid_out(sd_folder, tmp_path_factory):
    """One full eval run: 2 samplers × 2 step counts × 2 guidance scales, 3 prompts, 1 seed, 32 px."""
    out = tmp_path_factory.mktemp("eval") / "out"
    assert main(eval_args(sd_folder, out, *GRID)) == 0
    return out


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}


def test_eval_writes_report_results_grids_and_plots(grid_out):
    results = json.loads((grid_out / "results.json").read_text())
    assert sorted(r["name"] for r in results["results"]) == SETTING_NAMES
    assert sorted(p.name for p in (grid_out / "images").iterdir()) == SETTING_NAMES
    assert len(list((grid_out / "images").rglob("p*-s0.png"))) == 24
    for r in results["results"]:
        assert r["images"] == 3 and len(r["judgements"]) == 3 and r["seconds_per_image"] > 0
        assert r["peak_memory_bytes"] > 0 and r["shapes"]["counts"]["overall"] == 3
    markdown = (grid_out / "report.md").read_text()
    assert "| setting | s/image | peak MiB | adherence |" in markdown
    for label in ("ddim 2 steps, w=1", "dpm++ 3 steps, w=3"):
        assert f"| {label} |" in markdown
    assert "FID" in markdown and "--reference" in markdown  # says how to get FID
    grids = sorted(p.name for p in (grid_out / "grids").glob("*.png"))
    assert grids == sorted([f"{n}.png" for n in SETTING_NAMES] + ["comparison.png"])
    plots = sorted(p.name for p in (grid_out / "plots").glob("*.png"))
    assert plots == ["adherence-vs-seconds-w1.png", "adherence-vs-seconds-w3.png"]
    for path in [grid_out / "grids" / "comparison.png", grid_out / "plots" / plots[0]]:
        assert Image.open(path).size[0] > 200 and f"]({path.relative_to(grid_out).as_posix()})" in markdown
    image = Image.open(grid_out / "images" / "ddim-2-w3" / "p0001-s0.png")
    assert image.size == (32, 32)
    assert (image.text["sampler"], image.text["steps"], image.text["guidance"]) == ("ddim", "2", "3.0")
    assert image.text["prompt"] == evaluation_prompts(3)[1][0] and image.text["seed"] == "1"


def test_adherence_equals_score_images_on_saved_images(grid_out):
    results = json.loads((grid_out / "results.json").read_text())
    prompts = [text for text, _ in evaluation_prompts(3)]
    for r in results["results"]:
        images = [Image.open(grid_out / "images" / r["name"] / f"p{i:04d}-s0.png") for i in range(3)]
        expected = score_images(images, prompts)
        for key in ("overall", "single", "position", "two_objects", "background", "held_out"):
            assert r["shapes"][key] == expected[key], (r["name"], key)
        assert r["shapes"]["counts"] == expected["counts"]
        failed = {f["index"] for f in expected["failures"]}
        assert [j["shapes_correct"] for j in r["judgements"]] == [i not in failed for i in range(3)]


def test_rerun_skips_finished_images(grid_out, sd_folder, generated):
    before = mtimes(grid_out / "images")
    timings = (grid_out / "images" / "ddim-2-w1" / "timings.jsonl").read_text()
    assert main(eval_args(sd_folder, grid_out, *GRID)) == 0
    assert generated == []
    assert mtimes(grid_out / "images") == before
    assert (grid_out / "images" / "ddim-2-w1" / "timings.jsonl").read_text() == timings


def test_interrupted_run_resumes(grid_out, sd_folder, generated):
    (grid_out / "results.json").unlink()
    (grid_out / "report.md").unlink()
    folder = grid_out / "images" / "dpmpp-3-w1"
    for name in ("p0001-s0.png", "p0002-s0.png"):
        (folder / name).unlink()
    with open(folder / "timings.jsonl", "a") as f:
        f.write('{"files": ["p0001-s0.png"], "secon')  # a line torn by the interruption
    kept = mtimes(grid_out / "images")
    assert main(eval_args(sd_folder, grid_out, *GRID)) == 0
    assert sorted(generated) == [("dpmpp-3-w1", 1, 0), ("dpmpp-3-w1", 2, 0)]
    assert all(path.stat().st_mtime_ns == t for path, t in kept.items())
    results = json.loads((grid_out / "results.json").read_text())
    resumed = next(r for r in results["results"] if r["name"] == "dpmpp-3-w1")
    assert resumed["images"] == 3 and resumed["timed_images"] == 5  # both batches' timings, torn line skipped
    assert (grid_out / "report.md").is_file()


def test_report_only_notes_missing_fid_weights(grid_out, tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    reference = tmp_path / "reference"
    assert main(["shapes-export", str(reference), "--n", "4", "--size", "32"]) == 0
    assert main(["eval", "--report-only", "--out", str(grid_out), "--reference", str(reference), "--quiet"]) == 0
    markdown = (grid_out / "report.md").read_text()
    assert "FID: not computed" in markdown and WEIGHTS_ENV_VAR in markdown
    assert "pt_inception-2015-12-05-6726825d.pth" in markdown
    results = json.loads((grid_out / "results.json").read_text())
    assert all(r["fid"] is None for r in results["results"])


@pytest.mark.parametrize("extra, needle", [
    (["--samplers", "ddim", "lms"], "--samplers"),
    (["--settings", "ddim:50,x"], "--settings"),
    (["--settings", "lms:10"], "--settings"),
    (["--samplers", "ddim", "--settings", "ddim:5"], "--settings"),
    (["--guidance", "-1"], "--guidance"),
    (["--steps", "0"], "--steps"),
    (["--size", "30"], "--size"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts"),
])
def test_bad_arguments_are_errors_naming_them(sd_folder, tmp_path, capsys, extra, needle):
    assert main(eval_args(sd_folder, tmp_path / "out", *extra)) == 2
    error = capsys.readouterr().err
    assert needle in error
    if "euler" in extra:
        assert "euler" in error and "dpm++" in error


class MeanColour(torch.nn.Module):
    """A stand-in FID extractor: per-channel mean and std, (B, 6)."""

    measure_name = "FID"

    def forward(self, images):
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel with tokenizer and image processor."""
    import transformers
    from transformers import CLIPConfig, CLIPModel

    from latent_diffusion.text.tokenizers import train_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = train_clip_tokenizer(["a red circle", "a cat on a sofa", "a blue square on the left"] * 5,
                                     vocab_size=80)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(tower, image_size=32, patch_size=8),
                         projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_prompt_file_fid_fd_clip_and_clip_score(sd_folder, tmp_path, monkeypatch, clip_folder):
    import latent_diffusion.evaluation.inception as inception

    monkeypatch.setattr(inception, "load_fid_inception", lambda weights=None, device=None: MeanColour())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat on a sofa", "categories": ["animals"]}\n{"prompt": "a red circle"}\n')
    reference = tmp_path / "reference"
    assert main(["shapes-export", str(reference), "--n", "4", "--size", "32"]) == 0
    out = tmp_path / "out"
    assert main(eval_args(sd_folder, out, "--prompts", str(prompts), "--settings", "ddim:2", "--guidance", "2",
                          "--seeds", "2", "--reference", str(reference), "--clip", str(clip_folder))) == 0
    (result,) = json.loads((out / "results.json").read_text())["results"]
    assert result["images"] == 4 and result["shapes"]["counts"]["overall"] == 2  # only "a red circle" is scored
    cat = [j for j in result["judgements"] if j["prompt_index"] == 0]
    assert [j["shapes_correct"] for j in cat] == [None, None] and cat[0]["categories"] == ["animals"]
    assert all(np.isfinite(result[key]) for key in ("fid", "fd_clip", "clip_score"))
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == [f"{key}-vs-seconds-w2.png" for key in ("adherence", "clip_score", "fd_clip", "fid")]


def test_settings_request_grid_pairs_and_defaults():
    defaults = {"sampler": "dpm++", "num_inference_steps": 25, "guidance_scale": 7.5}
    assert SettingsRequest.from_lists().settings(defaults) == [Setting("dpm++", 25, 7.5)]
    grid = SettingsRequest.from_lists(["ddim", "ddpm"], [10, 20], [1, 3]).settings(defaults)
    assert len(grid) == 8 and grid[0] == Setting("ddim", 10, 1.0)
    study = SettingsRequest.from_lists(guidance=[3, 7.5], pairs=["ddpm:1000,250,50", "dpm++:20,10,5"])
    settings = study.settings(defaults)
    assert [(s.sampler, s.steps) for s in settings[::2]] == [("ddpm", 1000), ("ddpm", 250), ("ddpm", 50),
                                                             ("dpm++", 20), ("dpm++", 10), ("dpm++", 5)]
    assert settings[1].guidance == 7.5 and settings[1].name == "ddpm-1000-w7.5"
    assert Setting("dpm++", 5, 3.0).name == "dpmpp-5-w3"


def test_prompt_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# a comment\na cat on a sofa\n\na small red circle at the top\n")
    prompts = load_prompt_file(text)
    assert [(p.index, p.text, p.shapes) for p in prompts] == [(0, "a cat on a sofa", False),
                                                               (1, "a small red circle at the top", True)]
    assert prompts[1].categories == ("single", "position")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_prompt_file(bad)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompt_file(tmp_path / "empty.txt")


def test_out_dir_with_other_prompts_is_refused(tmp_path):
    prompts = shapes_eval_prompts(2)
    run = EvalRun(tmp_path, "model", [Setting("ddim", 2, 1.0)], prompts, [0], 32, 32)
    prepare_out_dir(run)
    prepare_out_dir(run)  # the same run again is fine
    other = EvalRun(tmp_path, "model", run.settings, shapes_eval_prompts(2, seed=5), [0], 32, 32)
    with pytest.raises(ValueError, match="out_dir .* different prompts"):
        prepare_out_dir(other)


def test_out_dir_errors_name_the_out_flag(sd_folder, tmp_path, capsys):
    prepare_out_dir(EvalRun(tmp_path, "another model", [Setting("ddim", 2, 1.0)], shapes_eval_prompts(3), [0], 32, 32))
    assert main(eval_args(sd_folder, tmp_path, "--settings", "ddim:2")) == 2
    error = capsys.readouterr().err
    assert "error: --out '" in error and "different model" in error
    assert main(["eval", "--report-only", "--out", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "error: --out '" in capsys.readouterr().err


class ShapesOracle:
    """A stand-in pipeline drawing the true Shapes image for known prompts and noise for the others."""

    device = torch.device("cpu")

    def __init__(self, truth):
        self.truth, self.calls = truth, 0

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompts, generator, height, width, **kwargs):
        self.calls += 1
        noise = np.random.default_rng(len(generator)).integers(0, 255, (height, width, 3), dtype=np.uint8)
        return type("Output", (), {"images": [self.truth.get(p, Image.fromarray(noise)) for p in prompts]})


def test_library_run_with_a_stand_in_pipeline_scores_saved_images(tmp_path):
    images, texts = shapes_pairs(5)
    truth = dict(zip(texts[:3], images[:3]))  # the last two prompts get noise
    prompts = [make_prompt(i, t) for i, t in enumerate(texts)]
    run = EvalRun(tmp_path, "oracle", [Setting("ddim", 4, 2.0)], prompts, [0, 1], 64, 64, batch_size=3)
    paths = report.run_evaluation(ShapesOracle(truth), run, progress=False)
    assert [p.name for p in paths[:2]] == ["report.md", "results.json"]
    (result,) = json.loads((tmp_path / "results.json").read_text())["results"]
    saved = [Image.open(tmp_path / j["file"]) for j in result["judgements"]]
    expected = score_images(saved, [j["prompt"] for j in result["judgements"]])
    assert result["shapes"]["overall"] == expected["overall"] == 0.6  # true images judged right, noise wrong
    assert result["timed_images"] == 10 and result["batches"] == 4  # two seeds × (3 + 2) prompts
    assert "| ddim 4 steps, w=2 |" in (tmp_path / "report.md").read_text()
    assert "0.600 (6/10)" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------- training-time metric


def shapes_pairs(n, size=64):
    examples = [shapes_example(i, size=size, seed=3) for i in range(n)]
    return [e["image"] for e in examples], [e["text"] for e in examples]


def test_shapes_adherence_metric_registered_and_correct():
    from latent_diffusion.training.validation import VALIDATION_METRICS, compute_metrics

    images, prompts = shapes_pairs(6)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    metric = VALIDATION_METRICS["shapes_adherence"]
    values = metric(images + [noise, noise], prompts + [prompts[0], "a cat on a sofa"])
    expected = score_images(images + [noise], prompts + [prompts[0]])  # the non-Shapes prompt is skipped
    assert values["adherence"] == expected["overall"] == 6 / 7
    assert all(values[f"adherence_{k}"] == expected[k] for k in ("single", "two_objects") if expected[k] is not None)
    assert metric([noise], ["a cat on a sofa"]) == {}
    assert compute_metrics(["shapes_adherence"], images, prompts)["validation/adherence"] == 1.0


def test_run_validation_logs_shapes_adherence(sd_folder, tmp_path):
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.training.args import check_args, parse_args
    from latent_diffusion.training.validation import run_validation

    args = parse_args(["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", str(tmp_path),
                       "--validation_metrics", "shapes_adherence"])
    assert check_args(args) == []
    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    _, metrics = run_validation(pipe, ["a red circle", "a cat on a sofa"], step=1, output_dir=str(tmp_path),
                                seed=0, num_inference_steps=2, guidance_scale=1.0, resolution=32,
                                metric_names=["shapes_adherence"])
    assert metrics["validation/adherence"] in (0.0, 1.0) and "validation/adherence_single" in metrics


# ---------------------------------------------------------------- plots


def test_ticks():
    assert linear_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert linear_ticks(-0.03, 1.03)[0] == 0 and linear_ticks(33, 61) == [35, 40, 45, 50, 55, 60]
    assert log_ticks(0.15, 50) == [0.2, 0.5, 1, 2, 5, 10, 20, 50]
    assert log_ticks(0.5, 500) == [1, 10, 100]


def test_line_chart_draws_each_series():
    series = [Series("ddpm", [(40.0, 0.8, "1000"), (2.0, 0.5, "50")]), Series("dpm++", [(0.2, 0.6, "5")])]
    chart = line_chart(series, "title", "seconds per image", "adherence", y_range=(0, 1))
    pixels = np.asarray(chart)
    for colour in [(31, 119, 180), (214, 39, 40)]:  # the first two palette colours: lines, markers, legend
        assert (pixels == colour).all(axis=-1).sum() > 50
    with pytest.raises(ValueError, match="at least one point"):
        line_chart([Series("x", [])], "t", "x", "y")


def test_atomic_writes_leave_no_temporary_files(grid_out):
    assert not [p for p in grid_out.rglob(".*.tmp")]
    assert not [p for p in grid_out.rglob(".*.tmp-*")]  # latent_diffusion.formats.atomic' temporary names
    assert not [p for p in grid_out.rglob("*") if p.name.endswith(".tmp")]
    assert os.path.isfile(grid_out / "run.json")
