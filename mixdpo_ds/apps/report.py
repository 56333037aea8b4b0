"""The demo's report: markdown tables shaped like the paper's Tables 1 and 2, held-out accuracies next to the Bayes
ceilings, the acceptance checks, and PNG figures (Figures 1/3: responsibilities per expert per group over training;
Figure 4: gate routing confusion). Mean ± sd over seeds (sample sd, ddof = 1; "± 0" with one seed).

Experts are exchangeable: expert k of seed 0 and expert k of seed 1 need not play the same role. Rows about
experts are therefore aligned across seeds by the expert↔group matching of each seed (best permutation of argmax
responsibilities on held-out pairs), and named by the group they matched ("expert→sentiment").
"""
from __future__ import annotations

import os

import numpy as np


def mean_sd(values) -> tuple[float, float]:
    """(mean, sample sd); sd = 0 for one value. Example: [0.8, 0.9] → (0.85, 0.0707)."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values) -> str:
    m, s = mean_sd(values)
    return "n/a" if np.isnan(m) else f"{m:.3f} ± {s:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _expert_for(result: dict, run: str, group: str) -> int | None:
    return result[run]["metrics"]["mapping"].get(group)


# --------------------------------------------------------------------------------------------- tables
def accuracy_table_multi(results: list[dict]) -> list[str]:
    groups = results[0]["multi"]["groups"]
    cols = ["all", *groups]

    def row(name, get):
        return [name] + [fmt([get(r, c) for r in results]) for c in cols]

    ceil = lambda key: lambda r, c: r["multi"]["ceilings"][key][c]  # noqa: E731
    rows = [
        row("DPO (K=1)", lambda r, c: r["dpo_multi"]["metrics"]["mixture"][c]),
        row("Mix-DPO K=3, mixture P = Σ w σ(Δ)", lambda r, c: r["mixdpo"]["metrics"]["mixture"][c]),
        row("Mix-DPO K=3, group's matched expert (routed)", lambda r, c: r["mixdpo"]["metrics"]["routed"][c]),
    ]
    if "moe_user" in results[0]:
        rows += [
            row("MoE-DPO K=3 gated on the annotator id, P = Σ w(u) σ(Δ)",
                lambda r, c: r["moe_user"]["metrics"]["mixture"][c]),
            row("MoE-DPO K=3 (annotator id), group's matched expert",
                lambda r, c: r["moe_user"]["metrics"]["routed"][c]),
        ]
    rows += [
        row("ceiling: best single reward (group-blind)", ceil("best_single_reward_accuracy")),
        row("ceiling: best mixture (true rules, global w)", ceil("best_mixture_accuracy")),
        row("ceiling: oracle routed (true rule of the group)", ceil("oracle_routed_accuracy")),
    ]
    return _table(["held-out preference accuracy", *cols], rows)


def expert_group_table(results: list[dict], run: str, task: str) -> list[str]:
    """Accuracy of every (aligned) expert on every group's pairs, next to DPO's."""
    groups = results[0][task]["groups"]
    dpo = "dpo_multi" if task == "multi" else "dpo_ctx"
    rows = [["DPO"] + [fmt([r[dpo]["metrics"]["expert_by_group"][0][j] for r in results]) for j in range(len(groups))]]
    for g in groups:
        vals = [[r[run]["metrics"]["expert_by_group"][_expert_for(r, run, g)][j]
                 if _expert_for(r, run, g) is not None else None for r in results] for j in range(len(groups))]
        rows.append([f"expert→{g}"] + [fmt(v) for v in vals])
    return _table(["accuracy on the pairs of group →", *groups], rows)


def accuracy_table_contextual(results: list[dict]) -> list[str]:
    groups = results[0]["contextual"]["groups"]
    cols = ["all", *groups]

    def row(name, get):
        return [name] + [fmt([get(r, c) for r in results]) for c in cols]

    ceil = lambda key: lambda r, c: r["contextual"]["ceilings"][key][c]  # noqa: E731
    rows = [
        row("DPO (K=1)", lambda r, c: r["dpo_ctx"]["metrics"]["mixture"][c]),
        row("MoE-DPO K=2, P = Σ w(x) σ(Δ)", lambda r, c: r["moedpo"]["metrics"]["mixture"][c]),
        row("MoE-DPO K=2, top-1 expert of w(x)", lambda r, c: r["moedpo"]["metrics"]["top1"][c]),
        row("ceiling: best single prompt-blind reward", ceil("best_single_reward_accuracy")),
        row("ceiling: oracle routed (true rule of the domain)", ceil("oracle_routed_accuracy")),
    ]
    return _table(["held-out preference accuracy", *cols], rows)


def sample_table(results: list[dict], task: str, run: str) -> list[str]:
    """Paper Table 1 (multi) / Table 2 (contextual): mean reward of samples per model, experts aligned by group,
    and each model's P(end-of-sequence | a complete held-out review) where the run measured it."""
    groups = results[0][task]["groups"]
    first = results[0]["samples"][task]
    cols = list(next(iter(first.values())).keys())
    names = [n for n in first if not n.startswith("expert ")]
    has_end = task + "_end_probability" in results[0]["samples"]

    def end(r, name):
        return r["samples"].get(task + "_end_probability", {}).get(name)

    def row(label, name_of):
        vals = [fmt([r["samples"][task][name_of(r)][c] for r in results if name_of(r)]) for c in cols]
        if has_end:
            ends = [end(r, name_of(r)) for r in results if name_of(r)]
            vals.append(fmt(ends) if ends and all(e is not None for e in ends) else "n/a")
        return [label, *vals]

    rows = [row(name, lambda r, n=name: n) for name in names[:2]]
    for g in groups:
        rows.append(row(f"expert→{g}", lambda r, g=g: None if _expert_for(r, run, g) is None
                        else f"expert {_expert_for(r, run, g)}"))
    rows += [row(name, lambda r, n=name: n) for name in names[2:]]
    return _table(["samples scored by →", *cols, *(["P(end | review)"] if has_end else [])], rows)


