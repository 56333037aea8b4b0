"""Building blocks of the ZeRO-3 reference (model/reference.py, training/build.py): the shares of a precompute run
by all ranks together, and the engine config of a separate reference. The all-rank precompute itself:
tests/distributed/test_precompute_all_ranks.py; the trainer under ZeRO-3: tests/distributed/test_reference_zero3.py."""
import pytest

from mixdpo_ds.model.reference import shard_positions
from mixdpo_ds.training.build import reference_ds_config


@pytest.mark.parametrize(("n", "world"), [(7, 2), (8, 2), (1, 2), (5, 3), (2, 4), (9, 1)])
def test_shards_cover_every_example_once_with_equal_lengths(n, world):
    shares = [shard_positions(n, r, world) for r in range(world)]
    owned = sorted(p for positions, num_own in shares for p in positions[:num_own])
    assert owned == list(range(n))                                   # each example has exactly one owner
    assert {len(positions) for positions, _ in shares} == {-(-n // world)}   # every rank runs as many forwards
    for positions, num_own in shares:                                # the padding repeats an example: no new rows
        assert set(positions) <= set(range(n)) and len(set(positions)) == max(num_own, 1)


def test_hand_computed_shares():
    assert shard_positions(7, 0, 2) == ([0, 2, 4, 6], 4)
    assert shard_positions(7, 1, 2) == ([1, 3, 5, 5], 3)
    assert shard_positions(1, 1, 2) == ([0], 0)


def test_reference_engine_config_is_the_policys_without_optimizer():
    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "gradient_clipping": 0.0}
    ref = reference_ds_config(ds)
    assert ref == {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
    ref["zero_optimization"]["stage"] = 0
    assert ds["zero_optimization"]["stage"] == 3                     # a copy: the policy's config is untouched
    with pytest.raises(ValueError, match="stage 3"):
        reference_ds_config({"zero_optimization": {"stage": 2}})
