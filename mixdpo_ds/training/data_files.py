"""Local preference files and folders → one `datasets.Dataset` (used by `mixdpo_ds.training.data`).

    ds, files, origin = load_local("data/prefs", "train", "data.path=data/prefs", "error", columns_of, skipped)

Formats by extension: .json (JSON lines, or one JSON document), .jsonl, .csv, .parquet, each optionally compressed
(.gz .bz2 .xz .zst). A folder is split by file name as `datasets` does (train* / test* / validation* …, else
everything is 'train'), and every supported file of the split is read, whatever its format: `datasets`' own folder
loader reads only the most common format and drops the others without a word. The files of a split are combined
when they agree on the preference columns (numeric ids of mixed int / float types become float); otherwise the
error lists the files, formats and columns. Files that are not read (another format, no split) are named in a
warning, as are empty files of a folder.

Reading goes through `datasets.load_dataset` (memory-mapped, cached). Only when that fails are the files read again
one by one to say which file and line is at fault: a malformed JSON line, invalid UTF-8, a ragged CSV line. With
data.on_bad_row=skip, malformed JSON lines (and lines that are not UTF-8) are dropped and counted in `skipped`
(reasons 'malformed_json', 'invalid_utf8'); a malformed CSV, parquet or JSON document cannot be skipped.
"""
from __future__ import annotations

import logging
import os
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass

from mixdpo_ds.training.file_scan import COMPRESSION, builder_of, cause, check_utf8, is_blank, scan_json

log = logging.getLogger(__name__)

# Files of a dataset folder that describe it rather than hold rows: never read, never warned about.
METADATA_FILES = {"readme.md", ".gitattributes", "dataset_infos.json", "dataset_info.json", "dataset_dict.json",
                  "state.json"}


def looks_local(path: str) -> bool:
    """Whether `path` (which does not exist) was meant as a local path rather than a hub dataset name.

    Hub names are 'name' or 'owner/name', so a single '/' alone cannot tell. A local path is one that starts with
    . / ~ (./ and ../ included), ends with a separator or a data-file extension, has two or more '/', holds the OS
    separator where that is not '/', or whose first component is an existing local directory ('data/prefs' with
    ./data present). 'dta/prefs' with no ./dta is taken for a hub name.
    """
    if path.startswith((".", "/", "~")):  # hub names never start with these
        return True
    if path.endswith(("/", os.sep)) or builder_of(path) is not None or path.count("/") >= 2:
        return True
    if os.sep != "/" and os.sep in path:
        return True
    head = re.split(r"[/\\]", path, maxsplit=1)[0]
    return head != path and os.path.isdir(head)


@dataclass
class _Part:
    ds: object  # datasets.Dataset
    files: list[str]
    builder: str
    name: str  # the file (relative to the folder), or "N json files (first … last)" for a group read at once


class Origins:
    """Row index of the loaded dataset → "file f row r", for messages about rows of a multi-file source."""

    def __init__(self, segments: list[tuple[int, str, int]]):
        self.starts = [s for s, _, _ in segments]
        self.segments = segments  # (first index, part name, row of that part at the first index), sorted

    def __call__(self, index: int) -> str | None:
        k = bisect_right(self.starts, index) - 1
        if k < 0:
            return None
        start, name, offset = self.segments[k]
        return f"{name} row {index - start + offset}"


# -------------------------------------------------------------------------------------------- public
def load_local(path: str, split: str, label: str, on_bad_row: str, columns_of, skipped: Counter):
    """A local file or folder → (datasets.Dataset of split `split`, the files read, Origins or None).

    `columns_of(ds, label)` returns the role → column map of one part (it raises on a missing column);
    parts are combined only when the maps agree. Malformed lines skipped (on_bad_row=skip) are added to
    `skipped`.
    """
    if os.path.isfile(path):
        if builder_of(path) is None:
            raise ValueError(f"{label}: unknown file type; allowed: .json, .jsonl, .csv, .parquet "
                             f"(optionally compressed: {', '.join(COMPRESSION)})")
        root, by_split = None, {"train": [path]}
    else:
        root, by_split = os.path.abspath(path), _folder_splits(path, label)
    names = _split_names(split, label)
    for name in names:
        if name not in by_split:
            where = "a local file has only the split 'train'" if root is None else \
                f"the folder's splits (from file names): {sorted(by_split)}"
            raise ValueError(f"{label}: no split {name!r}; {where}")
    combined, segments, files = {}, {}, []
    for name in dict.fromkeys(names):
        parts = []
        for builder in dict.fromkeys(builder_of(f) for f in by_split[name]):  # in the order of their first file
            group = [f for f in by_split[name] if builder_of(f) == builder]
            parts += _read_group(group, builder, root, label, on_bad_row, skipped)
        files += [f for p in parts for f in p.files]
        combined[name] = _combine(parts, label, columns_of)
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + len(p.ds))
        segments[name] = [(s, p.name, 0) for s, p in zip(starts, parts, strict=False)]
    ds, origin = _apply_split(combined, segments, split, label)
    return ds, files, (origin if root is not None else None)


