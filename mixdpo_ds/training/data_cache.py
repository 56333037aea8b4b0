"""Tokenise a source once: `Dataset.map` (batched, `data.num_proc` processes, cached) on the main process first.

    examples, skipped = tokenise_cached(ds, rows, tokenise, key, num_proc=4)

`tokenise(indices, skipped)` is data.py's row rules (`_tokenise_rows`); here it runs inside `ds.select(rows).map`,
one batch of rows per call, and each result row is stored as one JSON string (a bad row skipped under
on_bad_row=skip as its reason), so the cached table has one schema whatever the row format. The map's fingerprint
is ours, not dill's hash of the function (which would not see a change in the row rules): the source's
fingerprint, the tokenisation settings and tokenizer (`key`), the rows, and the source code of the modules that
decide the ids (data.py, data_rows.py). The same key finds the cache file the first map wrote (next to the source's
arrow files), so a second load reads ids instead of tokenising (benchmarks/bench_data_cache.py measures it).

Under torch.distributed rank 0 maps first and the other ranks then read its cache; bad rows raise in the map with
data.py's message (file, row, reason), as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_RULE_FILES = ("data.py", "data_rows.py", "data_cache.py")


def _code_hash() -> str:
    h = hashlib.sha256()
    for name in _RULE_FILES:
        h.update((_HERE / name).read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the body first; the other ranks wait, then run it (and hit rank 0's cache)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if distributed and dist.get_rank() == 0:
            dist.barrier()


def map_fingerprint(ds, rows: list[int], key: str) -> str:
    h = hashlib.sha256()
    h.update(str(getattr(ds, "_fingerprint", "")).encode() + b"\0" + key.encode() + b"\0" + _code_hash().encode())
    h.update(json.dumps(rows).encode())
    return h.hexdigest()[:32]


def tokenise_cached(ds, rows: list[int], tokenise, key: str, num_proc: int | None = None,
                    batch_size: int = 512) -> tuple[list[dict], Counter]:
    """Rows `rows` of `ds` -> (tokenised examples in row order, Counter of skipped bad rows by reason)."""
    if not rows:
        return [], Counter()

    def batch(_, positions):
        skipped: Counter = Counter()
        examples = tokenise([rows[p] for p in positions], skipped)
        reasons = [r for r, n in skipped.items() for _ in range(n)]
        return {"example": [json.dumps(e) for e in examples] + [None] * len(reasons),
                "skip": [None] * len(examples) + reasons}

    from datasets import Features, Value

    features = Features({"example": Value("string"), "skip": Value("string")})  # a batch may be all None
    subset = ds.select(rows) if rows != list(range(len(ds))) else ds
    subset = subset.select_columns(subset.column_names[:1])  # the batches only carry positions
    with main_process_first():
        mapped = subset.map(batch, with_indices=True, batched=True, batch_size=batch_size,
                            num_proc=num_proc if num_proc and num_proc > 1 and len(rows) > batch_size else None,
                            remove_columns=subset.column_names, features=features,
                            new_fingerprint=map_fingerprint(ds, rows, key),
                            desc="tokenising")
    table = mapped.to_dict()
    skipped = Counter(r for r in table["skip"] if r is not None)
    return [json.loads(e) for e in table["example"] if e is not None], skipped


__all__ = ["main_process_first", "map_fingerprint", "tokenise_cached"]
