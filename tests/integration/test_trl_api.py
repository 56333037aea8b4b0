"""The TRL-shaped API: a TRL-documentation-style DPO script (LoRA, an in-memory Dataset, a tokenizer object) runs
through `MixDPOTrainer` with K = 2 after changing three lines; with K = 1 its first-step loss equals TRL's own
DPOTrainer on the same batch; the exported LoRA adapters load with peft and reproduce the in-training log-probs.
"""
from __future__ import annotations

import difflib
import json
import math

import pytest
import torch

pytestmark = pytest.mark.integration

# The TRL script, as TRL's documentation writes it (tiny model and data; CPU, so bf16=False).
TRL_SCRIPT = '''
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

model = AutoModelForCausalLM.from_pretrained(MODEL)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
train_dataset = Dataset.from_list(ROWS)

training_args = DPOConfig(
    output_dir=OUT, per_device_train_batch_size=8, learning_rate=1e-2, max_steps=STEPS, logging_steps=1,
    max_length=64, beta=0.1, lr_scheduler_type="constant", bf16=False, report_to="none", seed=0,
)
peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
trainer = DPOTrainer(
    model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer,
    peft_config=peft_config,
)
result = trainer.train()
trainer.save_model()
'''

CHANGES = {  # the three lines a TRL user changes
    "from trl import DPOConfig, DPOTrainer": "from mixdpo_ds import MixDPOConfig, MixDPOTrainer",
    "training_args = DPOConfig(": "training_args = MixDPOConfig(num_experts=K,",
    "trainer = DPOTrainer(": "trainer = MixDPOTrainer(",
}


def mixdpo_script() -> str:
    lines = TRL_SCRIPT.splitlines()
    return "\n".join(CHANGES.get(line, line) for line in lines) + "\n"


def rows() -> list[dict]:
    # Prompts end in ':' and responses start with ' word': a token boundary for byte-level BPE, so TRL's joint
    # prompt+response tokenisation and ours (separately, then concatenated) give the same ids.
    return [{"prompt": f"Question {i}: is it good?", "chosen": f" yes, {i} is good", "rejected": f" no {i}"}
            for i in range(8)]


def run(script: str, model_dir: str, out: str, steps: int, k: int = 2) -> dict:
    namespace = {"MODEL": model_dir, "OUT": out, "ROWS": rows(), "STEPS": steps, "K": k}
    exec(compile(script, "dpo_script.py", "exec"), namespace)  # noqa: S102 - the test's own script
    return namespace


def test_the_change_is_three_lines():
    diff = [d for d in difflib.ndiff(TRL_SCRIPT.splitlines(), mixdpo_script().splitlines()) if d[:1] == "+"]
    assert len(diff) == 3, diff


@pytest.fixture(scope="module")
def k2_run(tiny_gpt2_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trl_k2") / "run")
    return run(mixdpo_script(), tiny_gpt2_dir, out, steps=3), out


def test_three_line_change_trains_two_lora_experts(k2_run):
    ns, out = k2_run
    trainer, result = ns["trainer"], ns["result"]
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert trainer.cfg.experts.kind == "lora" and trainer.cfg.experts.num_experts == 2
    assert [h["step"] for h in trainer.log_history if "loss" in h] == [1, 2, 3]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"} <= set(trainer.log_history[0])
    # every trainable weight of both experts moved from its initial value (the same build, same seed)
    from mixdpo_ds.model.experts import build_policy

    initial = dict(build_policy(trainer.cfg.model.name_or_path, trainer.cfg.experts,
                                seed=trainer.cfg.train.seed).named_parameters())
    trained = {n: p for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[1].split(".")[1] for n in trained} == {"expert_0", "expert_1"}
    unchanged = [n for n, p in trained.items() if torch.equal(p.detach().cpu(), initial[n].detach())]
    assert not unchanged, unchanged
    with open(f"{out}/export/export.json") as f:
        meta = json.load(f)
    assert meta["format"] == "adapters" and meta["num_experts"] == 2


def test_exported_adapters_reproduce_in_training_logps(k2_run, tiny_gpt2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mixdpo_ds.training.batch import model_inputs

    ns, out = k2_run
    trainer = ns["trainer"]
    batch = trainer.recipe._collate(trainer.data.train[:4])
    with torch.no_grad():
        trained = trainer.policy_forward(batch).logps  # (2B, K), the engine's own forward
    for k in range(2):
        expert_dir = f"{out}/export/expert_{k}"
        readme = open(f"{expert_dir}/README.md").read()
        assert "PeftModel.from_pretrained" in readme and "K = 2" in readme and "@misc" in readme
        base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
        model = PeftModel.from_pretrained(base, expert_dir).eval()
        inputs = model_inputs(batch, "cpu")
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        labels = inputs["labels"][:, 1:]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loaded = (lp * (labels != -100)).sum(-1)  # (2B,)
        torch.testing.assert_close(loaded, trained[:, k], rtol=1e-4, atol=1e-4)
    assert open(f"{out}/export/README.md").read().startswith("---\n")


def _first_log(history: list[dict]) -> dict:
    return next(h for h in history if "loss" in h)


def test_k1_first_step_equals_trl_dpo_trainer(tiny_gpt2_dir, tmp_path):
    """The LoRA script (K = 1): loss ln 2 at the first step in both (adapters start at zero), and the same
    policy log-probs of the batch, i.e. the same tokenisation and response-token sums."""
    trl = run(TRL_SCRIPT, tiny_gpt2_dir, str(tmp_path / "trl"), steps=1)
    ours = run(mixdpo_script(), tiny_gpt2_dir, str(tmp_path / "ours"), steps=1, k=1)
    a, b = _first_log(trl["trainer"].state.log_history), _first_log(ours["trainer"].log_history)
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/accuracies"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_k1_with_a_reference_model_equals_trl_loss_and_grad_norm(tiny_gpt2_dir, tmp_path):
    """Without LoRA and with a separate reference model the first-step loss is not ln 2: equal to TRL's, and so
    is the gradient norm of the full model."""
    from transformers import AutoModelForCausalLM

    script = TRL_SCRIPT.replace("    peft_config=peft_config,\n", "    ref_model=ref,\n")
    script = script.replace("train_dataset = Dataset", "ref = noisy(MODEL)\ntrain_dataset = Dataset")
    ours_script = "\n".join(CHANGES.get(line, line) for line in script.splitlines())
    ours_script = ours_script.replace("num_experts=K,", "num_experts=1, expert_kind='models',")

    def noisy(path):
        ref = AutoModelForCausalLM.from_pretrained(path)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        return ref

    results = []
    for text, out in ((script, "trl"), (ours_script, "ours")):
        ns = {"MODEL": tiny_gpt2_dir, "OUT": str(tmp_path / out), "ROWS": rows(), "STEPS": 1, "noisy": noisy}
        exec(compile(text, "dpo_script.py", "exec"), ns)  # noqa: S102
        t = ns["trainer"]
        results.append(_first_log(t.state.log_history if out == "trl" else t.log_history))
    a, b = results
    assert abs(a["loss"] - math.log(2)) > 1e-3  # a real comparison, not ln 2 twice
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_trainer_push_to_hub_up_to_the_upload_call(k2_run, monkeypatch):
    """No hub is reachable here: HfApi's create_repo / upload_folder are replaced by recorders."""
    from huggingface_hub import HfApi, RepoUrl

    ns, out = k2_run
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw))
                        or "https://huggingface.co/commit/1")
    assert ns["trainer"].push_to_hub("me/k2") == "https://huggingface.co/commit/1"
    assert [(c[0], c[1]) for c in calls] == [("create", "me/k2"), ("upload", "me/k2")]
    assert calls[1][2]["folder_path"] == f"{out}/export"