# --------------------------------------------------------------------------------------------- checks
def acceptance(results: list[dict]) -> list[tuple[str, bool, str]]:
    """The demo's acceptance list, each as (criterion, holds, measured), on the means over seeds."""
    m = lambda vals: mean_sd(vals)[0]  # noqa: E731
    groups = results[0]["multi"]["groups"]
    checks = []
    for g in groups:
        routed = m([r["mixdpo"]["metrics"]["routed"][g] for r in results])
        dpo = m([r["dpo_multi"]["metrics"]["mixture"][g] for r in results])
        checks.append((f"Mix-DPO: expert→{g} on {g} pairs ≥ DPO + 0.10", routed >= dpo + 0.10,
                       f"{routed:.3f} vs DPO {dpo:.3f}"))
    rec = m([r["mixdpo"]["metrics"]["recovery"] for r in results])
    chance = m([r["multi"]["ceilings"]["chance_recovery"] for r in results])
    oracle = m([r["multi"]["ceilings"]["oracle_recovery"] for r in results])
    checks.append(("Mix-DPO recovery above chance", rec > chance,
                   f"{rec:.3f} (chance {chance:.3f}, ceiling {oracle:.3f})"))
    mix = m([r["mixdpo"]["metrics"]["mixture"]["all"] for r in results])
    dpo_all = m([r["dpo_multi"]["metrics"]["mixture"]["all"] for r in results])
    checks.append(("Mix-DPO mixture accuracy not below DPO's (−0.01 tolerance)", mix >= dpo_all - 0.01,
                   f"{mix:.3f} vs DPO {dpo_all:.3f}"))
    moe = m([r["moedpo"]["metrics"]["mixture"]["all"] for r in results])
    dpo_ctx = m([r["dpo_ctx"]["metrics"]["mixture"]["all"] for r in results])
    checks.append(("MoE-DPO held-out accuracy ≥ DPO + 0.10 (contextual)", moe >= dpo_ctx + 0.10,
                   f"{moe:.3f} vs DPO {dpo_ctx:.3f}"))
    route = m([r["moedpo"]["metrics"]["gate_routing"] for r in results])
    checks.append(("MoE-DPO gate routing accuracy > 0.9", route > 0.9, f"{route:.3f}"))
    diag = _table1_diagonal(results)
    checks.append(("Table 1: on each annotator's reward the best expert is the one matched to that annotator",
                   all(diag.values()), ", ".join(f"{g}: {'yes' if ok else 'no'}" for g, ok in diag.items())))
    return checks


