"""mixdpo_ds.training.data: sources and formats, bad rows, HH-RLHF transcripts, splits, vocabularies, fingerprint."""
import gzip
import json

import pandas as pd
import pytest

from mixdpo_ds.training.data import DataConfig, load_preference_data

HH_SAMPLE = "hh_rlhf_relabeled_sample.jsonl"

ROWS = [
    {"prompt": "How do I bake bread?", "chosen": " Mix flour and water.", "rejected": " No idea.", "user": 7,
     "group": "a"},
    {"prompt": "Best book?", "chosen": " A mystery novel.", "rejected": " Nothing.", "user": 3, "group": "b"},
    {"prompt": "Is it raining?", "chosen": " Yes, take a coat.", "rejected": " Maybe.", "user": 7, "group": "a"},
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Go away.", "user": None, "group": None},
]


def write(path, rows, fmt=None):
    """Write rows as .json (array), .jsonl, .jsonl.gz, .csv or .parquet, chosen by the file name."""
    fmt = fmt or path.name.split(".", 1)[1]
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    return str(path)


def load(tok, path, **kw):
    return load_preference_data(DataConfig(path=str(path), **kw), tok)


def decode(tok, ids):
    return tok.decode(ids, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kw, key", [
    ({"on_bad_row": "drop"}, "data.on_bad_row='drop': allowed values are 'error', 'skip'"),
    ({"eval_fraction": 1.0}, "data.eval_fraction=1.0: must be in [0, 1)"),
    ({"eval_fraction": 0.1, "eval_path": "x.jsonl"}, "cannot be combined with data.eval_path"),
    ({"max_prompt_length": 600}, "data.max_prompt_length=600: must be an integer in [1, data.max_length=512]"),
    ({"max_length": 1}, "data.max_length=1"),
    ({"max_rows": 0}, "data.max_rows=0"),
    ({"chosen_column": "x", "rejected_column": "x"}, "must be distinct"),
    ({"path": 3}, "data.path=3"),
])
def test_config_errors_name_key_and_allowed_values(kw, key):
    with pytest.raises(ValueError) as e:
        DataConfig(**{"path": "d.jsonl", **kw})
    assert key in str(e.value)


# --------------------------------------------------------------------------------------- sources, formats
@pytest.mark.parametrize("fmt", ["json", "jsonl", "jsonl.gz", "csv", "parquet"])
def test_every_file_format_loads_the_same_examples(tmp_path, tiny_tokenizer, fmt):
    ref = load(tiny_tokenizer, write(tmp_path / "ref.jsonl", ROWS))
    got = load(tiny_tokenizer, write(tmp_path / f"d.{fmt}", ROWS))
    assert got.train == ref.train and len(got.train) == 4
    assert got.user_vocab == ref.user_vocab == {"3": 0, "7": 1}  # csv reads users 7, 3, 7, None as floats
    ex = ref.train[0]
    assert decode(tiny_tokenizer, ex["prompt_ids"]) == "How do I bake bread?"
    assert decode(tiny_tokenizer, ex["chosen_ids"]) == " Mix flour and water.<eos>"
    assert ex["rejected_ids"][-1] == tiny_tokenizer.eos_token_id


def test_directory_and_split_name(tmp_path, tiny_tokenizer):
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "train.jsonl", ROWS[:3])
    write(tmp_path / "d" / "test.jsonl", ROWS[3:])
    data = load(tiny_tokenizer, tmp_path / "d", eval_split="test")
    assert [e["index"] for e in data.train] == [0, 1, 2] and [e["index"] for e in data.eval] == [0]
    with pytest.raises(ValueError, match=r"data.path=.*split 'validation'"):
        load(tiny_tokenizer, tmp_path / "d", split="validation")


