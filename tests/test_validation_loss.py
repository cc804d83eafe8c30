"""training/validation_loss.py: the seeded held-out split, a loss that only the model changes, and a 2-step run
that never trains on held-out rows and logs val/loss."""
import re

import pytest
import torch

from latent_diffusion.training.validation_loss import held_out_loss, split_rows
from test_masked_loss import write_rgba
from test_dreambooth import run


def test_split_is_seeded_disjoint_and_at_least_one():
    rows = list(range(40))
    train, held = split_rows(rows, 0.05, seed=3)
    assert len(held) == 2 and not set(train) & set(held) and sorted(train + held) == rows
    assert split_rows(rows, 0.05, seed=3) == (train, held) and split_rows(rows, 0.05, seed=4)[1] != held
    assert len(split_rows(list(range(5)), 0.01, seed=0)[1]) == 1
    assert split_rows(rows, 0.0, seed=0) == (rows, [])
    with pytest.raises(ValueError, match=r"--validation_split 0.9 would hold out all 2 usable"):
        split_rows([0, 1], 0.9, seed=0)


def test_held_out_loss_uses_the_same_draws_every_time():
    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, item):
            assert item[1] == 0  # held-out samples always come from epoch 0
            return {"index": item[0]}

    def noisy_loss(batch, generator):  # a "model" whose loss depends on the drawn noise only
        return torch.rand((), generator=generator) + batch["index"].float().mean()

    first = held_out_loss(noisy_loss, Samples(), [0, 2, 4], 2, None, seed=1)
    assert first == held_out_loss(noisy_loss, Samples(), [0, 2, 4], 2, None, seed=1)
    assert first != held_out_loss(noisy_loss, Samples(), [0, 2, 4], 2, None, seed=2)


def test_two_steps_with_a_held_out_split(sd_folder, tmp_path, caplog):
    caplog.set_level("INFO")
    data = write_rgba(tmp_path / "d", 8)
    run(sd_folder, tmp_path / "out", "--train_data_dir", str(data), "--validation_split", "0.25",
        "--validation_steps", "1", "--max_train_steps", "2", "--train_batch_size", "2", "--masked_loss",
        "--sample_index_log", str(tmp_path / "rows"))
    losses = [float(v) for v in re.findall(r"held-out loss ([0-9.]+) over 2 images", caplog.text)]
    assert len(losses) == 2 and all(v > 0 for v in losses)
    trained = {int(r) for line in (tmp_path / "rows.rank0").read_text().splitlines()
               if not line.startswith("weights") for r in line.split()[1:]}
    held = set(split_rows(list(range(8)), 0.25, seed=3)[1])
    assert len(trained) == 4 and not trained & held