def _table1_diagonal(results: list[dict]) -> dict[str, bool]:
    """For each annotator reward g: is expert→g's mean sample score the highest among the three experts?"""
    groups = results[0]["multi"]["groups"]
    out = {}
    for g in groups:
        score = {}
        for h in groups:
            vals = [r["samples"]["multi"][f"expert {_expert_for(r, 'mixdpo', h)}"][g] for r in results
                    if _expert_for(r, "mixdpo", h) is not None]
            score[h] = mean_sd(vals)[0] if vals else -np.inf
        out[g] = max(score, key=score.get) == g
    return out


# --------------------------------------------------------------------------------------------- figures
def plot_responsibilities(result: dict, run: str, task: str, path: str, smooth: int = 10) -> str:
    """Figures 1 / 3: mean training responsibility of each expert on each group's pairs over steps (one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = result[run]["trace"]
    names = trace["names"]  # group ids of the trainer = sorted group names
    sums, counts = np.array(trace["sums"]), np.array(trace["counts"])  # (S, G, K), (S, G)
    kernel = np.ones(smooth)
    s = np.apply_along_axis(lambda x: np.convolve(x, kernel, "valid"), 0, sums)
    c = np.apply_along_axis(lambda x: np.convolve(x, kernel, "valid"), 0, counts)
    resp = s / np.maximum(c, 1)[:, :, None]
    steps = np.array(trace["steps"][smooth - 1:]) + 1
    K = resp.shape[2]
    fig, axes = plt.subplots(1, K, figsize=(4 * K, 3.2), sharey=True)
    mapping = {k: g for g, k in result[run]["metrics"]["mapping"].items()}
    for k, ax in enumerate(np.atleast_1d(axes)):
        for j, g in enumerate(names):
            ax.plot(steps, resp[:, j, k], label=f"{g} pairs")
        ax.axhline(1.0 / K, color="grey", lw=0.8, ls=":")
        ax.set_title(f"expert {k} (matched: {mapping.get(k, '-')})")
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel(f"mean responsibility q_k ({smooth}-step window)")
    np.atleast_1d(axes)[-1].legend(fontsize=8)
    fig.suptitle(f"{run}: responsibilities per expert per group (seed {result['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def aligned_gate_confusion(results: list[dict]) -> np.ndarray:
    """(G, G) counts of argmax w(x) of the MoE gate against the prompt's domain on held-out pairs, summed over
    seeds, each seed's expert columns reordered so that column j is the expert most group-j prompts go to (when
    those experts are distinct; otherwise the seed's columns stay in expert order)."""
    groups = results[0]["contextual"]["groups"]
    total = np.zeros((len(groups), len(groups)))
    for r in results:
        conf = np.array(r["moedpo"]["metrics"]["gate_confusion"])  # (G, K)
        order = np.argmax(conf, axis=1) if len(set(np.argmax(conf, axis=1))) == len(groups) else np.arange(len(groups))
        total += conf[:, order]
    return total


