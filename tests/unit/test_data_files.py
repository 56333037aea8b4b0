"""mixdpo_ds.training.data_files (through load_preference_data): folders of every format, file-level read errors
naming the file and line, malformed JSON lines skipped and counted, local-looking paths that fail at once; and the
run checks of mixdpo_ds.training.data (check_lengths, check_user_gate)."""
import gzip
import json
import logging

import pandas as pd
import pytest

from mixdpo_ds.training import data_files
from mixdpo_ds.training.data import DataConfig, check_lengths, check_user_gate, load_preference_data
from mixdpo_ds.training.data_files import looks_local

ROWS = [{"prompt": f"Question {i}?", "chosen": f" Good answer {i}.", "rejected": f" Bad {i}.", "user": i % 3}
        for i in range(12)]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def load(tok, path, **kw):
    return load_preference_data(DataConfig(path=str(path), **kw), tok)


# --------------------------------------------------------------------------------------------- folders
def test_a_folder_reads_every_format_and_combines_them(tmp_path, tiny_tokenizer, caplog):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.jsonl").write_text(jsonl(ROWS))
    pd.DataFrame(ROWS).to_csv(d / "b.csv", index=False)
    pd.DataFrame(ROWS[:5]).to_parquet(d / "c.parquet")
    (d / "notes.txt").write_text("not data")
    (d / "README.md").write_text("# about")
    with caplog.at_level(logging.WARNING):
        data = load(tiny_tokenizer, d)
    assert len(data.train) == 12 + 12 + 5
    assert data.user_vocab == {"0": 0, "1": 1, "2": 2}
    # the .txt file is named in a warning; README.md is metadata, not data
    assert "not reading 1 file(s) of an unsupported type" in caplog.text and "notes.txt" in caplog.text
    assert "README" not in caplog.text
    # a slice of the split applies to the combined rows
    assert len(load(tiny_tokenizer, d, split="train[:20]").train) == 20


def test_a_bad_row_of_a_folder_names_its_file_and_row(tmp_path, tiny_tokenizer):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.jsonl").write_text(jsonl(ROWS))
    rows = [dict(r) for r in ROWS]
    rows[3]["rejected"] = rows[3]["chosen"]
    pd.DataFrame(rows).to_csv(d / "b.csv", index=False)
    with pytest.raises(ValueError) as e:
        load(tiny_tokenizer, d)
    assert f"data.path={d} row 15 (b.csv row 3): " in str(e.value) and "chosen_equals_rejected" in str(e.value)


def test_folder_files_that_cannot_be_combined_are_listed(tmp_path, tiny_tokenizer):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text(jsonl(ROWS))
    pd.DataFrame([{k: v for k, v in r.items() if k != "prompt"} for r in ROWS]).to_csv(d / "b.csv", index=False)
    with pytest.raises(ValueError) as e:
        load(tiny_tokenizer, d)
    assert str(e.value) == (f"data.path={d}: the files cannot be combined, their preference columns differ: "
                            "a.jsonl (json): columns ['prompt', 'chosen', 'rejected', 'user']; "
                            "b.csv (csv): columns ['chosen', 'rejected', 'user']")
    # same columns, incompatible types: string ids in one file, numbers in the other
    (d / "b.csv").unlink()
    (d / "c.jsonl").write_text(jsonl([{**r, "user": f"u{r['user']}"} for r in ROWS]))
    with pytest.raises(ValueError, match=r"the files cannot be combined, column 'user' has different types: "
                                         r"a.jsonl \(json\): Value\('int64'\); c.jsonl \(json\): Value\('string'\)"):
        load(tiny_tokenizer, d)


def test_folder_files_outside_every_split_and_empty_files_are_named(tmp_path, tiny_tokenizer, caplog):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.jsonl").write_text(jsonl(ROWS[:8]))
    pd.DataFrame(ROWS[8:]).to_csv(d / "test.csv", index=False)
    (d / "extra.jsonl").write_text(jsonl(ROWS))
    (d / "train-2.jsonl").write_text("")
    with caplog.at_level(logging.WARNING):
        data = load(tiny_tokenizer, d, eval_split="test")
    assert len(data.train) == 8 and len(data.eval) == 4
    assert "not reading 1 file(s) whose names match no split (test, train): extra.jsonl" in caplog.text
    assert "skipping 1 empty file(s): train-2.jsonl" in caplog.text
    with pytest.raises(ValueError, match=r"no split 'validation'; the folder's splits \(from file names\): "
                                         r"\['test', 'train'\]"):
        load(tiny_tokenizer, d, split="validation")