def test_missing_path_and_unknown_file_type(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="data.path is not set"):
        load(tiny_tokenizer, "")
    with pytest.raises(FileNotFoundError, match="data.path=.*no such file"):
        load(tiny_tokenizer, tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown file type; allowed: \.json, \.jsonl, \.csv, \.parquet"):
        load(tiny_tokenizer, tmp_path / "d.txt")


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_missing_column_is_an_error_in_both_modes(tmp_path, tiny_tokenizer, on_bad_row):
    path = write(tmp_path / "d.jsonl", [{k: v for k, v in r.items() if k != "rejected"} for r in ROWS])
    with pytest.raises(ValueError, match=r"column 'rejected' \(data.rejected_column\) not found; columns: "
                                         r"\['prompt', 'chosen', 'user', 'group'\]"):
        load(tiny_tokenizer, path, on_bad_row=on_bad_row)
    # an optional column under a name the user chose must exist too
    with pytest.raises(ValueError, match=r"column 'annotator' \(data.user_column\) not found"):
        load(tiny_tokenizer, write(tmp_path / "e.jsonl", ROWS), user_column="annotator", on_bad_row=on_bad_row)


# -------------------------------------------------------------------------------------------- bad rows
BAD = {  # reason: (change to row 2, message, config)
    "missing_value": ({"chosen": None}, "'chosen' is missing (None)", {}),
    "empty_response": ({"rejected": "   "}, "'rejected' is empty", {}),
    "chosen_equals_rejected": ({"chosen": " Same.", "rejected": " Same."}, "identical", {}),
    "empty_prompt": ({"prompt": ""}, "the prompt is empty", {}),
    "no_room": ({"prompt": "word " * 40}, "leaves no room for a response within data.max_length=16",
                {"max_length": 16, "max_prompt_length": 16}),
    # the tiny tokenizer splits every prompt of ROWS into 7 tokens: room 10 - 7 = 3 tokens, shared by both
    "identical_after_truncation": ({"chosen": " Mix flour and water, then bake", "rejected": " Mix flour and water, "
                                    "then wait"}, "identical in their first 3 tokens",
                                   {"max_length": 10, "max_prompt_length": 9}),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_row_kind_errors_with_file_row_and_reason(tmp_path, tiny_tokenizer, reason):
    change, message, kw = BAD[reason]
    rows = [dict(r) for r in ROWS]
    rows[2].update(change)
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load(tiny_tokenizer, path, **kw)
    assert f"data.path={path} row 2: " in str(e.value) and message in str(e.value) and reason in str(e.value)
    data = load(tiny_tokenizer, path, on_bad_row="skip", **kw)
    assert data.skipped == {reason: 1}
    assert [e["index"] for e in data.train] == [0, 1, 3]


def test_empty_response_after_removing_the_prompt(tmp_path, tiny_tokenizer):
    rows = [dict(r) for r in ROWS]
    rows[1]["chosen"] = rows[1]["prompt"]  # an HH-style transcript with nothing after the prompt
    with pytest.raises(ValueError, match=r"row 1: 'chosen' is empty after removing the prompt"):
        load(tiny_tokenizer, write(tmp_path / "d.jsonl", rows))


def test_chunked_tokenisation_matches_one_chunk(tmp_path, tiny_tokenizer, monkeypatch):
    rows = [dict(r) for r in ROWS] * 2
    rows[4] = {**rows[4], "chosen": ""}
    path = write(tmp_path / "d.jsonl", rows)
    whole = load(tiny_tokenizer, path, on_bad_row="skip")
    monkeypatch.setattr("mixdpo_ds.training.data._CHUNK", 3)  # chunks [0..2], [3..5], [6, 7]
    assert load(tiny_tokenizer, path, on_bad_row="skip") == whole
    assert [e["index"] for e in whole.train] == [0, 1, 2, 3, 5, 6, 7] and whole.skipped == {"empty_response": 1}


def test_skip_mode_counts_several_reasons(tmp_path, tiny_tokenizer):
    rows = [dict(r) for r in ROWS] * 2  # rows 0..7
    rows[0] = {**rows[0], "chosen": ""}
    rows[5] = {**rows[5], "rejected": rows[5]["chosen"]}
    rows[6] = {**rows[6], "prompt": None}
    rows[7] = {**rows[7], "chosen": ""}
    data = load(tiny_tokenizer, write(tmp_path / "d.jsonl", rows), on_bad_row="skip")
    assert data.skipped == {"empty_response": 2, "chosen_equals_rejected": 1, "missing_value": 1}
    assert [e["index"] for e in data.train] == [1, 2, 3, 4]
    rows = [{**r, "chosen": ""} for r in ROWS]
    with pytest.raises(ValueError, match=r"no usable rows \(skipped: \{'empty_response': 4\}\)"):
        load(tiny_tokenizer, write(tmp_path / "e.jsonl", rows), on_bad_row="skip")


# ----------------------------------------------------------------------------------------- HH-RLHF data
def test_hh_transcripts_prompt_stripped_and_derived_agree(test_data_dir, tiny_tokenizer):
    """The copied real data loads as it is: responses are the final assistant turns, prompts end with the
    assistant header, and deriving the prompt (no prompt column) gives the same examples."""
    path = test_data_dir / HH_SAMPLE
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    with_col = load(tiny_tokenizer, path, group_column="objective", max_length=1024, max_prompt_length=1000)
    derived = load(tiny_tokenizer, path, group_column="objective", prompt_column=None, max_length=1024,
                   max_prompt_length=1000)
    assert with_col.train == derived.train and len(with_col.train) == 120 and with_col.skipped == {}
    assert with_col.group_vocab == {"harmless": 0, "helpful": 1} and with_col.user_vocab == {}
    for ex in with_col.train:
        r = raw[ex["index"]]
        assert decode(tiny_tokenizer, ex["prompt_ids"]) == r["prompt"] + "\n\nAssistant:"
        assert decode(tiny_tokenizer, ex["chosen_ids"]) == " " + r["responses"][r["label"]] + "<eos>"
        assert decode(tiny_tokenizer, ex["rejected_ids"]) == " " + r["responses"][1 - r["label"]] + "<eos>"
        assert ex["group"] == with_col.group_vocab[r["objective"]] and ex["user"] == -1
    assert sorted(ex["group"] for ex in with_col.train) == [0] * 60 + [1] * 60


def test_no_prompt_column_without_assistant_turn_is_a_bad_row(tmp_path, tiny_tokenizer):
    rows = [{"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: go"},
            {"chosen": "plain text", "rejected": "other text"}]
    with pytest.raises(ValueError, match=r"row 1: no prompt column, and 'chosen' / 'rejected' share no"):
        load(tiny_tokenizer, write(tmp_path / "d.jsonl", rows))
    data = load(tiny_tokenizer, tmp_path / "d.jsonl", on_bad_row="skip")
    assert data.skipped == {"no_prompt": 1}
    assert decode(tiny_tokenizer, data.train[0]["prompt_ids"]) == "Human: hi\n\nAssistant:"
    assert decode(tiny_tokenizer, data.train[0]["chosen_ids"]) == " hello<eos>"


# ------------------------------------------------------------------------------------------ truncation
def test_loader_truncates_prompt_from_the_left_and_keeps_a_response_token(tmp_path, tiny_tokenizer):
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    rows = [{"prompt": prompt, "chosen": " " + "yes " * 30, "rejected": " no"}]
    data = load(tiny_tokenizer, write(tmp_path / "d.jsonl", rows), max_length=12, max_prompt_length=11)
    ex = data.train[0]
    full_prompt = tiny_tokenizer(prompt)["input_ids"]
    assert len(full_prompt) > 11 and ex["prompt_ids"] == full_prompt[-11:]
    assert ex["chosen_ids"] == tiny_tokenizer(" yes")["input_ids"][:1]  # 12 - 11 = 1 token left
    assert len(ex["rejected_ids"]) == 1


# ------------------------------------------------------------------------------ splits, vocabs, subsets
def test_eval_fraction_split_is_seeded_disjoint_and_complete(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": " No."} for i in range(20)]
    path = write(tmp_path / "d.jsonl", rows)
    a = load(tiny_tokenizer, path, eval_fraction=0.25, seed=3)
    b = load(tiny_tokenizer, path, eval_fraction=0.25, seed=3)
    c = load(tiny_tokenizer, path, eval_fraction=0.25, seed=4)
    ids = lambda d: ([e["index"] for e in d.train], [e["index"] for e in d.eval])  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    train, held = ids(a)
    assert len(held) == 5 and sorted(train + held) == list(range(20)) and train == sorted(train)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_eval_path_and_max_rows_subset(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": " No."} for i in range(20)]
    path = write(tmp_path / "d.jsonl", rows)
    data = load(tiny_tokenizer, path, eval_path=write(tmp_path / "e.csv", ROWS), max_rows=6, seed=1)
    idx = [e["index"] for e in data.train]
    assert len(idx) == 6 and idx == sorted(idx) and idx != list(range(6))  # a random subset, in source order
    assert idx == [e["index"] for e in load(tiny_tokenizer, path, max_rows=6, seed=1).train]
    assert [e["index"] for e in data.eval] == [0, 1, 2, 3]


def test_user_and_group_vocabularies(tmp_path, tiny_tokenizer):
    """users 7, 3, 7, None → vocab {'3': 0, '7': 1} (numbers sorted numerically), None → -1."""
    data = load(tiny_tokenizer, write(tmp_path / "d.jsonl", ROWS))
    assert data.user_vocab == {"3": 0, "7": 1} and data.group_vocab == {"a": 0, "b": 1}
    assert [e["user"] for e in data.train] == [1, 0, 1, -1]
    assert [e["group"] for e in data.train] == [0, 1, 0, -1]
    rows = [{**r, "user": u} for r, u in zip(ROWS, ["u10", "u9", "10", "9"], strict=True)]
    data = load(tiny_tokenizer, write(tmp_path / "e.jsonl", rows))
    assert data.user_vocab == {"9": 0, "10": 1, "u10": 2, "u9": 3}


def test_fingerprint_stable_and_sensitive(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "d.jsonl", ROWS)
    fp = load(tiny_tokenizer, path).fingerprint
    copy = write(tmp_path / "copy.jsonl", ROWS)
    assert load(tiny_tokenizer, path).fingerprint == fp == load(tiny_tokenizer, copy).fingerprint
    assert load(tiny_tokenizer, path, max_length=256).fingerprint != fp
    write(tmp_path / "d.jsonl", ROWS[:3])
    assert load(tiny_tokenizer, path).fingerprint != fp


def test_tiny_prefs_fixture_loads_with_users_and_groups(test_data_dir, tiny_tokenizer):
    data = load(tiny_tokenizer, test_data_dir / "tiny_prefs.jsonl", max_length=64, max_prompt_length=32)
    assert len(data.train) == 24 and data.skipped == {}
    assert data.user_vocab == {"u0": 0, "u1": 1, "u2": 2, "u3": 3} and data.group_vocab == {"neg": 0, "pos": 1}
    assert [e["group"] for e in data.train[:4]] == [1, 1, 0, 0]
    assert max(len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in data.train) <= 64
