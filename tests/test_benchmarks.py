"""The benchmarks' code paths on the CPU with tiny sizes: benchmarks/gpu_suite.py in --dry-run mode, bench_train_step.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
# Outside the repository: present only beside the project's own checkout. LATENT_DIFFUSION_PEERS points elsewhere
# (test_out_of_repository_tests_skip_with_a_reason points it at an empty folder).
PEERS = Path(os.environ.get("LATENT_DIFFUSION_PEERS", ROOT.parent / "shared" / "peers"))
PEER_FILES = [PEERS / "run_peer.py", PEERS / "diffusers" / "train_text_to_image.py"]
needs_peers = pytest.mark.skipif(not all(p.is_file() for p in PEER_FILES),
                                 reason=f"needs the diffusers peer outside the repository ({PEERS}/run_peer.py)")


def dry_run(out: Path, *flags: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out),
                           *flags], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text())


def check_parts(results: dict, names: list[str]) -> None:
    assert [p["part"] for p in results["parts"]] == names
    for part in results["parts"]:
        assert "error" not in part, part
        assert part["ours"] > 0 and part["diffusers"] > 0
        assert part["ratio"] == pytest.approx(part["ours"] / part["diffusers"])


INFERENCE = ["inference float32", "inference float32 compiled", "inference bfloat16", "inference bfloat16 compiled"]


def test_suite_records_results_errors_and_skips(tmp_path):
    from gpu_suite import Suite

    suite = Suite(str(tmp_path), budget=3600, settings={"dry": True})
    suite.run("fine", lambda: dict(ours=1.0, diffusers=2.0, ratio=0.5, unit="s/image"))
    suite.run("broken", lambda: 1 / 0)
    suite.budget = -1
    suite.run("late", lambda: dict(ours=1.0, diffusers=1.0, ratio=1.0, unit="s/image"))
    parts = json.loads((tmp_path / "gpu_suite.json").read_text())["parts"]
    assert [p["part"] for p in parts] == ["fine", "broken", "late"]
    assert parts[0]["ratio"] == 0.5 and "ZeroDivisionError" in parts[1]["error"] and "budget" in parts[2]["skipped"]
    assert "| fine | 1.0000 s/image | 2.0000 s/image | **0.50** |" in (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.slow
def test_gpu_suite_dry_run_inference(tmp_path):
    results = dry_run(tmp_path, "--skip-training")
    check_parts(results, INFERENCE)
    assert "| inference bfloat16 compiled |" in (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.slow
@needs_peers
def test_gpu_suite_dry_run_with_training_against_the_peer(tmp_path):
    results = dry_run(tmp_path)
    check_parts(results, INFERENCE + ["training"])


def test_out_of_repository_tests_skip_with_a_reason(tmp_path):
    """Issue 31: a clone without ../shared/peers skips the peer test, naming what it needs, instead of failing."""
    env = {**os.environ, "LATENT_DIFFUSION_PEERS": str(tmp_path / "absent")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           f"{Path(__file__)}::test_gpu_suite_dry_run_with_training_against_the_peer"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "SKIPPED [1]" in done.stdout and "needs the diffusers peer outside the repository" in done.stdout
    assert str(tmp_path / "absent") in done.stdout


def test_bench_train_step_times_each_option_and_rejects_unknown_ones():
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), "--rounds", "1", "--steps", "1",
             "--batch_size", "2", "--threads", "1"]
    done = subprocess.run([*bench, "--options", "fp32,bf16,channels_last"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == ["| fp32", "| bf16", "| channels_last"]
    assert rows[0].split(" | ")[2] == "1.00x"
    bad = subprocess.run([*bench, "--options", "fp32,fp8"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--options" in bad.stderr and "fp8" in bad.stderr
