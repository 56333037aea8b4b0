"""The demo report (mixdpo_ds.apps.report): mean ± sd, expert alignment across seeds, acceptance checks, PNG figures;
and the SFT helpers (mixdpo_ds.apps.sft) on a tiny model."""
import math

import numpy as np
import pytest

from mixdpo_ds.apps import report

MULTI = ["sentiment", "informativeness", "grammar"]
CTX = ["movie", "book"]


def _metrics(groups, mapping, expert_by_group, mixture, gate_routing=0.34, conf=None):
    routed = {g: expert_by_group[k][groups.index(g)] for g, k in mapping.items()}
    routed["all"] = float(np.mean(list(routed.values())))
    return {"mixture": mixture, "expert_by_group": expert_by_group, "recovery": 0.45, "mapping": mapping,
            "gate_routing": gate_routing, "gate_confusion": conf or [[1] * len(expert_by_group)] * len(groups),
            "w_mean": [1 / len(expert_by_group)] * len(expert_by_group), "routed": routed, "top1": mixture}


def fake_result(seed: int, perm: list[int]) -> dict:
    """One seed's result. `perm[j]` = the Mix-DPO expert matched to group j (experts permute between seeds).
    Expert matched to group j scores 0.85 on group j, 0.5 elsewhere; DPO 0.65 everywhere."""
    ebg = [[0.5] * 3 for _ in range(3)]
    for j, k in enumerate(perm):
        ebg[k][j] = 0.85
    acc = {"all": 0.65, **{g: 0.65 for g in MULTI}}
    mix_acc = {"all": 0.66, **{g: 0.66 for g in MULTI}}
    ctx_dpo = {"all": 0.70, **{g: 0.70 for g in CTX}}
    ctx_moe = {"all": 0.85, **{g: 0.85 for g in CTX}}
    ceil = lambda groups: {"groups": groups, "oracle_recovery": 0.55, "prompt_recovery": 0.33,  # noqa: E731
                           "chance_recovery": 0.34, "disagreement": np.eye(len(groups)).tolist(),
                           **{k: {"all": 0.7, **{g: 0.7 for g in groups}} for k in (
                               "oracle_routed_accuracy", "best_mixture_accuracy", "best_single_reward_accuracy")}}
    samples = {"reference (SFT)": {g: 0.5 for g in MULTI}, "DPO": {g: 0.6 for g in MULTI},
               "mixture (z ~ w)": {g: 0.6 for g in MULTI}}
    for j, k in enumerate(perm):  # expert matched to group j is best on reward j
        samples[f"expert {k}"] = {g: (0.9 if g == MULTI[j] else 0.4) for g in MULTI}
    cols = ["movie (sentiment)", "book (informativeness)"]
    ctx_samples = {n: {c: 0.5 for c in cols} for n in ("reference (SFT)", "DPO", "expert 0", "expert 1",
                                                        "mixture (z ~ w)", "mixture (top-1 w)")}
    trace = {"G": 3, "names": sorted(MULTI), "steps": list(range(30)), "sums": [np.ones((3, 3)).tolist()] * 30,
             "counts": [[3, 3, 3]] * 30}
    ctrace = {"G": 2, "names": sorted(CTX), "steps": list(range(30)), "sums": [np.ones((2, 2)).tolist()] * 30,
              "counts": [[2, 2]] * 30}
    return {
        "seed": seed, "multi": {"groups": MULTI, "ceilings": ceil(MULTI)},
        "contextual": {"groups": CTX, "ceilings": ceil(CTX)},
        "dpo_multi": {"metrics": _metrics(MULTI, {"sentiment": 0}, [[0.65] * 3], acc), "trace": trace, "seconds": 1},
        "mixdpo": {"metrics": _metrics(MULTI, {g: perm[j] for j, g in enumerate(MULTI)}, ebg, mix_acc),
                   "trace": trace, "seconds": 2},
        "dpo_ctx": {"metrics": _metrics(CTX, {"movie": 0}, [[0.7, 0.7]], ctx_dpo), "trace": ctrace, "seconds": 1},
        "moedpo": {"metrics": _metrics(CTX, {"movie": 1, "book": 0}, [[0.6, 0.85], [0.85, 0.6]], ctx_moe,
                                       gate_routing=0.95, conf=[[2, 98], [95, 5]]), "trace": ctrace, "seconds": 2},
        "samples": {"multi": samples, "contextual": ctx_samples, "multi_examples": {"DPO": ["a", "b", "c"]},
                    "contextual_examples": {"DPO": ["a"]}, "multi_prompts": ["p"], "contextual_prompts": ["q"]},
    }


