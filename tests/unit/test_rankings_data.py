"""Ranked rows (docs/math.md §15): `responses` + `ranking` or `scores` → examples best first, bad rankings named by
file and row, the response-major m·B model batch, and m = 2 ranked rows ≡ pairs, example for example."""
from __future__ import annotations

import json

import pytest
import torch

from mixdpo_ds.training.batch import as_pairs, collate
from mixdpo_ds.training.data import DataConfig, load_preference_data
from mixdpo_ds.training.data_rows import BadRow, ranking_order

RANKED = [
    {"prompt": "Review:", "responses": [" ok film.", " great film!", " bad film."], "ranking": [1, 0, 2],
     "group": "a"},
    {"prompt": "Say hi.", "responses": [" Hi!", " Go away.", " Hello there."], "ranking": [2, 0, 1], "group": "b"},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tok, path, **kw):
    return load_preference_data(DataConfig(path=str(path), **kw), tok)


def decode(tok, ids):
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def test_ranking_order_from_ranking_or_scores():
    assert ranking_order(3, ranking=[2, 0, 1]) == [2, 0, 1]
    assert ranking_order(4, scores=[3.5, 1, 4, 2]) == [2, 0, 3, 1]  # higher score first
    for kwargs, reason, message in [
        ({"ranking": [0, 1]}, "bad_ranking", "'ranking' has 2 entries for 3 responses"),
        ({"ranking": [0, 1, 1]}, "bad_ranking", "repeats response index(es) [1]"),
        ({"ranking": [0, 1, 3]}, "bad_ranking", "permutation of 0..2"),
        ({"ranking": ["a", 1, 2]}, "bad_ranking", "list of response indices"),
        ({"scores": [1, 2]}, "bad_ranking", "one number per response (3), got 2 scores"),
        ({"scores": [1, None, 2]}, "bad_ranking", "must be numbers"),
        ({"scores": [5, 3, 5]}, "tied_scores", "tie at [5]"),
    ]:
        with pytest.raises(BadRow) as err:
            ranking_order(3, **kwargs)
        assert err.value.reason == reason and message in err.value.message


def test_ranked_rows_load_best_first(tmp_path, tiny_tokenizer):
    data = load(tiny_tokenizer, write_jsonl(tmp_path / "r.jsonl", RANKED))
    ex = data.train[0]
    assert [decode(tiny_tokenizer, ids) for ids in ex["response_ids"]] == \
        [" great film!<eos>", " ok film.<eos>", " bad film.<eos>"]
    assert ex["chosen_ids"] == ex["response_ids"][0] and ex["rejected_ids"] == ex["response_ids"][-1]
    assert decode(tiny_tokenizer, ex["prompt_ids"]) == "Review:"
    scored = [{**{k: v for k, v in r.items() if k != "ranking"},
               "scores": [[4, 9, 1], [2, 1, 7]][i]} for i, r in enumerate(RANKED)]
    by_scores = load(tiny_tokenizer, write_jsonl(tmp_path / "s.jsonl", scored))
    assert by_scores.train == data.train and data.group_vocab == {"a": 0, "b": 1}


