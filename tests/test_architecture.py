"""docs/architecture.md's "one home" table names files and symbols that exist.

Each row's home is `path` `symbol` (a module-level name, or `Class.method`); the test parses the
table from the Markdown and looks every symbol up in its file's AST, without importing it.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
HEADING = "## One home per equation and per step"
HOME = re.compile(r"^`([^`]+\.py)` `([A-Za-z_][\w.]*)`$")
REQUIRED = ("β schedules", "ᾱ_t", "q_sample", "posterior mean μ̃", "posterior variance β̃", "λ (half log-SNR)",
            "Algorithm 1 loss", "min-SNR-γ", "Algorithm 2 (DDPM step)", "DDIM step", "DPM-Solver++ step",
            "classifier-free guidance", "guidance rescale", "latent scaling", "**pipeline:** tokenize",
            "**pipeline:** encode", "**pipeline:** CFG", "**pipeline:** sampler loop", "**pipeline:** VAE decode")


def home_rows(markdown: str) -> dict[str, tuple[str, str]]:
    """{row name: (path, symbol)} of the table under HEADING; a malformed home cell raises."""
    section = markdown.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("equation or step", "") or set(cells[0]) <= {"-"}:
            continue
        match = HOME.match(cells[1])
        if match is None:
            raise ValueError(f"row {cells[0]!r}: home must be `path` `symbol`, got {cells[1]!r}")
        rows[cells[0]] = (match.group(1), match.group(2))
    return rows


def defines(path: Path, symbol: str) -> bool:
    """Whether `symbol` (`name` or `Class.method`, any depth) is defined at module level of the file at `path`."""
    scope = ast.parse(path.read_text()).body
    for part in symbol.split("."):
        found = [node for node in scope if defined_name(node) == part]
        if not found:
            return False
        scope = getattr(found[0], "body", [])
    return True


def defined_name(node: ast.AST) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    return names[0] if names else None


ROWS = home_rows(DOC.read_text())


def test_the_table_names_every_seed_equation_and_pipeline_step():
    missing = [name for name in REQUIRED if name not in ROWS]
    assert not missing, f"docs/architecture.md's table lacks rows {missing}"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_home_exists(name):
    path, symbol = ROWS[name]
    assert (ROOT / path).is_file(), f"{name}: {path} does not exist"
    assert defines(ROOT / path, symbol), f"{name}: {path} does not define {symbol}"


def test_a_wrong_name_is_caught(tmp_path):
    """The checks themselves fail on a misspelt symbol, a missing method, a wrong path and a malformed cell."""
    gaussian = ROOT / "latent_diffusion/diffusion/gaussian.py"
    assert defines(gaussian, "q_sample") and not defines(gaussian, "q_sampel")
    losses = ROOT / "latent_diffusion/diffusion/losses.py"
    assert defines(losses, "DenoisingLoss.__call__") and not defines(losses, "DenoisingLoss.forward")
    assert not (ROOT / "latent_diffusion/gaussian.py").is_file()
    with pytest.raises(ValueError, match="home must be"):
        home_rows(f"{HEADING}\n\n| equation or step | home | what |\n|---|---|---|\n| q | gaussian.q_sample | x |\n")