def test_mean_sd_by_hand():
    """[0.8, 0.9]: mean 0.85, sample sd sqrt(((−.05)² + .05²) / 1) = 0.070711; one value → sd 0; NaN dropped."""
    m, s = report.mean_sd([0.8, 0.9])
    assert m == pytest.approx(0.85) and s == pytest.approx(0.070711, abs=1e-6)
    assert report.mean_sd([0.7]) == (0.7, 0.0)
    assert report.mean_sd([0.7, float("nan")]) == (0.7, 0.0)
    assert math.isnan(report.mean_sd([])[0])
    assert report.fmt([0.8, 0.9]) == "0.850 ± 0.071"


def test_experts_are_aligned_across_seeds_by_their_matched_group():
    """Seed 0 matches (sentiment, info, grammar) to experts (0, 1, 2), seed 1 to (2, 0, 1): after alignment the
    expert→sentiment row is 0.85 ± 0 on sentiment pairs in both, not a mix of 0.85 and 0.5."""
    results = [fake_result(0, [0, 1, 2]), fake_result(1, [2, 0, 1])]
    lines = report.expert_group_table(results, "mixdpo", "multi")
    row = next(line for line in lines if line.startswith("| expert→sentiment"))
    assert row == "| expert→sentiment | 0.850 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 |"
    table1 = report.sample_table(results, "multi", "mixdpo")
    assert "| expert→grammar | 0.400 ± 0.000 | 0.400 ± 0.000 | 0.900 ± 0.000 |" in table1


def test_acceptance_checks_pass_and_fail():
    results = [fake_result(0, [0, 1, 2]), fake_result(1, [2, 0, 1])]
    checks = {c: ok for c, ok, _ in report.acceptance(results)}
    assert all(checks[c] for c in checks if c.startswith("Mix-DPO: expert→"))  # 0.85 vs 0.65
    assert checks["Mix-DPO recovery above chance"]  # 0.45 vs 0.34
    assert checks["MoE-DPO held-out accuracy ≥ DPO + 0.10 (contextual)"]  # 0.85 vs 0.70
    assert checks["MoE-DPO gate routing accuracy > 0.9"]
    assert next(ok for c, ok in checks.items() if c.startswith("Table 1"))
    bad = fake_result(0, [0, 1, 2])
    bad["mixdpo"]["metrics"]["routed"]["grammar"] = 0.70  # 0.70 < 0.65 + 0.10
    bad["moedpo"]["metrics"]["gate_routing"] = 0.6
    checks = {c: ok for c, ok, _ in report.acceptance([bad])}
    assert not checks["Mix-DPO: expert→grammar on grammar pairs ≥ DPO + 0.10"]
    assert not checks["MoE-DPO gate routing accuracy > 0.9"]


