"""Preference data (docs/ARCHITECTURE.md, "Data"): load, check, tokenise, split, batch and collate.

    cfg = DataConfig(path="tests/data/hh_rlhf_relabeled_sample.jsonl", group_column="objective", eval_fraction=0.1)
    data = load_preference_data(cfg, tokenizer)        # PreferenceData(train, eval, skipped, vocabs, fingerprint)
    for examples in batches(data.train, batch_size=8, seed=0, epoch=0, start=0):
        batch = collate(examples, tokenizer.pad_token_id)    # docs/ARCHITECTURE.md "Batch"

Sources go through `datasets.load_dataset`: a hub name, a local .json/.jsonl/.csv/.parquet file (optionally
.gz), or a local directory, whose files of every supported format are read and combined, with splits inferred
from file names (`mixdpo_ds.training.data_files`, which also names the file and line of a read error). Row rules
(HH-RLHF transcripts, chat templates, truncation) live in `mixdpo_ds.training.data_rows`. Checks a caller runs
against other parts of the run: `check_lengths` (data.max_length vs the model's positions) and `check_user_gate`
(a user-conditioned gate needs user ids in the data).

Prompt and response are tokenised separately and concatenated: tokenising the joined text would let BPE
merge across the boundary (e.g. "Assistant:" + " Sure" → ": S"…), and then no token position separates
prompt from response exactly, and chosen and rejected would not share one prompt tokenisation.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from mixdpo_ds.compat import dataset_fingerprint
from mixdpo_ds.training.data_cache import tokenise_cached
from mixdpo_ds.training.data_files import is_saved_dataset, load_local, load_saved, looks_local
from mixdpo_ds.training.data_rows import (
    BadRow,
    Encoder,
    check_ranking_size,
    item_texts,
    truncate_pair,
    truncate_ranked,
)

_FORMAT_VERSION = 1  # bump when tokenisation rules change: invalidates reference-logp caches
_CHUNK = 512


@dataclass
class DataConfig:
    path: str = field(default="", metadata={"help": "hub dataset name, a local .json/.jsonl/.csv/.parquet file "
                                                    "(optionally .gz), or a local directory of them"})
    split: str = field(default="train", metadata={"help": "split of `path` to train on (local files: 'train'; "
                                                          "slices like 'train[:1000]' work)"})
    eval_path: str | None = field(default=None, metadata={"help": "separate evaluation source (same forms as path)"})
    eval_split: str | None = field(default=None, metadata={"help": "evaluation split (of eval_path, else of path); "
                                                                   "default 'train' when eval_path is set"})
    eval_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of `path` for evaluation, "
                                                                "by a seeded shuffle (exclusive with eval_path/split)"})
    prompt_column: str | None = field(default="prompt", metadata={
        "help": "prompt column; if the default 'prompt' is absent (or this is null) the prompt is derived from "
                "chosen/rejected (HH-RLHF transcripts / shared chat messages)"})
    chosen_column: str = field(default="chosen", metadata={"help": "preferred response (string or message list)"})
    rejected_column: str = field(default="rejected", metadata={"help": "dispreferred response"})
    responses_column: str | None = field(default="responses", metadata={
        "help": "ranked data (docs/math.md §15): a list of m >= 2 responses per row, the same m in every row; when "
                "it and ranking_column or scores_column exist, the rows are ranked and chosen/rejected are not read"})
    ranking_column: str | None = field(default="ranking", metadata={
        "help": "ranked data: response indices best first, a permutation of 0..m-1"})
    scores_column: str | None = field(default="scores", metadata={
        "help": "ranked data: one number per response, higher is better; tied scores make a bad row"})
    user_column: str | None = field(default="user", metadata={
        "help": "optional user id (str/int) for user-conditioned gating; absent default column → -1"})
    group_column: str | None = field(default="group", metadata={
        "help": "optional ground-truth group label, used only by evaluation (HH relabeled data: 'objective')"})
    max_length: int = field(default=512, metadata={"help": "max tokens of prompt + response"})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "prompts keep their last this many tokens (null: min(256, max_length // 2), so a TRL config that sets "
                "only max_length works); < max_length keeps >= 1 response token, == max_length "
                "turns a prompt that fills the budget into a bad row instead"})
    on_bad_row: str = field(default="error", metadata={"help": "'error': stop at the first bad row; "
                                                               "'skip': drop bad rows and count them by reason"})
    max_rows: int | None = field(default=None, metadata={"help": "use a seeded random subset of this many rows "
                                                                 "of `path` (quick runs)"})
    seed: int = field(default=0, metadata={"help": "seed of the max_rows subset and the eval_fraction split"})
    config_name: str | None = field(default=None, metadata={"help": "hub dataset configuration name "
                                                                    "(load_dataset's `name`)"})
    data_dir: str | None = field(default=None, metadata={"help": "sub-directory of the hub dataset (load_dataset's "
                                                                 "data_dir), or of a local folder"})
    revision: str | None = field(default=None, metadata={"help": "hub dataset revision (branch, tag or commit)"})
    num_proc: int | None = field(default=None, metadata={"help": "processes of the tokenising Dataset.map "
                                                                 "(TRL's dataset_num_proc); null = one"})

    def __post_init__(self):
        # An empty path is allowed here (a run config may hold a default DataConfig); load_preference_data
        # rejects it.
        if not isinstance(self.path, str):
            raise ValueError(f"data.path={self.path!r}: must be a hub dataset name, a local file or a directory")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row={self.on_bad_row!r}: allowed values are 'error', 'skip'")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={self.eval_fraction}: must be in [0, 1)")
        if self.eval_fraction > 0 and (self.eval_path is not None or self.eval_split is not None):
            raise ValueError("data.eval_fraction > 0 holds out part of data.path; it cannot be combined with "
                             "data.eval_path / data.eval_split (set one or the other)")
        if not (isinstance(self.max_length, int) and self.max_length >= 2):
            raise ValueError(f"data.max_length={self.max_length}: must be an integer >= 2")
        if self.max_prompt_length is None and isinstance(self.max_length, int):
            self.max_prompt_length = min(256, self.max_length // 2)
        if not (isinstance(self.max_prompt_length, int) and 1 <= self.max_prompt_length <= self.max_length):
            raise ValueError(f"data.max_prompt_length={self.max_prompt_length}: must be an integer in "
                             f"[1, data.max_length={self.max_length}]")
        if self.max_rows is not None and not (isinstance(self.max_rows, int) and self.max_rows >= 1):
            raise ValueError(f"data.max_rows={self.max_rows}: must be null or an integer >= 1")
        for key in ("chosen_column", "rejected_column"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"data.{key}={getattr(self, key)!r}: must be a column name")
        names = [c for c in (self.prompt_column, self.chosen_column, self.rejected_column, self.user_column,
                             self.group_column, self.responses_column, self.ranking_column, self.scores_column)
                 if c is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"data.*_column: the columns must be distinct, got {names}")


@dataclass
class PreferenceData:
    train: list[dict]  # tokenised examples: prompt_ids, chosen_ids, rejected_ids, user, group, index (+ response_ids
    #                    of ranked rows, best first; chosen/rejected are then its first / last)
    eval: list[dict]
    skipped: dict[str, int]  # bad rows dropped (on_bad_row=skip), by reason, train and eval together
    user_vocab: dict[str, int]  # str(user value) -> id
    group_vocab: dict[str, int]  # str(group label) -> id
    fingerprint: str  # hash of sources + tokenisation settings: key of the reference-logp cache
    user_column: str | None = None  # the user column read (None: the data has none)


# ---------------------------------------------------------------------------------------------- loading
def _load_source(path: str, split: str, key: str, cfg: DataConfig, skipped: Counter):
    """-> (datasets.Dataset, label for messages, fingerprint of the source, Origins of its rows or None).

    Local files and folders: `mixdpo_ds.training.data_files` (every format of a folder, errors naming the file
    and line); malformed lines skipped there (on_bad_row=skip) are counted in `skipped`."""
    import datasets  # heavy import, only when loading

    label = f"data.{key}={path}"
    if not path:
        raise ValueError(f"data.{key} is not set: give a hub dataset name, a local file or a directory")
    path = os.path.expanduser(path)
    if cfg.data_dir and os.path.isdir(path):  # a local folder's sub-folder; for a hub dataset, load_dataset's
        path = os.path.join(path, cfg.data_dir)
    origin = None
    try:
        if is_saved_dataset(path):  # a Dataset / DatasetDict.save_to_disk folder (the TRL-shaped trainer's inputs)
            ds, files = load_saved(path, split, label)
            source_fp = "disk:" + _hash_files(files, path)
        elif os.path.isfile(path) or os.path.isdir(path):
            columns_of = lambda d, lab: _columns(d, cfg, lab)  # noqa: E731
            ds, files, origin = load_local(path, split, label, cfg.on_bad_row, columns_of, skipped)
            # content only for a file (a copy keeps its cache); in a folder file names decide splits, and the
            # prefix separates the every-format folder reading from the former most-common-format one
            source_fp = _hash_files(files, None) if os.path.isfile(path) else "dir2:" + _hash_files(files, path)
        elif looks_local(path):
            raise FileNotFoundError(f"{label}: no such file or directory")
        else:
            try:
                ds = datasets.load_dataset(path, cfg.config_name, split=split, data_dir=cfg.data_dir,
                                           revision=cfg.revision)
            except (ValueError, KeyError):
                raise
            except Exception as e:  # noqa: BLE001 - hub errors: connection, repo not found, …
                raise ValueError(f"{label}: not a local file or directory, and as a hub dataset name it could not "
                                 f"be loaded ({type(e).__name__}: {e})") from e
            source_fp = f"hub:{path}:{dataset_fingerprint(ds)}"
    except (ValueError, KeyError) as e:
        if str(e).startswith(label):
            raise
        raise ValueError(f"{label} (split {split!r}) could not be loaded: {e}") from e
    if split != "train":
        label += f" (split {split})"
    return ds, label, f"{source_fp}:{split}", origin


def _hash_files(files: list[str], root: str | None) -> str:
    h = hashlib.sha256()
    for f in files:
        if root is not None:  # in a directory, file names decide splits
            h.update(os.path.relpath(f, root).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _columns(ds, cfg: DataConfig, label: str) -> dict[str, str | None]:
    """Role → column name (None: optional column not used). Missing required columns are errors in both
    on_bad_row modes; an optional column is silently absent only under its default name."""
    defaults = {f.name: f.default for f in DataConfig.__dataclass_fields__.values()}
    present = lambda key: getattr(cfg, key) is not None and getattr(cfg, key) in ds.column_names  # noqa: E731
    # ranked: a responses column *and* an order for it (HH-RLHF relabeled files carry a `responses` list beside
    # chosen / rejected, and stay pairs)
    ranked = present("responses_column") and (present("ranking_column") or present("scores_column"))
    required = ("responses",) if ranked else ("chosen", "rejected")
    cols = {}
    for role in ("prompt", "chosen", "rejected", "user", "group", "responses", "ranking", "scores"):
        key = f"{role}_column"
        name = getattr(cfg, key)
        if ranked and role in ("chosen", "rejected") or not ranked and role in ("responses", "ranking", "scores"):
            name = None  # not read in this format
        elif name is not None and name not in ds.column_names:
            if role in required or name != defaults[key]:
                raise ValueError(f"{label}: column {name!r} (data.{key}) not found; columns: {ds.column_names}")
            name = None
        cols[role] = name
    if ranked and cols["ranking"] is not None and cols["scores"] is not None:
        raise ValueError(f"{label}: ranked data (column {cfg.responses_column!r}) has both order columns "
                         f"data.ranking_column={cfg.ranking_column!r} and data.scores_column={cfg.scores_column!r}; "
                         "set the one not to use to null")
    return cols


def _word(value) -> str | None:
    """A user/group value as a vocabulary key. CSV readers turn an int column with gaps into floats (7 → 7.0,
    gap → NaN): integral floats map back to "7" and NaN to None, so every file format gives one vocabulary."""
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        if value.is_integer():
            return str(int(value))
    return None if value is None else str(value)


def _vocab(values) -> dict[str, int]:
    """Sorted distinct values (numbers numerically) → 0..n-1; None is 'no value' (-1), not a word."""
    words = {_word(v) for v in values} - {None}
    for v in values:
        if isinstance(v, (list, dict)):
            raise ValueError(f"user/group values must be ids or labels (str or int), got a {type(v).__name__}; "
                             "user feature vectors are not supported")

    def key(w: str):
        try:
            return (0, float(w), w)
        except ValueError:
            return (1, 0.0, w)
    return {w: i for i, w in enumerate(sorted(words, key=key))}


# ------------------------------------------------------------------------------------------ tokenising
def _tokenise_rows(ds, cols, cfg: DataConfig, enc: Encoder, label: str, vocabs: dict[str, dict[str, int]], origin,
                   indices: list[int], skipped: Counter) -> list[dict]:
    """Rows `indices` of `ds` → tokenised examples; bad rows raise ValueError or are counted in `skipped`.
    `origin(index)` names the file and row of a multi-file source in messages."""
    used = [c for c in cols.values() if c is not None]
    sub = ds.select_columns(used)
    examples = []
    for start in range(0, len(indices), _CHUNK):
        chunk_idx = indices[start:start + _CHUNK]
        chunk = sub.select(chunk_idx)[:]  # dict of lists
        texts, meta = [], []
        for j, index in enumerate(chunk_idx):
            row = {role: (chunk[c][j] if c is not None else None) for role, c in cols.items()}
            try:
                texts.append(item_texts(enc.tok, row, cols))
            except BadRow as bad:
                _bad(bad, label, index, cfg, skipped, origin)
                continue
            meta.append((index, row["user"], row["group"]))
        if not texts:
            continue
        is_chat = [t[2] for t in texts]
        prompts = enc.prompts([t[0] for t in texts], is_chat)
        flat = enc.responses([y for t in texts for y in t[1]], [c for t in texts for c in [t[2]] * len(t[1])])
        ends = np.cumsum([len(t[1]) for t in texts]).tolist()
        for p, lo, hi, (index, user, group) in zip(prompts, [0] + ends[:-1], ends, meta, strict=True):
            try:
                if not p:
                    raise BadRow("empty_prompt", "the prompt is empty (no tokens)")
                if cols["responses"] is None:
                    p, c, r = truncate_pair(p, flat[lo], flat[lo + 1], cfg.max_length, cfg.max_prompt_length,
                                            keep_prefix=len(enc.prefix))
                    ranked = {}
                else:
                    p, ys = truncate_ranked(p, flat[lo:hi], cfg.max_length, cfg.max_prompt_length, len(enc.prefix))
                    c, r, ranked = ys[0], ys[-1], {"response_ids": ys}  # best first
            except BadRow as bad:
                _bad(bad, label, index, cfg, skipped, origin)
                continue
            examples.append({
                "prompt_ids": p, "chosen_ids": c, "rejected_ids": r, **ranked, "index": index,
                "user": vocabs["user"].get(_word(user), -1),
                "group": vocabs["group"].get(_word(group), -1),
            })
    return examples


def _bad(bad: BadRow, label: str, index: int, cfg: DataConfig, skipped: Counter, origin=None) -> None:
    if cfg.on_bad_row == "error":
        where = origin(index) if origin is not None else None
        raise ValueError(f"{label} row {index}{f' ({where})' if where else ''}: {bad.message} [{bad.reason}; set "
                         "data.on_bad_row=skip to drop such rows]") from None
    skipped[bad.reason] += 1


# ---------------------------------------------------------------------------------------------- public
def load_preference_data(cfg: DataConfig, tokenizer) -> PreferenceData:
    """Load, check and tokenise `cfg.path` (and the eval source) into a PreferenceData."""
    skipped = Counter()  # bad rows, and malformed lines of local JSON files, dropped by on_bad_row=skip
    ds, label, source_fp, origin = _load_source(cfg.path, cfg.split, "path", cfg, skipped)
    cols = _columns(ds, cfg, label)
    rows = list(range(len(ds)))
    if cfg.max_rows is not None and cfg.max_rows < len(rows):
        # a random subset, not the first rows: sources are often sorted by topic or annotator group
        rows = sorted(np.random.default_rng([cfg.seed, 1]).permutation(len(rows))[:cfg.max_rows].tolist())
    sources = [(ds, label, cols, rows, origin)]
    train_rows, eval_rows = rows, []
    if cfg.eval_fraction > 0:
        n_eval = int(round(cfg.eval_fraction * len(rows)))
        if not 1 <= n_eval < len(rows):
            raise ValueError(f"data.eval_fraction={cfg.eval_fraction} of {len(rows)} rows leaves an empty split")
        perm = np.random.default_rng([cfg.seed, 2]).permutation(len(rows))
        held = set(perm[:n_eval].tolist())
        train_rows = [r for i, r in enumerate(rows) if i not in held]
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        sources = [(ds, label, cols, train_rows, origin), (ds, label, cols, eval_rows, origin)]
    elif cfg.eval_path is not None or cfg.eval_split is not None:
        eds, elabel, efp, eorigin = _load_source(cfg.eval_path or cfg.path, cfg.eval_split or "train",
                                                 "eval_path" if cfg.eval_path else "path", cfg, skipped)
        source_fp += "|" + efp
        sources.append((eds, elabel, _columns(eds, cfg, elabel), list(range(len(eds))), eorigin))

    vocabs = {}
    for role in ("user", "group"):
        values = [v for d, _, c, _, _ in sources if c[role] is not None for v in d[c[role]]]
        vocabs[role] = _vocab(values)
    enc = Encoder(tokenizer)
    key = _fingerprint(cfg, source_fp, enc) + json.dumps(vocabs, sort_keys=True)
    splits = []
    for d, lab, c, r, o in sources:  # Dataset.map, cached, main process first (training/data_cache.py)
        examples, bad = tokenise_cached(d, r, functools.partial(_tokenise_rows, d, c, cfg, enc, lab, vocabs, o),
                                        key + lab, num_proc=cfg.num_proc)
        skipped.update(bad)
        splits.append(examples)
    check_ranking_size(splits, label)
    train, evals = splits[0], (splits[1] if len(splits) > 1 else [])
    if not train:
        raise ValueError(f"{label}: no usable rows (skipped: {dict(skipped)})")
    return PreferenceData(train=train, eval=evals, skipped=dict(skipped), user_vocab=vocabs["user"],
                          group_vocab=vocabs["group"], fingerprint=_fingerprint(cfg, source_fp, enc),
                          user_column=cols["user"])


def _fingerprint(cfg: DataConfig, source_fp: str, enc: Encoder) -> str:
    tok = enc.tok
    backend = getattr(tok, "backend_tokenizer", None)
    tok_id = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else tok.name_or_path
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("path", "eval_path", "on_bad_row", "num_proc")}
    blob = json.dumps({"v": _FORMAT_VERSION, "source": source_fp, "cfg": settings, "tok": tok_id,
                       "chat": getattr(tok, "chat_template", None), "prefix": enc.prefix, "eos": enc.eos,
                       "on_bad_row": cfg.on_bad_row}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------- checks against the run
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def model_positions(model_config) -> tuple[int, str] | None:
    """(number of positions, config key) of a Hugging Face model config, None when it names none."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_lengths(model_config, data_cfg: DataConfig) -> int | None:
    """Raise when data.max_length exceeds the model's positions (a longer batch would index past the position
    table after the engine is built); returns the positions (None: the config names none, nothing checked)."""
    found = model_positions(model_config)
    if found is None:
        return None
    positions, key = found
    if data_cfg.max_length > positions:
        raise ValueError(f"data.max_length={data_cfg.max_length} exceeds the model's {positions} positions ({key}); "
                         f"set data.max_length <= {positions}")
    return positions


def check_user_gate(gate_cfg, data: PreferenceData) -> None:
    """A gate that routes by user (gate.features user / prompt+user) needs user ids in the data: without them
    every pair takes the one no-user row and the gate is constant."""
    if getattr(gate_cfg, "uses_user", False) and not data.user_vocab:
        column = data.user_column or "user"
        how = (f"the {column!r} column has no values" if data.user_column is not None else
               f"the data has no {column!r} column (data.user_column)")
        raise ValueError(f"gate.features={gate_cfg.features!r} routes by user, but {how}; add user ids, point "
                         "data.user_column at them, or set gate.features=prompt")
