"""Reading one local file line by line, to say which file and line is at fault when `datasets` cannot read it
(training/data_files.py calls these only after a failed load): compressed opening, blank files, invalid UTF-8,
malformed JSON lines (dropped and counted with data.on_bad_row=skip).
"""
from __future__ import annotations

import io
import logging
import os
from collections import Counter

log = logging.getLogger("mixdpo_ds.training.data_files")  # the warnings keep the loader's logger name

SKIP_HINT = "set data.on_bad_row=skip to drop such lines"
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def builder_of(path: str) -> str | None:
    """The `datasets` builder of a local file name ('json', 'csv', 'parquet'), None for another type."""
    name = path.lower()
    for ext in COMPRESSION:
        name = name.removesuffix(ext)
    return BUILDERS.get(os.path.splitext(name)[1])


def cause(e: BaseException) -> str:
    """The innermost exception of a `datasets` error chain, as 'Type: message'."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(e).strip() or "(no message)"
    return f"{type(e).__name__}: {text}"


def open_text(path: str):
    import fsspec

    return fsspec.open(path, "rb", compression="infer").open()


def is_blank(path: str) -> bool:
    """No bytes, or (text formats) nothing but whitespace."""
    if builder_of(path) == "parquet" or not path.lower().endswith(COMPRESSION):
        if os.path.getsize(path) == 0:
            return True
        if builder_of(path) == "parquet":
            return False
    with open_text(path) as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def check_utf8(path: str, where: str, what: str) -> None:
    with open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as u:
                raise ValueError(f"{where} line {n}: invalid UTF-8 (byte 0x{line[u.start]:02x} at column "
                                 f"{u.start + 1}); save {what} as UTF-8") from None


def scan_json(path: str, where: str, on_bad_row: str, skipped: Counter):
    """Check a JSON file line by line. None: no malformed line (the file's problem is elsewhere); else, in skip
    mode, a Dataset of the good lines (the bad ones counted). Error mode: ValueError at the first bad line."""
    import json

    with open_text(path) as fh:
        raw = fh.read()
    first = raw.lstrip()[:1]
    if not first:
        raise ValueError(f"{where}: the file is empty (no rows)")
    if not _is_jsonl(path):
        # a .json file may be one document (an array of rows, or columns) rather than JSON lines
        try:
            json.loads(raw)
            return None  # a valid document: its problem is not syntax
        except UnicodeDecodeError:
            pass
        except json.JSONDecodeError as doc_error:
            first_line = raw.lstrip().split(b"\n", 1)[0]
            if first == b"[" or not _is_json_object(first_line):
                raise ValueError(f"{where} line {doc_error.lineno}: malformed JSON document ({doc_error.msg}, "
                                 f"column {doc_error.colno}); data.on_bad_row=skip cannot skip inside one JSON "
                                 "document: fix the file") from None
    good, bad = [], Counter()
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        problem, reason = None, "malformed_json"
        try:
            value = json.loads(line.decode("utf-8"))
            if not isinstance(value, dict):
                problem = f"a JSON line must be an object (one row), got {type(value).__name__}"
        except UnicodeDecodeError as u:
            problem, reason = f"invalid UTF-8 (byte 0x{line[u.start]:02x} at column {u.start + 1})", "invalid_utf8"
        except json.JSONDecodeError as j:
            problem = f"malformed JSON ({j.msg}, column {j.colno})"
        if problem is None:
            good.append(line)
            continue
        if on_bad_row == "error":
            raise ValueError(f"{where} line {n}: {problem} [{reason}; {SKIP_HINT}]")
        bad[reason] += 1
    if not bad:
        return None
    log.warning("%s: skipped %s malformed line(s) (data.on_bad_row=skip)", where, dict(bad))
    skipped.update(bad)
    if not good:
        raise ValueError(f"{where}: no well-formed JSON lines (skipped: {dict(bad)})")
    return _json_lines_dataset(good, where)


def _is_jsonl(path: str) -> bool:
    name = path.lower()
    for ext in COMPRESSION:
        name = name.removesuffix(ext)
    return name.endswith(".jsonl")


def _is_json_object(line: bytes) -> bool:
    import json

    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _json_lines_dataset(lines: list[bytes], where: str):
    """Well-formed JSON lines → an in-memory Dataset, parsed by the same Arrow reader `datasets` uses."""
    import datasets
    import pyarrow.json as paj
    from datasets.table import InMemoryTable

    blob = b"\n".join(lines) + b"\n"
    block = max(1 << 20, 2 * max(len(line) for line in lines) + 2)
    try:
        table = paj.read_json(io.BytesIO(blob), read_options=paj.ReadOptions(block_size=block))
    except Exception as e:  # noqa: BLE001 - e.g. a column whose type changes between rows
        raise ValueError(f"{where}: could not be read as JSON: {cause(e)}") from e
    return datasets.Dataset(InMemoryTable(table))
