"""mixdpo_ds.training.batch.collate (the model batch) and batches (deterministic, sharded, resumable order)."""
import pytest
import torch

from mixdpo_ds.training.batch import batches, collate, num_batches

PAD = 0


def ex(prompt, chosen, rejected, index, user=-1, group=-1):
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "index": index, "user": user,
            "group": group}


def test_collate_by_hand():
    """Pair 0: prompt [5, 6], chosen [7], rejected [8, 9, 1]; pair 1: prompt [4], chosen [3, 1], rejected [2].
    Rows: chosen 0, chosen 1, rejected 0, rejected 1; lengths 3, 3, 5, 2 → T = 5."""
    b = collate([ex([5, 6], [7], [8, 9, 1], 10, user=2), ex([4], [3, 1], [2], 11, group=1)], PAD)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [4, 3, 1, 0, 0], [5, 6, 8, 9, 1], [4, 2, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    m = -100
    assert b["labels"].tolist() == [[m, m, 7, m, m], [m, 3, 1, m, m], [m, m, 8, 9, 1], [m, 2, m, m, m]]
    assert b["prompt_last_index"].tolist() == [1, 0, 1, 0]
    assert b["user_ids"].tolist() == [2, -1] and b["group_ids"].tolist() == [-1, 1]
    assert b["index"].tolist() == [10, 11]
    assert set(b) == {"input_ids", "attention_mask", "labels", "prompt_last_index", "user_ids", "group_ids", "index"}
    assert all(v.dtype == torch.long for v in b.values())


def test_collate_labels_survive_pad_equal_to_eos():
    """pad id = eos id = 1: labels come from lengths, so the real EOS stays a label and padding does not."""
    e0, e1 = ex([5], [7, 1], [8, 1], 0), ex([5], [7, 7, 1], [8, 1], 1)
    b = collate([e0, e1], pad_token_id=1)
    assert b["labels"][0].tolist() == [-100, 7, 1, -100] and b["input_ids"][0].tolist() == [5, 7, 1, 1]
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([e0], None)


DATA = [ex([i], [i + 100], [i + 200], i) for i in range(23)]


def order(it):
    return [[e["index"] for e in b] for b in it]


def test_batches_deterministic_per_seed_and_epoch():
    a = order(batches(DATA, 4, seed=0, epoch=0))
    assert a == order(batches(DATA, 4, seed=0, epoch=0))
    assert a != order(batches(DATA, 4, seed=0, epoch=1)) and a != order(batches(DATA, 4, seed=1, epoch=0))
    assert len(a) == 5 == num_batches(23, 4) and all(len(b) == 4 for b in a)  # 23 // 4 = 5, last 3 dropped
    flat = sum(a, [])
    assert len(set(flat)) == 20 and sorted(flat) != flat  # shuffled, no repeats
    assert [len(b) for b in batches(DATA, 4, 0, 0, drop_last=False)] == [4, 4, 4, 4, 4, 3]


def test_batches_resume_from_a_position_equals_uninterrupted():
    full = order(batches(DATA, 3, seed=5, epoch=2))
    assert order(batches(DATA, 3, seed=5, epoch=2, start=4)) == full[4:]
    assert order(batches(DATA, 3, seed=5, epoch=2, start=len(full))) == []


def test_batches_shard_ranks_disjointly():
    """2 ranks × 3 = 6 pairs per step, 23 // 6 = 3 steps; rank r takes block r of each step."""
    r0 = order(batches(DATA, 3, seed=0, epoch=0, rank=0, world_size=2))
    r1 = order(batches(DATA, 3, seed=0, epoch=0, rank=1, world_size=2))
    single = order(batches(DATA, 6, seed=0, epoch=0))
    assert len(r0) == len(r1) == 3 == num_batches(23, 3, world_size=2)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == single
    with pytest.raises(ValueError, match="drop_last=False"):
        list(batches(DATA, 3, 0, 0, rank=0, world_size=2, drop_last=False))
