"""Every stage of the paper recipe (mixdpo_ds.apps.paper, launch/paper/README.md) on tiny local stand-ins: a tiny GPT-2
over the review vocabulary instead of GPT-2, a dozen local review rows instead of IMDb / Amazon books, the local
annotator rules and a tiny local Hugging Face text-classification model instead of hub reward models."""
import json

import numpy as np
import pytest
import torch

from mixdpo_ds.apps import paper
from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, generate, read_jsonl, write_jsonl
from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
from mixdpo_ds.apps.tiny import build_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny review LM directory and a local reviews jsonl ({text}) for each domain."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("paper")
    tok = build_review_tokenizer(str(root / "tok"))
    model_dir = build_tiny_model(str(root / "base"), tok, n_layer=1, n_embd=16, n_positions=64)
    files = {}
    for task, domain in (("multi", "movie"), ("contextual", "book")):
        rows = generate(ReviewsConfig(task=task, num_train=1, num_test=1, num_sft=12, seed=1))["sft"]
        texts = [{"text": f"{r['prompt']} {r['response']}"} for r in rows if r["domain"] == domain or task == "multi"]
        files[domain] = write_jsonl(texts, str(root / f"{domain}.jsonl"))
    return root, model_dir, files


def test_prepare_takes_prefixes_as_prompts(stand_ins):
    root, _, files = stand_ins
    out = paper.prepare(files["movie"], str(root / "prep_movie.jsonl"), n_words=3, domain="movie")
    rows = read_jsonl(out)
    assert rows and all(len(r["prompt"].split()) == 3 and r["text"].startswith(r["prompt"]) for r in rows)
    assert {r["domain"] for r in rows} == {"movie"}
    assert paper.prompt_of("a<br />b c d", 2) == "a b"


def test_all_stages_end_to_end(stand_ins):
    root, model_dir, files = stand_ins
    movie = paper.prepare(files["movie"], str(root / "movie_rows.jsonl"), n_words=3, domain="movie")
    book = paper.prepare(files["book"], str(root / "book_rows.jsonl"), n_words=3, domain="book")
    both = write_jsonl(read_jsonl(movie) + read_jsonl(book), str(root / "rows.jsonl"))

    sft_dir = paper.sft(model_dir, both, str(root / "sft"), steps=3, batch_size=4, lr=1e-3, max_length=24)
    compl = paper.sample(sft_dir, both, str(root / "compl.jsonl"), n=2, max_new_tokens=8)
    rows = read_jsonl(compl)
    assert len(rows) == len(read_jsonl(both)) and all(len(r["responses"]) == 2 for r in rows)

    rewards = paper.parse_rewards(["sentiment=local:sentiment", "informativeness=local:informativeness",
                                   "grammar=local:grammar"])
    scored = read_jsonl(paper.annotate(compl, str(root / "scored.jsonl"), rewards))
    r0 = scored[0]
    assert r0["scores"]["grammar"] == [rewards["grammar"](r0["prompt"], y) for y in r0["responses"]]

    multi = read_jsonl(paper.build_pairs(str(root / "scored.jsonl"), str(root / "pairs.jsonl"),
                                         groups=["sentiment", "informativeness", "grammar"]))
    assert multi and all(p["chosen"] != p["rejected"] for p in multi)
    for p in multi:  # temperature 0: the group's higher score wins
        f = rewards[p["group"]]
        assert f(p["prompt"], p["chosen"]) > f(p["prompt"], p["rejected"])
    ctx = read_jsonl(paper.build_pairs(str(root / "scored.jsonl"), str(root / "pairs_ctx.jsonl"),
                                       by_domain={"movie": "sentiment", "book": "informativeness"}))
    assert all(p["group"] == {"movie": "sentiment", "book": "informativeness"}[p["domain"]] for p in ctx)

    # train: the real CLI on the built pairs (padded to a few rows so a batch of 2 exists)
    pairs = multi + multi[:4]
    write_jsonl(pairs, str(root / "pairs_train.jsonl"))
    run = str(root / "run")
    rc = paper.train("configs/tiny.yaml", [f"model.name_or_path={sft_dir}", f"data.path={root / 'pairs_train.jsonl'}",
                                           "data.group_column=group", "data.max_length=32", "data.max_prompt_length=8",
                                           "data.on_bad_row=error", f"train.output_dir={run}", "train.max_steps=2",
                                           "train.micro_batch_size=2", "train.save_every=0", "train.plots=false",
                                           "experts.num_experts=3"])
    assert rc in (0, None)
    table = paper.evaluate(run, both, str(root / "table.json"), rewards, max_prompts=4, max_new_tokens=6)
    assert set(table) == {"expert 0", "expert 1", "expert 2", "mixture"}
    assert set(table["mixture"]) == set(rewards)
    # expert 0's row by hand: its seeded samples (seed 0 + k) on the first 4 prompts, each reward's mean and
    # standard error (sample sd / sqrt(4))
    from transformers import AutoTokenizer

    from mixdpo_ds.apps.sft import sample_responses
    from mixdpo_ds.training.export import load_expert

    export = f"{run}/export"
    prompts = [r["prompt"] for r in read_jsonl(both)[:4]]
    ys = sample_responses(load_expert(export, 0), AutoTokenizer.from_pretrained(f"{export}/expert_0"), prompts, 6, 0)
    for name, f in rewards.items():
        vals = np.array([f(p, y) for p, y in zip(prompts, ys, strict=True)])
        assert table["expert 0"][name]["mean"] == pytest.approx(vals.mean(), abs=1e-12), name
        assert table["expert 0"][name]["se"] == pytest.approx(vals.std(ddof=1) / 2, abs=1e-12), name
    assert json.load(open(root / "table.json"))["n_prompts"] == 4
    t2 = paper.evaluate(run, both, str(root / "table2.json"), rewards, max_new_tokens=6,
                        by_domain={"movie": "sentiment", "book": "informativeness"})
    assert set(t2["mixture"]) == {"movie (sentiment)", "book (informativeness)"}


def test_hf_pipeline_reward_on_a_tiny_local_classifier(stand_ins, tmp_path):
    """`hf:text-classification:DIR:LABEL` loads a transformers pipeline; the reward is P(LABEL) ∈ (0, 1) and the
    two labels' rewards sum to 1."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    _, model_dir, _ = stand_ins
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=64, num_labels=2,
                     pad_token_id=tok.pad_token_id, id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    torch.manual_seed(0)
    GPT2ForSequenceClassification(cfg).save_pretrained(str(tmp_path / "clf"))
    tok.save_pretrained(str(tmp_path / "clf"))
    pos = paper.load_reward(f"hf:text-classification:{tmp_path / 'clf'}:POS")
    neg = paper.load_reward(f"hf:text-classification:{tmp_path / 'clf'}:NEG")
    p = pos("review of jaws :", "the plot is great .")
    assert 0 < p < 1 and np.isclose(p + neg("review of jaws :", "the plot is great ."), 1.0, atol=1e-5)


def test_reward_spec_errors():
    with pytest.raises(ValueError, match="local rewards are"):
        paper.load_reward("local:humour")
    with pytest.raises(ValueError, match="must start with"):
        paper.load_reward("sentiment")
    with pytest.raises(ValueError, match="NAME=SPEC"):
        paper.parse_rewards(["sentiment"])