# ----------------------------------------------------------------------------------- file read errors
def test_a_truncated_jsonl_line_names_file_and_line_and_skip_drops_it(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(ROWS[:5]) + '{"prompt": "x", "cho\n' + jsonl(ROWS[5:]) + "[1, 2]\n")
    with pytest.raises(ValueError) as e:
        load(tiny_tokenizer, path)
    assert str(e.value) == (f"data.path={path} line 6: malformed JSON (Unterminated string starting at, column 17) "
                            "[malformed_json; set data.on_bad_row=skip to drop such lines]")
    data = load(tiny_tokenizer, path, on_bad_row="skip")
    assert data.skipped == {"malformed_json": 2} and len(data.train) == 12
    assert [e["index"] for e in data.train] == list(range(12))


def test_a_malformed_line_in_a_folder_names_the_file(tmp_path, tiny_tokenizer):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text(jsonl(ROWS))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(jsonl(ROWS[:2]) + "{oops}\n")
    with pytest.raises(ValueError, match=r"data.path=.*/d: file b.jsonl.gz line 3: malformed JSON \(Expecting "
                                         r"property name enclosed in double quotes, column 2\) \[malformed_json"):
        load(tiny_tokenizer, d)
    data = load(tiny_tokenizer, d, on_bad_row="skip")
    assert data.skipped == {"malformed_json": 1} and len(data.train) == 14


def test_invalid_utf8_names_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(ROWS[:2]).encode() + b'{"prompt": "\xff", "chosen": " a", "rejected": " b"}\n')
    with pytest.raises(ValueError) as e:
        load(tiny_tokenizer, path)
    assert str(e.value) == (f"data.path={path} line 3: invalid UTF-8 (byte 0xff at column 13) "
                            "[invalid_utf8; set data.on_bad_row=skip to drop such lines]")
    assert load(tiny_tokenizer, path, on_bad_row="skip").skipped == {"invalid_utf8": 1}
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"prompt,chosen,rejected\nq, a, b\nq\xe9, c, d\n")
    with pytest.raises(ValueError, match=r"d.csv line 3: invalid UTF-8 \(byte 0xe9 at column 2\); save a CSV file "
                                         r"as UTF-8"):
        load(tiny_tokenizer, csv)


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_ragged_csv_names_the_line_and_cannot_be_skipped(tmp_path, tiny_tokenizer, on_bad_row):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nq1, a, b\nq2, c, d, e\nq3, f, g\n")
    with pytest.raises(ValueError) as e:
        load(tiny_tokenizer, path, on_bad_row=on_bad_row)
    assert str(e.value) == (f"data.path={path}: malformed CSV: ParserError: Error tokenizing data. C error: Expected "
                            "3 fields in line 3, saw 4 (data.on_bad_row=skip cannot skip a malformed CSV line: fix "
                            "the file)")


def test_a_malformed_json_document_names_the_line_and_cannot_be_skipped(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS[:3], indent=1)[:-3])  # a JSON array cut short
    with pytest.raises(ValueError, match=r"d.json line \d+: malformed JSON document \(.*\); data.on_bad_row=skip "
                                         r"cannot skip inside one JSON document: fix the file"):
        load(tiny_tokenizer, path, on_bad_row="skip")


@pytest.mark.parametrize("name, content", [("e.jsonl", b""), ("e.csv", b""), ("e.jsonl", b"\n  \n"),
                                           ("e.jsonl.gz", gzip.compress(b""))])
def test_an_empty_file_says_so(tmp_path, tiny_tokenizer, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"data.path=.*{name}: the file is empty \(no rows\)"):
        load(tiny_tokenizer, tmp_path / name)


def test_mismatched_schemas_in_a_folder_list_the_files(tmp_path, tiny_tokenizer):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train-1.jsonl").write_text(jsonl(ROWS))
    (d / "train-2.jsonl").write_text(jsonl([{"q": "x", "chosen": " a", "rejected": " b"}]))
    with pytest.raises(ValueError) as e:
        load(tiny_tokenizer, d)
    assert str(e.value) == (f"data.path={d}: the files cannot be combined, their preference columns differ: "
                            "train-1.jsonl (json): columns ['prompt', 'chosen', 'rejected', 'user']; "
                            "train-2.jsonl (json): columns ['q', 'chosen', 'rejected']")


