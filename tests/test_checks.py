"""The shared argument checks and the atomic writer."""
import math

import pytest

from latent_diffusion.checks import check_choice, check_finite, check_int
from latent_diffusion.formats.atomic import atomic_write, write_text_atomic


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1", None, True])
def test_check_finite_refuses_non_numbers_naming_the_argument(value):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        check_finite("guidance_scale", value)


def test_check_finite_bounds():
    assert check_finite("eta", 0.5, 0, 1) == 0.5
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0 <= 1, got 2"):
        check_finite("eta", 2, 0, 1)


@pytest.mark.parametrize("value", [0, -3, 2.0, "4", False])
def test_check_int_refuses(value):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        check_int("steps", value)


def test_check_choice():
    assert check_choice("sampler", "ddim", ("ddim",)) == "ddim"
    with pytest.raises(ValueError, match=r"sampler must be one of \('ddim',\), got 'x'"):
        check_choice("sampler", "x", ("ddim",))


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_text_atomic(target, "one")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]