def plot_gate_confusion(results: list[dict], path: str) -> str:
    """Figure 4: `aligned_gate_confusion` as row fractions (and counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results[0]["contextual"]["groups"]
    total = aligned_gate_confusion(results)
    frac = total / np.maximum(total.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4, 3.4))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(groups)):
        for j in range(len(groups)):
            ax.text(j, i, f"{frac[i, j]:.2f}\n({int(total[i, j])})", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(groups)), [f"expert→{g}" for g in groups])
    ax.set_yticks(range(len(groups)), [f"{g} prompts" for g in groups])
    ax.set_title(f"MoE gate routing (held-out, {len(results)} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(results: list[dict], path: str) -> str:
    """Held-out accuracy per group: DPO, the group's matched Mix-DPO expert, and the ceilings (bars, mean ± sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results[0]["multi"]["groups"]
    series = {
        "DPO": [[r["dpo_multi"]["metrics"]["mixture"][g] for r in results] for g in groups],
        "Mix-DPO expert→group": [[r["mixdpo"]["metrics"]["routed"][g] for r in results] for g in groups],
        "ceiling: oracle routed": [[r["multi"]["ceilings"]["oracle_routed_accuracy"][g] for r in results]
                                   for g in groups],
    }
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series.items()):
        ms = [mean_sd(v) for v in vals]
        ax.bar(np.arange(len(groups)) + i * width, [x[0] for x in ms], width, yerr=[x[1] for x in ms], label=name)
    ax.set_xticks(np.arange(len(groups)) + width, groups)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("held-out accuracy on the group's pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- report
def health_table(results: list[dict]) -> list[str]:
    """The collapse detectors' verdicts (core/collapse.py) on each mixture run's held-out pairs, over the seeds."""
    rows = []
    for run in ("mixdpo", "moedpo", "moe_user"):
        found = [r[run]["metrics"]["collapse"] for r in results if run in r and "collapse" in r[run]["metrics"]]
        if not found:
            continue
        flagged = sum(bool(c["merged"] or c["dead"] or c["saturated"]) for c in found)
        rows.append([run, str(sum(len(c["merged"]) for c in found)), str(sum(len(c["dead"]) for c in found)),
                     str(sum(c["saturated"] for c in found)), fmt([c["max_margin_corr"] for c in found]),
                     "healthy" if not flagged else f"**collapse in {flagged}/{len(found)} seed(s)**"])
    return _table(["run", "merged expert pairs", "dead experts", "saturated gates", "max margin correlation",
                   "verdict"], rows)


def _ceiling_lines(results: list[dict], task: str) -> list[str]:
    c = [r[task]["ceilings"] for r in results]
    groups = c[0]["groups"]
    dis = np.mean([np.array(x["disagreement"]) for x in c], axis=0)
    lines = [f"Recovery ceiling (true posterior from the label): {fmt([x['oracle_recovery'] for x in c])}; "
             f"from the prompt alone: {fmt([x['prompt_recovery'] for x in c])}; chance: "
             f"{fmt([x['chance_recovery'] for x in c])}.", "",
             "Pairwise label disagreement between groups (expected rate, held-out pairs, mean over seeds):", ""]
    lines += _table(["", *groups], [[g, *(f"{v:.3f}" for v in row)] for g, row in zip(groups, dis, strict=True)])
    return lines


def write_report(out_dir: str, results: list[dict], config: dict, seconds: float) -> str:
    """Write out_dir/report.md and the figures; returns the report path."""
    figs = {
        "fig1": plot_responsibilities(results[0], "mixdpo", "multi", os.path.join(out_dir, "fig1_mixdpo_resp.png")),
        "fig3": plot_responsibilities(results[0], "moedpo", "contextual",
                                      os.path.join(out_dir, "fig3_moedpo_resp.png")),
        "fig4": plot_gate_confusion(results, os.path.join(out_dir, "fig4_gate_confusion.png")),
        "acc": plot_accuracy(results, os.path.join(out_dir, "fig_accuracy_by_group.png")),
    }
    n = len(results)
    checks = acceptance(results)
    L = [f"# mixdpo demo report ({n} seed(s), mean ± sd)", "",
         f"Command: `mixdpo demo --out {out_dir} --seeds {n}{' --fast' if config.get('fast') else ''}`; "
         f"wall time {seconds:.1f} s ({seconds / 60:.2f} min).",
         f"Model: GPT-2 n_layer={config['n_layer']}, n_embd={config['n_embd']}, word-level vocabulary of the review "
         f"generator; SFT {config['sft_steps']} steps; heads on the frozen SFT trunk, lr {config['lr']}, "
         f"β {config['beta']}. Multi-reward task: DPO and Mix-DPO {config['steps']} steps × {config['batch_size']} "
         f"pairs, {config['num_train']} training pairs; contextual task (DPO, MoE-DPO) and the annotator-id "
         f"MoE-DPO: {config.get('ctx_steps', config['steps'])} steps × "
         f"{config.get('ctx_batch_size', config['batch_size'])} pairs, "
         f"{config.get('num_train_contextual', config['num_train'])} contextual training pairs; "
         f"{config['num_test']} held-out pairs per task.", "",
         "## Acceptance checks", ""]
    L += _table(["criterion", "holds", "measured (mean over seeds)"],
                [[c, "yes" if ok else "**no**", v] for c, ok, v in checks])
    failing = [c for c, ok, _ in checks if not ok]
    L += ["", f"Does not hold: {'; '.join(failing)}." if failing else "All checks hold.", "",
          "How to read it: on the multi-reward task the annotator group is drawn independently of prompt and "
          "responses, so a single pair says little about its group (the recovery ceiling below is the true "
          "posterior's) and no global mixture can beat DPO's held-out accuracy by much (ceiling 'best mixture' vs "
          "'best single reward'). What Mix-DPO can show there is specialisation: the expert matched to a group "
          "against DPO on that group's pairs. Routing on information that identifies the group (the prompt's domain "
          "for MoE-DPO, or the annotator id) turns specialisation into held-out accuracy."]
    L += ["", "## Mix-DPO, multi-reward task (paper §4.1)", "",
          "Each pair is labelled by one of three annotator groups (sentiment / informativeness / grammar), drawn "
          "independently of prompt and responses.", ""]
    L += accuracy_table_multi(results)
    L += ["", f"Mix-DPO recovery accuracy (best-permutation argmax q vs true group): "
          f"{fmt([r['mixdpo']['metrics']['recovery'] for r in results])}."]
    if "moe_user" in results[0]:
        L += [f"MoE-DPO on the annotator id: recovery {fmt([r['moe_user']['metrics']['recovery'] for r in results])}, "
              f"gate routing {fmt([r['moe_user']['metrics']['gate_routing'] for r in results])} (each annotator id "
              "belongs to one group, so the gate pools the evidence of all of an annotator's pairs)."]
    L += [""]
    L += _ceiling_lines(results, "multi")
    L += ["", "Every expert on every group's pairs:", ""] + expert_group_table(results, "mixdpo", "multi")
    L += ["", "### Table 1 shape: mean annotator reward of samples from held-out prompts", ""]
    L += sample_table(results, "multi", "mixdpo")
    L += ["", f"![responsibilities]({os.path.basename(figs['fig1'])})",
          f"![accuracy by group]({os.path.basename(figs['acc'])})", "",
          "## MoE-DPO, contextual task (paper §4.2)", "",
          "Movie prompts are labelled by sentiment annotators, book prompts by informativeness annotators; the gate "
          "reads the frozen trunk's hidden state at the last prompt token.", ""]
    L += accuracy_table_contextual(results)
    L += ["", f"Gate routing accuracy (argmax w(x) vs domain, best matching): "
          f"{fmt([r['moedpo']['metrics']['gate_routing'] for r in results])}.", ""]
    L += _ceiling_lines(results, "contextual")
    L += ["", "Every expert on every domain's pairs:", ""] + expert_group_table(results, "moedpo", "contextual")
    L += ["", "### Table 2 shape: each domain's own reward of samples from held-out prompts", ""]
    L += sample_table(results, "contextual", "moedpo")
    L += ["", f"![responsibilities]({os.path.basename(figs['fig3'])})",
          f"![gate confusion]({os.path.basename(figs['fig4'])})", "", "## Samples (seed 0)", ""]
    s0 = results[0]["samples"]
    for task in ("multi", "contextual"):
        L.append(f"Prompts: {s0[task + '_prompts']}")
        L.append("")
        L += [f"- {name}: " + " | ".join(ex) for name, ex in s0[task + "_examples"].items()]
        L.append("")
    L += ["## Mixture health (collapse detectors on the held-out pairs)", "",
          "Merged: two experts whose margins agree in sign on ≥ 95% of the pairs and correlate ≥ 0.95; dead: mean "
          "responsibility < 0.02; saturated: gate entropy < 5% of log K while experts are merged "
          "(mixdpo_ds/core/collapse.py, docs/math.md §12). Counts are summed over the seeds.", ""]
    L += health_table(results) + [""]
    L += ["## Time", ""]
    L += _table(["run", "seconds per seed (train + evaluate)"],
                [[k, fmt([r[k]["seconds"] for r in results])] for k in ("dpo_multi", "mixdpo", "dpo_ctx", "moedpo",
                                                                          "moe_user") if k in results[0]])
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path