def test_bad_rankings_name_file_and_row(tmp_path, tiny_tokenizer):
    rows = [RANKED[0], {**RANKED[1], "ranking": [2, 2, 1]}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: 'ranking' repeats response index\(es\) \[2\].*bad_ranking"):
        load(tiny_tokenizer, path)
    assert load(tiny_tokenizer, path, on_bad_row="skip").skipped == {"bad_ranking": 1}
    tied = [{**{k: v for k, v in r.items() if k != "ranking"}, "scores": [1, 1, 0]} for r in RANKED]
    with pytest.raises(ValueError, match=r"row 0: 'scores' \[1, 1, 0\] tie at \[1\].*tied_scores"):
        load(tiny_tokenizer, write_jsonl(tmp_path / "tied.jsonl", tied))
    same = [{**RANKED[0], "responses": [" a.", " b.", " a."]}]
    with pytest.raises(ValueError, match=r"row 0: responses\[0\] and responses\[2\] are identical"):
        load(tiny_tokenizer, write_jsonl(tmp_path / "same.jsonl", same), on_bad_row="error")


def test_every_row_ranks_the_same_number_and_one_order_column(tmp_path, tiny_tokenizer):
    rows = [RANKED[0], {"prompt": "Q?", "responses": [" yes.", " no."], "ranking": [0, 1]}]
    with pytest.raises(ValueError, match=r"row 1: ranks 2 responses, but row 0 ranks 3"):
        load(tiny_tokenizer, write_jsonl(tmp_path / "mixed.jsonl", rows))
    both = [{**r, "scores": [1, 2, 3]} for r in RANKED]
    with pytest.raises(ValueError, match=r"both order columns data.ranking_column='ranking' and "
                                         r"data.scores_column='scores'"):
        load(tiny_tokenizer, write_jsonl(tmp_path / "both.jsonl", both))
    assert len(load(tiny_tokenizer, write_jsonl(tmp_path / "both.jsonl", both), scores_column=None).train) == 2


def test_collate_is_response_major_and_as_pairs_reads_it(tmp_path, tiny_tokenizer):
    data = load(tiny_tokenizer, write_jsonl(tmp_path / "r.jsonl", RANKED))
    batch = collate(data.train, tiny_tokenizer.pad_token_id)
    B, m = 2, 3
    assert batch["input_ids"].shape[0] == m * B and batch["index"].tolist() == [0, 1]
    for j in range(m):
        for i, ex in enumerate(data.train):
            row = batch["labels"][j * B + i]
            assert row[row != -100].tolist() == ex["response_ids"][j]  # row j·B + i: item i, rank j
    x = torch.arange(m * B * 2).view(m * B, 2)
    assert as_pairs(x, B)[1, 2].tolist() == x[2 * B + 1].tolist()  # (B, m, K)[i, j] = row j·B + i
    with pytest.raises(ValueError, match="one number of responses per item"):
        collate([data.train[0], {**data.train[1], "response_ids": data.train[1]["response_ids"][:2]}], 0)


def test_m2_ranked_rows_are_the_pairs_exactly(tmp_path, tiny_tokenizer):
    pairs = [{"prompt": "Review:", "chosen": " great film!", "rejected": " bad film.", "group": "a"},
             {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Go away.", "group": "b"}]
    ranked = [{"prompt": r["prompt"], "responses": [r["rejected"], r["chosen"]], "ranking": [1, 0],
               "group": r["group"]} for r in pairs]
    a = load(tiny_tokenizer, write_jsonl(tmp_path / "p.jsonl", pairs)).train
    b = load(tiny_tokenizer, write_jsonl(tmp_path / "q.jsonl", ranked)).train
    assert [{k: v for k, v in ex.items() if k != "response_ids"} for ex in b] == a
    ca, cb = collate(a, tiny_tokenizer.pad_token_id), collate(b, tiny_tokenizer.pad_token_id)
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


def test_precomputed_reference_table_of_ranked_items(tmp_path, tiny_tokenizer, tiny_gpt2_dir):
    """train.reference=precompute: ranked items give a (n, m) table, column j the rank-j response's log-prob."""
    from mixdpo_ds.model.reference import FrozenReference, precompute_reference_logps

    data = load(tiny_tokenizer, write_jsonl(tmp_path / "r.jsonl", RANKED))
    ref = FrozenReference(tiny_gpt2_dir, logprob_impl="naive")
    pad = tiny_tokenizer.pad_token_id
    table = precompute_reference_logps(ref, data.train, lambda ex: collate(ex, pad), 2, None, None)
    assert table.shape == (2, 3)
    for ex in data.train:
        one = ref.logps(collate([ex], pad))  # (3,): rows are ranks 0, 1, 2 of this item
        torch.testing.assert_close(table[ex["index"]], one, atol=1e-5, rtol=0)