def test_names_eval_dataset_evaluate_and_push_at_the_end(tiny_gpt2_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """model as a path, an in-memory eval_dataset, evaluate(), push_to_hub=True at the end of training (the upload
    call recorded), and a second trainer in the same output_dir reusing the saved dataset copy."""
    from datasets import Dataset, DatasetDict
    from huggingface_hub import HfApi, RepoUrl

    from mixdpo_ds import MixDPOConfig, MixDPOTrainer

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw) or "url")
    train_ds, eval_ds = Dataset.from_list(rows()[:6]), Dataset.from_list(rows()[6:])
    args = MixDPOConfig(output_dir=str(tmp_path / "run"), num_experts=2, max_steps=2, per_device_train_batch_size=2,
                        max_length=64, push_to_hub=True, hub_model_id="me/auto", plots=False)
    trainer = MixDPOTrainer(model=tiny_gpt2_dir, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tiny_tokenizer)
    trainer.train()
    assert [(u["repo_id"], u["folder_path"]) for u in uploads] == [("me/auto", str(tmp_path / "run" / "export"))]
    metrics = trainer.evaluate()
    assert len(trainer.data.eval) == 2 and {"loss", "rewards/accuracies"} <= set(metrics)
    trainer.cleanup()
    saved = tmp_path / "run" / "inputs" / "train_dataset"
    stamp = (saved / ".complete").stat().st_mtime_ns
    again = MixDPOTrainer(model=tiny_gpt2_dir, args=args, train_dataset=train_ds, processing_class=tiny_tokenizer)
    assert (saved / ".complete").stat().st_mtime_ns == stamp  # same fingerprint: the copy (and its cache) is kept
    assert again.cfg.data.path == str(saved.resolve())
    with pytest.raises(ValueError, match="pass one split"):
        MixDPOTrainer(model=tiny_gpt2_dir, args=args, train_dataset=DatasetDict({"train": train_ds}))


def test_cli_trains_without_a_config_file(tiny_gpt2_dir, prefs_jsonl, tmp_path):
    """`mixdpo train` with flags and a.b=c alone: the same names as MixDPOConfig, the defaults for the rest."""
    from mixdpo_ds import cli
    from mixdpo_ds.training.config import load_config

    out = tmp_path / "run"
    assert cli.main(["train", "--model_name_or_path", tiny_gpt2_dir, "--dataset_name", prefs_jsonl,
                     "--num_experts", "2", "--learning_rate", "1e-2", "--max_length", "64", "--output_dir", str(out),
                     "--per_device_train_batch_size", "4", "train.max_steps=2", "plots=false", "export=false"]) == 0
    cfg = load_config(out / "config.yaml")
    assert (cfg.experts.num_experts, cfg.train.lr, cfg.train.max_steps, cfg.data.path) == (2, 1e-2, 2, prefs_jsonl)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in lines) == 2