def is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json + dataset_info.json) or `DatasetDict.save_to_disk`
    (dataset_dict.json)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))))


def load_saved(path: str, split: str, label: str):
    """A save_to_disk folder -> (the Dataset of `split`, its arrow files). A Dataset folder is the split 'train';
    a DatasetDict folder has its own split names. Slices ('train[:100]') work as for files."""
    import glob

    import datasets

    loaded = datasets.load_from_disk(path)
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    for name in _split_names(split, label):
        if name not in splits:
            raise ValueError(f"{label}: no split {name!r}; the saved dataset's splits: {sorted(splits)}")
    segments = {name: [(0, name, 0)] for name in splits}
    ds, _ = _apply_split(splits, segments, split, label)
    # the saved shards only: cache-*.arrow files (Dataset.map's, ours included) come and go beside them
    return ds, sorted(glob.glob(os.path.join(path, "**", "data-*.arrow"), recursive=True))


# ----------------------------------------------------------------------------------------- the folder
def _folder_splits(path: str, label: str) -> dict[str, list[str]]:
    """Split name → supported data files of the folder (sorted), by `datasets`' file-name rules; the files not
    read are named in a warning."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    base = os.path.abspath(path)
    try:
        patterns = get_data_patterns(base)
        resolved = DataFilesDict.from_patterns(patterns, base_path=base)
    except Exception as e:  # datasets' EmptyDatasetError, FileNotFoundError …
        raise ValueError(f"{label}: a folder without data files (.json, .jsonl, .csv, .parquet): {e}") from e
    rel = lambda f: os.path.relpath(f, base)  # noqa: E731
    assigned, other_format, by_split = set(), [], {}
    for split, files in resolved.items():
        for f in sorted(set(files)):
            assigned.add(os.path.abspath(f))
            if os.path.basename(f).lower() in METADATA_FILES:
                continue
            if builder_of(f) is None:
                other_format.append(rel(f))
            else:
                by_split.setdefault(str(split), []).append(os.path.abspath(f))
    # datasets skips hidden files and folders ('.x', '__x'); every other file is either read or named here
    everything = {os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs}
    no_split = sorted(rel(f) for f in everything - assigned
                      if os.path.basename(f).lower() not in METADATA_FILES
                      and not any(c.startswith((".", "__")) for c in rel(f).split(os.sep)))
    if other_format:
        log.warning("%s: not reading %d file(s) of an unsupported type (allowed: .json, .jsonl, .csv, .parquet): %s",
                    label, len(other_format), _few(other_format))
    if no_split:
        log.warning("%s: not reading %d file(s) whose names match no split (%s): %s", label, len(no_split),
                    ", ".join(sorted(by_split)), _few(no_split))
    if not by_split:
        raise ValueError(f"{label}: no .json, .jsonl, .csv or .parquet files in the folder"
                         + (f" (found: {_few(other_format)})" if other_format else ""))
    for split, files in list(by_split.items()):
        empty = [f for f in files if is_blank(f)]
        if empty:
            log.warning("%s: skipping %d empty file(s): %s", label, len(empty), _few([rel(f) for f in empty]))
            by_split[split] = [f for f in files if f not in empty]
            if not by_split[split]:
                raise ValueError(f"{label}: every file of split {split!r} is empty: {_few([rel(f) for f in empty])}")
    return by_split


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")


def _split_names(split: str, label: str) -> list[str]:
    """Split names referenced by a split spec ('train', 'train[:100]', 'train[:10%]+test')."""
    names = []
    for piece in split.split("+"):
        m = re.fullmatch(r"\s*([\w.-]+)\s*(\[[^\]]*\])?\s*", piece)
        if m is None:
            raise ValueError(f"{label}: split {split!r} is not a split spec (e.g. 'train', 'train[:1000]', "
                             "'train[:10%]+test')")
        names.append(m.group(1))
    return names


def _apply_split(combined: dict, segments: dict, split: str, label: str):
    """The rows of spec `split` (slices, '+') from the combined splits, and their Origins."""
    from datasets import ReadInstruction, concatenate_datasets

    try:
        instructions = ReadInstruction.from_spec(split).to_absolute({n: len(d) for n, d in combined.items()})
    except (ValueError, AssertionError) as e:
        raise ValueError(f"{label}: split {split!r}: {e}") from e
    pieces, out_segments, at = [], [], 0
    for ins in instructions:
        d, lo, hi = combined[ins.splitname], ins.from_, ins.to
        pieces.append(d if (lo, hi) == (0, len(d)) else d.select(range(lo, hi)))
        for start, name, offset in segments[ins.splitname]:
            part_end = next((s for s, _, _ in segments[ins.splitname] if s > start), len(d))
            a, b = max(lo, start), min(hi, part_end)
            if a < b:
                out_segments.append((at + a - lo, name, offset + a - start))
        at += hi - lo
    ds = pieces[0] if len(pieces) == 1 else concatenate_datasets(pieces)
    return ds, Origins(out_segments)


# ------------------------------------------------------------------------------------------- reading
def _hf_load(builder: str, files: list[str]):
    import datasets

    return datasets.load_dataset(builder, data_files={"train": list(files)}, split="train")


def _read_group(files: list[str], builder: str, root: str | None, label: str, on_bad_row: str,
                skipped: Counter) -> list[_Part]:
    """Files of one format: read at once; if that fails, again file by file, to name the file (and line) at fault.
    JSON files are scanned line by line first; runs of clean files are still read in one call each."""
    rel = (lambda f: os.path.relpath(f, root)) if root is not None else os.path.basename  # noqa: E731
    where = (lambda f: label) if root is None else (lambda f: f"{label}: file {rel(f)}")  # noqa: E731
    if root is None and is_blank(files[0]):
        raise ValueError(f"{label}: the file is empty (no rows)")

    def at_once(group: list[str]) -> _Part:
        ds = _hf_load(builder, group)
        if builder == "json":
            ds.data.table.validate(full=True)  # Arrow's JSON reader keeps invalid UTF-8; Python would fail later
        name = rel(group[0]) if len(group) == 1 else f"{len(group)} {builder} files ({rel(group[0])} … " \
                                                      f"{rel(group[-1])})"
        return _Part(ds, list(group), builder, name)

    def one_by_one(group: list[str]) -> list[_Part]:
        return [_Part(_read_one(f, builder, where(f), on_bad_row, skipped), [f], builder, rel(f)) for f in group]

    try:
        return [at_once(files)]
    except Exception:  # noqa: BLE001 - datasets wraps every reader error; the files are read again below
        pass
    if builder != "json":
        return one_by_one(files)
    parts, run = [], []

    def flush():
        if run:
            try:
                parts.append(at_once(run))
            except Exception:  # noqa: BLE001 - e.g. files that disagree on a column's type
                parts.extend(one_by_one(run))
            run.clear()
    for f in files:
        good = scan_json(f, where(f), on_bad_row, skipped)
        if good is None:
            run.append(f)
        else:
            flush()
            parts.append(_Part(good, [f], builder, rel(f)))
    flush()
    return parts


def _read_one(path: str, builder: str, where: str, on_bad_row: str, skipped: Counter):
    """One file, with an error naming it and the line at fault; in skip mode bad JSON lines are dropped."""
    if builder == "json":
        good = scan_json(path, where, on_bad_row, skipped)
        if good is not None:
            return good
    elif builder == "csv":
        check_utf8(path, where, "a CSV file")
    try:
        return _hf_load(builder, [path])
    except Exception as e:  # noqa: BLE001
        reason = cause(e)
        if builder == "csv":
            raise ValueError(f"{where}: malformed CSV: {reason} (data.on_bad_row=skip cannot skip a malformed CSV "
                             "line: fix the file)") from e
        if builder == "json":
            raise ValueError(f"{where}: could not be read as JSON: {reason} (the JSON itself is well-formed; check "
                             "that each column keeps one type across rows)") from e
        raise ValueError(f"{where}: could not be read as {builder}: {reason}") from e


# ------------------------------------------------------------------------------------------ combining
def _combine(parts: list[_Part], label: str, columns_of):
    """One Dataset from parts that agree on the role columns (types unified), else an error listing them."""
    from datasets import concatenate_datasets

    if len(parts) == 1:
        return parts[0].ds
    roles = [columns_of(p.ds, f"{label}: file {p.name}") for p in parts]
    if any(r != roles[0] for r in roles):
        listing = "; ".join(f"{p.name} ({p.builder}): columns {p.ds.column_names}" for p in parts)
        raise ValueError(f"{label}: the files cannot be combined, their preference columns differ: {listing}")
    used = [c for c in roles[0].values() if c is not None]
    dss = [p.ds.select_columns(used) for p in parts]
    for col in used:
        dss = _unify(dss, col, parts, label)
    return concatenate_datasets(dss)


def _unify(dss: list, col: str, parts: list[_Part], label: str) -> list:
    from datasets import Value

    feats = [d.features[col] for d in dss]
    if all(f == feats[0] for f in feats):
        return dss
    typed = [f for f in feats if not (isinstance(f, Value) and f.dtype == "null")]
    numeric = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
               "float64")
    strings = (Value("string"), Value("large_string"))
    if all(f == typed[0] for f in typed):
        target = typed[0]
    elif all(f in strings for f in typed):
        target = Value("large_string")
    elif all(isinstance(f, Value) and f.dtype in numeric for f in typed):
        target = Value("float64")  # ids 7 (json) and 7.0 (csv with gaps) are one vocabulary word (data._word)
    else:
        listing = "; ".join(f"{p.name} ({p.builder}): {f}" for p, f in zip(parts, feats, strict=True))
        raise ValueError(f"{label}: the files cannot be combined, column {col!r} has different types: {listing}")
    try:
        return [d if d.features[col] == target else d.cast_column(col, target) for d in dss]
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{label}: the files cannot be combined, column {col!r} does not cast to {target}: "
                         f"{cause(e)}") from e
