"""The cached Dataset.map tokenisation (training/data_cache.py): how long a second load of the same data takes
against the first, and what the map costs against the plain row loop it wraps.

    python benchmarks/bench_data_cache.py --rows 20000 --repeats 3
    add --append benchmarks/RESULTS.md to append the table (machine, commit, date, command).

Each repeat writes a fresh save_to_disk folder of `--rows` synthetic preference rows (prompt, chosen, rejected;
different text per repeat, so no repeat can hit another's cache) and times, in an order that rotates per repeat:
  loop    data.py's row loop (`_tokenise_rows`) over all rows, no map, no cache: the baseline, what every load cost
          before (on every rank)
  first   load_preference_data, first time: the map tokenises and writes its cache file
  second  load_preference_data again, same settings: the map's cache file is read
The tiny byte-level tokenizer of the tests (mixdpo_ds.apps.tiny) keeps it CPU-only; a real tokenizer makes the
tokenising part, and so the gain of the cache, larger.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

from bench_scaling import commit, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(n: int, seed: int) -> list[dict]:
    words = ["good", "bad", "film", "plot", "music", "acting", "story", "great", "dull", "fun"]
    out = []
    for i in range(n):
        w = [words[(i * 7 + seed * 3 + j) % len(words)] for j in range(12)]
        out.append({"prompt": f"Human: review {seed} {i}: {' '.join(w[:6])}?\n\nAssistant:",
                    "chosen": " " + " ".join(w[6:]) + f" {i}.", "rejected": " " + " ".join(reversed(w[6:])) + "."})
    return out


def one_repeat(n: int, seed: int, tok, tmp: str) -> dict[str, float]:
    from datasets import Dataset, load_from_disk

    from mixdpo_ds.training import data as data_mod
    from mixdpo_ds.training.data import DataConfig, load_preference_data

    path = os.path.join(tmp, f"prefs_{seed}")
    Dataset.from_list(rows(n, seed)).save_to_disk(path)
    cfg = DataConfig(path=path, max_length=128, max_prompt_length=64)

    def loop():
        ds = load_from_disk(path)
        return data_mod._tokenise_rows(ds, list(range(len(ds))), data_mod._columns(ds, cfg, "bench"), cfg,
                                       data_mod._Encoder(tok), "bench", {"user": {}, "group": {}}, Counter())

    timings, results = {}, {}
    order = ["loop", "first", "second"] if seed % 2 == 0 else ["first", "loop", "second"]  # second needs first
    for name in order:
        start = time.perf_counter()
        results[name] = loop() if name == "loop" else load_preference_data(cfg, tok).train
        timings[name] = time.perf_counter() - start
    assert results["first"] == results["second"], "the cached load must give the same examples"
    assert [e["chosen_ids"] for e in results["loop"]] == [e["chosen_ids"] for e in results["first"]]
    return timings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--append", default=None)
    args = p.parse_args(argv)
    import datasets

    from mixdpo_ds.apps.tiny import build_tiny_tokenizer

    datasets.disable_progress_bars()
    start_machine = machine()
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tiny_tokenizer(os.path.join(tmp, "tok"))
        runs = [one_repeat(args.rows, seed, tok, tmp) for seed in range(args.repeats)]
    lines = ["| load | median s | min s | max s | ratio to the row loop (median, worst) |", "|---|---|---|---|---|"]
    for name in ("loop", "first", "second"):
        ts = [r[name] for r in runs]
        ratios = [r[name] / r["loop"] for r in runs]
        lines.append(f"| {name} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} | "
                     f"{statistics.median(ratios):.3f} (worst {max(ratios):.3f}) |")
    second_first = [r["second"] / r["first"] for r in runs]
    summary = (f"second load / first load: median {statistics.median(second_first):.3f}, "
               f"range {min(second_first):.3f}-{max(second_first):.3f} over {args.repeats} repeats")
    table = "\n".join(lines)
    print(table)
    print(summary)
    if args.append:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python benchmarks/bench_data_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.append, "a") as f:
            f.write(f"\n\n### Cached Dataset.map tokenisation — {now}\n\n- machine: {start_machine}\n"
                    f"- commit: {commit()}\n- command: `{command}`\n\n{args.rows} rows, tiny byte-level tokenizer, "
                    f"max_length 128; {args.repeats} repeats, fresh data each, order rotated.\n\n{table}\n\n"
                    f"{summary}. Load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.\n")


if __name__ == "__main__":
    main()