def test_write_report_renders_pngs(tmp_path):
    results = [fake_result(0, [0, 1, 2]), fake_result(1, [2, 0, 1])]
    config = {"n_layer": 2, "n_embd": 64, "sft_steps": 1, "steps": 1, "batch_size": 1, "lr": 0.1, "beta": 0.1,
              "num_train": 1, "num_test": 1, "fast": False}
    path = report.write_report(str(tmp_path), results, config, 12.0)
    text = open(path).read()
    assert "Table 1 shape" in text and "Table 2 shape" in text and "Acceptance checks" in text
    for name in ("fig1_mixdpo_resp.png", "fig3_moedpo_resp.png", "fig4_gate_confusion.png",
                 "fig_accuracy_by_group.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text


def test_gate_confusion_aligns_experts():
    """Seed 0 conf [[2, 98], [95, 5]]: movie prompts go to expert 1, book to expert 0 → columns reordered [1, 0]:
    [[98, 2], [5, 95]]. Seed 1 [[90, 10], [20, 80]] is already aligned; the sum is [[188, 12], [25, 175]].
    A seed whose rows share one argmax expert ([[60, 40], [70, 30]]) keeps its expert order."""
    seed0, seed1 = fake_result(0, [0, 1, 2]), fake_result(1, [0, 1, 2])
    seed1["moedpo"]["metrics"]["gate_confusion"] = [[90, 10], [20, 80]]
    assert report.aligned_gate_confusion([seed0]).tolist() == [[98, 2], [5, 95]]
    assert report.aligned_gate_confusion([seed0, seed1]).tolist() == [[188, 12], [25, 175]]
    seed1["moedpo"]["metrics"]["gate_confusion"] = [[60, 40], [70, 30]]
    assert report.aligned_gate_confusion([seed1]).tolist() == [[60, 40], [70, 30]]


# ---------------------------------------------------------------------------------------------- sft helpers
def test_collate_lm_masks_prompt_and_padding():
    """ids [5, 6, 7] with 1 prompt token, T = 4 (the other row has 4 tokens): labels [-100, 6, 7, -100] with
    response_only, [5, 6, 7, -100] without."""
    from mixdpo_ds.apps.sft import collate_lm

    batch = collate_lm([([5, 6, 7], 1), ([1, 2, 3, 4], 2)], pad_id=0, response_only=True)
    assert batch["labels"][0].tolist() == [-100, 6, 7, -100]
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 0] and batch["attention_mask"][0].tolist() == [1, 1, 1, 0]
    assert collate_lm([([5, 6, 7], 1), ([1, 2, 3, 4], 2)], 0, False)["labels"][0].tolist() == [5, 6, 7, -100]


def test_sft_lowers_the_loss_and_sampling_uses_the_vocabulary(tmp_path):
    import torch

    from mixdpo_ds.apps.datasets import vocab
    from mixdpo_ds.apps.datasets.reviews import ReviewsConfig, generate
    from mixdpo_ds.apps.datasets.tokenizer import build_review_tokenizer
    from mixdpo_ds.apps.sft import SFTConfig, build_tiny_base, sample_responses

    torch.set_num_threads(1)
    tok = build_review_tokenizer(str(tmp_path / "tok"))
    assert len(tok) == len(vocab.all_words()) + 3
    assert tok.decode(tok("the plot is great .")["input_ids"]) == "the plot is great ."
    rows = generate(ReviewsConfig(num_train=1, num_test=1, num_sft=200))["sft"]
    out, losses = build_tiny_base(str(tmp_path / "m"), tok, rows, SFTConfig(steps=25, batch_size=16, lr=1e-2),
                                  n_embd=32)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ys = sample_responses(model, tok, [r["prompt"] for r in rows[:6]], seed=1)
    assert ys == sample_responses(model, tok, [r["prompt"] for r in rows[:6]], seed=1)  # seeded
    assert all(set(y.split()) <= set(vocab.all_words()) for y in ys)
    # a stop token ends the sample and is kept; the same draws up to it (same seed, same prompts)
    stopped = sample_responses(model, tok, [r["prompt"] for r in rows[:6]], seed=1, stop_tokens=("and", "."))
    for y, full in zip(stopped, ys, strict=True):
        words = y.split()
        assert all(w not in ("and", ".") for w in words[:-1])
        assert full.startswith(y) and (words[-1] in ("and", ".") or y == full)
    # temperature scales the logits: near 0 it is argmax decoding
    prompts = [r["prompt"] for r in rows[:6]]
    assert sample_responses(model, tok, prompts, temperature=1e-4) == sample_responses(model, tok, prompts, greedy=True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_responses(model, tok, prompts, temperature=0.0)
    with pytest.raises(ValueError, match="not in the tokenizer"):
        sample_responses(model, tok, ["review of heat :"], stop_tokens=("zebra",))