# --------------------------------------------------------------------------------- local-looking paths
@pytest.mark.parametrize("path", ["./nope", "../nope/x", "/no/such/dir", "~/no-such-prefs", "data/prefs",
                                  "a/b/c", "missing.jsonl", "nope/"])
def test_a_missing_local_looking_path_fails_at_once(tmp_path, tiny_tokenizer, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # 'data/prefs': its first component is a local folder
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(FileNotFoundError) as e:
        load(tiny_tokenizer, path)
    assert str(e.value) == f"data.path={path}: no such file or directory"


def test_hub_names_are_not_local_and_a_hub_failure_says_the_path_is_not_local(tmp_path, tiny_tokenizer,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("Anthropic/hh-rlhf") and not looks_local("imdb")
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'dta/prefs' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"^data.path=dta/prefs: not a local file or directory, and as a hub dataset "
                                         r"name it could not be loaded \(ConnectionError: Couldn't reach"):
        load(tiny_tokenizer, "dta/prefs")


def test_a_folder_is_read_in_one_call_per_format(tmp_path, tiny_tokenizer, monkeypatch):
    """The fast path: one datasets call per format, not one per file (a folder of shards stays fast)."""
    d = tmp_path / "d"
    d.mkdir()
    for k in range(4):
        (d / f"s{k}.jsonl").write_text(jsonl(ROWS[3 * k:3 * k + 3]))
    calls = []
    real = data_files._hf_load
    monkeypatch.setattr(data_files, "_hf_load", lambda b, f: calls.append(len(f)) or real(b, f))
    assert len(load(tiny_tokenizer, d).train) == 12 and calls == [4]
    # a malformed line in s2 (skipped): the clean runs around it are still read one call each
    (d / "s2.jsonl").write_text(jsonl(ROWS[6:9]) + "{bad\n")
    calls.clear()
    data = load(tiny_tokenizer, d, on_bad_row="skip")
    assert len(data.train) == 12 and data.skipped == {"malformed_json": 1} and calls == [4, 2, 1]
    assert [e["index"] for e in data.train] == list(range(12))


# --------------------------------------------------------------------------------- checks against the run
def test_check_lengths_names_the_limit_and_its_key():
    from transformers import GPT2Config, LlamaConfig

    cfg = DataConfig(path="d.jsonl", max_length=4096, max_prompt_length=256)
    with pytest.raises(ValueError) as e:
        check_lengths(GPT2Config(n_positions=1024), cfg)
    assert str(e.value) == ("data.max_length=4096 exceeds the model's 1024 positions (n_positions); set "
                            "data.max_length <= 1024")
    with pytest.raises(ValueError, match=r"2048 positions \(max_position_embeddings\)"):
        check_lengths(LlamaConfig(max_position_embeddings=2048), cfg)
    assert check_lengths(GPT2Config(n_positions=4096), cfg) == 4096
    assert check_lengths(object(), cfg) is None  # a config without positions: nothing to check


@pytest.mark.parametrize("features", ["user", "prompt+user"])
def test_a_user_gate_needs_user_ids(tmp_path, tiny_tokenizer, features):
    from mixdpo_ds.model.gating import GateConfig

    gate = GateConfig(kind="moe", features=features)
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl([{k: v for k, v in r.items() if k != "user"} for r in ROWS]))
    with pytest.raises(ValueError) as e:
        check_user_gate(gate, load(tiny_tokenizer, path))
    assert str(e.value) == (f"gate.features={features!r} routes by user, but the data has no 'user' column "
                            "(data.user_column); add user ids, point data.user_column at them, or set "
                            "gate.features=prompt")
    path.write_text(jsonl([{**r, "user": None} for r in ROWS]))
    with pytest.raises(ValueError, match="but the 'user' column has no values"):
        check_user_gate(gate, load(tiny_tokenizer, path))
    path.write_text(jsonl(ROWS))
    check_user_gate(gate, load(tiny_tokenizer, path))  # users present: fine
    check_user_gate(GateConfig(kind="moe", features="prompt"), load(tiny_tokenizer, path))
