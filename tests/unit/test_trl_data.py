"""TRL's dataset formats (implicit prompt, conversational), load_from_disk folders, hub loading arguments, and the
cached Dataset.map tokenisation (a second load tokenises nothing; num_proc gives the same examples)."""
from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict

from mixdpo_ds.training import data as data_mod
from mixdpo_ds.training.data import DataConfig, load_preference_data

SKY = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
       {"chosen": "The sun is in the sky.", "rejected": "The sun is in the sea."}]
CHAT = [{"chosen": [{"role": "user", "content": "What color is the sky?"},
                    {"role": "assistant", "content": "It is blue."}],
         "rejected": [{"role": "user", "content": "What color is the sky?"},
                      {"role": "assistant", "content": "It is green."}]},
        {"chosen": [{"role": "user", "content": "Where is the sun?"}, {"role": "assistant", "content": "In the sky."}],
         "rejected": [{"role": "user", "content": "Where is the sun?"},
                      {"role": "assistant", "content": "In the sea."}]}]


def saved(tmp_path, rows, name="ds") -> str:
    path = str(tmp_path / name)
    Dataset.from_list(rows).save_to_disk(path)
    return path


def text(tok, ids) -> str:
    return tok.decode(ids)


def test_implicit_prompt_strings_split_as_trl_does(tmp_path, tiny_tokenizer):
    from trl.data_utils import extract_prompt

    data = load_preference_data(DataConfig(path=saved(tmp_path, SKY), max_length=64), tiny_tokenizer)
    for ex, row in zip(data.train, SKY, strict=True):
        trl = extract_prompt(row)
        assert text(tiny_tokenizer, ex["prompt_ids"]) == trl["prompt"]
        assert text(tiny_tokenizer, ex["chosen_ids"]) == trl["chosen"] + "<eos>"
        assert text(tiny_tokenizer, ex["rejected_ids"]) == trl["rejected"] + "<eos>"


def test_conversational_formats_implicit_and_explicit(tmp_path, tiny_tokenizer):
    from trl.data_utils import extract_prompt

    implicit = load_preference_data(DataConfig(path=saved(tmp_path, CHAT, "a"), max_length=64), tiny_tokenizer)
    explicit_rows = [extract_prompt(r) for r in CHAT]  # TRL's explicit-prompt conversational form
    explicit = load_preference_data(DataConfig(path=saved(tmp_path, explicit_rows, "b"), max_length=64),
                                    tiny_tokenizer)
    for a, b, row in zip(implicit.train, explicit.train, explicit_rows, strict=True):
        assert (a["prompt_ids"], a["chosen_ids"], a["rejected_ids"]) == \
            (b["prompt_ids"], b["chosen_ids"], b["rejected_ids"])
        prompt = tiny_tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert text(tiny_tokenizer, a["prompt_ids"]) == prompt
        assert text(tiny_tokenizer, a["chosen_ids"]) == row["chosen"][0]["content"] + "<eos>\n"


def test_load_from_disk_dataset_dict_splits_and_slices(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(6)]
    path = str(tmp_path / "dd")
    DatasetDict({"train": Dataset.from_list(rows[:4]), "test": Dataset.from_list(rows[4:])}).save_to_disk(path)
    data = load_preference_data(DataConfig(path=path, split="train[:3]", eval_split="test", max_length=32),
                                tiny_tokenizer)
    assert [text(tiny_tokenizer, e["prompt_ids"]) for e in data.train] == ["Q0:", "Q1:", "Q2:"]
    assert [text(tiny_tokenizer, e["prompt_ids"]) for e in data.eval] == ["Q4:", "Q5:"]
    with pytest.raises(ValueError, match="no split 'validation'; the saved dataset's splits: \\['test', 'train'\\]"):
        load_preference_data(DataConfig(path=path, split="validation", max_length=32), tiny_tokenizer)


def test_bad_rows_keep_naming_the_source_row_and_reason(tmp_path, tiny_tokenizer):
    rows = [*SKY, {"chosen": "plain text", "rejected": "other text"}]
    path = saved(tmp_path, rows)
    with pytest.raises(ValueError, match=r"data.path=.* row 2: no prompt column, .*\[no_prompt; set data.on_bad_row"):
        load_preference_data(DataConfig(path=path, max_length=64), tiny_tokenizer)
    data = load_preference_data(DataConfig(path=path, max_length=64, on_bad_row="skip"), tiny_tokenizer)
    assert data.skipped == {"no_prompt": 1} and len(data.train) == 2


def test_hub_loading_passes_config_name_data_dir_and_revision(monkeypatch, tiny_tokenizer):
    """No hub is reachable: datasets.load_dataset is replaced by a recorder that returns a small Dataset."""
    import datasets

    calls = []

    def fake(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return Dataset.from_list(SKY)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = DataConfig(path="trl-lib/ultrafeedback_binarized", config_name="default", data_dir="data",
                     revision="v1", max_length=64)
    data = load_preference_data(cfg, tiny_tokenizer)
    assert len(data.train) == 2
    assert calls == [("trl-lib/ultrafeedback_binarized", "default",
                      {"split": "train", "data_dir": "data", "revision": "v1"})]


def test_tokenisation_is_cached_and_num_proc_gives_the_same(tmp_path, tiny_tokenizer, monkeypatch):
    rows = [{"prompt": f"Question {i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(1200)]
    path = saved(tmp_path, rows)
    calls = []
    real = data_mod._tokenise_rows
    # a[7]: the row indices of the call (data._tokenise_rows' signature)
    monkeypatch.setattr(data_mod, "_tokenise_rows", lambda *a, **k: calls.append(len(a[7])) or real(*a, **k))
    first = load_preference_data(DataConfig(path=path, max_length=32), tiny_tokenizer)
    assert sum(calls) == 1200
    calls.clear()
    again = load_preference_data(DataConfig(path=path, max_length=32), tiny_tokenizer)
    assert calls == [] and again.train == first.train  # read from the map's cache file
    other = load_preference_data(DataConfig(path=path, max_length=24), tiny_tokenizer)
    assert sum(calls) == 1200 and other.fingerprint != first.fingerprint  # another setting: tokenised again
    monkeypatch.setattr(data_mod, "_tokenise_rows", real)  # the worker processes run the real function
    par = load_preference_data(DataConfig(path=path, max_length=20, num_proc=2), tiny_tokenizer)
    seq = load_preference_data(DataConfig(path=path, max_length=20, max_rows=1200), tiny_tokenizer)
    assert par.train == seq.train


def test_bad_rows_under_num_proc_error_or_skip_as_before(tmp_path, tiny_tokenizer):
    """A worker process's bad row: the same message (source, row, reason); skipped ones counted, also when a whole
    map batch has no skipped row (the cached table's columns are typed)."""
    rows = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(1100)]
    rows[1050]["rejected"] = rows[1050]["chosen"]
    path = saved(tmp_path, rows)
    with pytest.raises(ValueError, match=r"row 1050: 'chosen' and 'rejected' responses are identical "
                                         r"\[chosen_equals_rejected"):
        load_preference_data(DataConfig(path=path, max_length=32, num_proc=2), tiny_tokenizer)
    data = load_preference_data(DataConfig(path=path, max_length=32, num_proc=2, on_bad_row="skip"), tiny_tokenizer)
    assert data.skipped == {"chosen_equals_rejected": 1} and len(data.train) == 1099
    assert 1050 not in [e["index"] for e in data.train]
