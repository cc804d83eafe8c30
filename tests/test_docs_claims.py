"""The default model's adherence figures, as the README, the model card and docs/default_model.md quote them,
are the numbers in `latent_diffusion/default_model/recipe_metrics.json` (what the recipe measured)."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "latent_diffusion" / "default_model"
METRICS = json.loads((MODEL / "recipe_metrics.json").read_text())
CATEGORIES = ("overall", "single", "position", "two_objects", "background", "held_out")


def test_readme_headline_quotes_the_measured_adherence_and_speed():
    text = " ".join((ROOT / "README.md").read_text().split())  # line breaks as spaces
    found = re.search(
        r"a strict Shapes adherence of (\d\.\d+) on (\d+) held-in prompts \(single objects (\d\.\d+), "
        r"positions (\d\.\d+), two-object relations (\d\.\d+), backgrounds (\d\.\d+); "
        r"held-out colour–shape pairs (\d\.\d+)\)", text)
    assert found, "the README's adherence sentence changed form; update this test with it"
    overall, count, *rest = found.groups()
    quoted = dict(zip(CATEGORIES, [overall, *rest]))
    for key, value in quoted.items():
        assert float(value) == round(METRICS["adherence"][key], len(value) - 2), key
    assert int(count) == METRICS["adherence_counts"]["overall"]
    seconds = re.search(r"\((\d\.\d+) s per image at its default (\d+) (\w+) steps", text)
    assert float(seconds.group(1)) == round(METRICS["seconds_one_image"], 2)
    assert int(seconds.group(2)) == METRICS["generation_defaults"]["num_inference_steps"]
    assert seconds.group(3).lower() == METRICS["generation_defaults"]["sampler"]


def test_model_card_table_is_the_measured_adherence():
    card = (MODEL / "README.md").read_text()
    table = card.split("## Adherence", 1)[1].split("```")[1]
    rows = {line.split()[0]: line.split()[1:] for line in table.strip().splitlines()[1:]}
    assert set(rows) == set(CATEGORIES)
    for key in CATEGORIES:
        accuracy, correct, count = rows[key]
        assert float(accuracy) == round(METRICS["adherence"][key], 3), key
        assert int(count) == METRICS["adherence_counts"][key], key
        assert int(correct) == round(METRICS["adherence"][key] * METRICS["adherence_counts"][key]), key
    assert f"{METRICS['eval_prompts']} prompts of `evaluation_prompts(seed=2)`" in card


@pytest.mark.parametrize("row, key", [
    ("overall (held-in)", "overall"), ("single object", "single"), ("position", "position"),
    ("two objects", "two_objects"), ("background", "background"), ("held-out pairs", "held_out")])
def test_default_model_doc_table_is_the_measured_adherence(row, key):
    doc = (ROOT / "docs" / "default_model.md").read_text()
    line = next(line for line in doc.splitlines() if line.startswith(f"| {row} |"))
    cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
    assert float(cells[1]) == round(METRICS["adherence"][key], 3)  # "this model" column
    assert int(cells[-1]) == METRICS["adherence_counts"][key]  # "prompts" column


def test_docs_say_the_shipped_model_was_not_one_run_of_the_recipe():
    readme = " ".join((ROOT / "README.md").read_text().split())
    card = " ".join((MODEL / "README.md").read_text().split())
    doc = " ".join((ROOT / "docs" / "default_model.md").read_text().split())
    assert "four resumed rounds" in readme and "have never run end to end" in readme
    assert "One command, from nothing" not in card and "not in one run of it" in card
    assert "never run end to end" in card and "never run end to end" in doc
    for text in (readme, card, doc):
        assert "grammar-aware" in text or "knows the Shapes grammar" in text
