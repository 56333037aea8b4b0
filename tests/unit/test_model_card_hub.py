"""Every export directory has a model card; lora exports K adapters (merged copies optional); push_to_hub is
tested up to the upload call (no hub is reachable here: HfApi's two network calls are replaced by recorders)."""
from __future__ import annotations

import json

import pytest
import torch

from mixdpo_ds.model.experts import ExpertsConfig, build_policy
from mixdpo_ds.training.config import load_config
from mixdpo_ds.training.export import export_experts, load_expert
from mixdpo_ds.training.hub import check_export, push_export


def _cfg(model_dir: str, kind: str):
    return load_config(None, [f"model_name_or_path={model_dir}", "dataset_name=trl-lib/ultrafeedback_binarized",
                              f"expert_kind={kind}", "num_experts=2", "beta=0.25"])


@pytest.mark.parametrize("kind", ["heads", "lora", "models"])
def test_every_export_dir_has_a_model_card(tiny_gpt2_dir, tiny_tokenizer, tmp_path, kind):
    from huggingface_hub import ModelCard

    cfg = _cfg(tiny_gpt2_dir, kind)
    policy = build_policy(tiny_gpt2_dir, cfg.experts, seed=0)
    out = export_experts(policy, None, str(tmp_path / "export"), tiny_tokenizer, cfg=cfg, merged=kind == "lora")
    dirs = [f"{out}/expert_{k}" for k in range(2)] + ([f"{out}/merged/expert_{k}" for k in range(2)]
                                                      if kind == "lora" else [])
    for d in [out, *dirs]:
        card = ModelCard.load(f"{d}/README.md")
        assert "mixdpo" in card.data.tags
        assert "Bohne" in card.text and "K = 2" in card.text and "β = 0.25" in card.text
        assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    adapter = ModelCard.load(f"{out}/expert_0/README.md")
    assert (adapter.data.library_name, "PeftModel.from_pretrained" in adapter.text) == \
        (("peft", True) if kind == "lora" else ("transformers", False))
    meta = json.load(open(f"{out}/export.json"))
    assert meta["format"] == ("adapters" if kind == "lora" else "models")
    assert check_export(out) == 2


def test_lora_export_is_adapters_and_merged_copies_agree(tiny_gpt2_dir, tiny_tokenizer, tmp_path):
    """expert_k/ holds adapter k alone (no full weights); load_expert (evaluate / generate) merges it into the
    base, and that equals the optional merged/expert_k copy and the policy's own expert_model(k)."""
    cfg = ExpertsConfig(kind="lora", num_experts=2, lora_r=2, lora_target_modules=["c_attn"], init_noise=0.5)
    policy = build_policy(tiny_gpt2_dir, cfg, seed=0)
    out = export_experts(policy, None, str(tmp_path / "export"), tiny_tokenizer, merged=True)
    files = sorted(p.name for p in (tmp_path / "export" / "expert_1").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert json.load(open(f"{out}/expert_1/adapter_config.json"))["base_model_name_or_path"] == tiny_gpt2_dir
    ids = torch.tensor([[5, 9, 11, 3]])
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        a = load_expert(out, 1)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(f"{out}/merged/expert_1")(ids).logits
        c = policy.expert_model(1)(ids).logits
        d = load_expert(out, 0)(ids).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, d)  # the two adapters differ (init noise), so the test can tell them apart


class Recorder:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://huggingface.co/commit/0"


def test_push_to_hub_up_to_the_upload_call(tiny_gpt2_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    cfg = _cfg(tiny_gpt2_dir, "heads")
    out = export_experts(build_policy(tiny_gpt2_dir, cfg.experts), None, str(tmp_path / "export"), tiny_tokenizer,
                         cfg=cfg)
    rec = Recorder()
    # the real HfApi with its two network methods replaced
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: rec.create_repo(repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: rec.upload_folder(**kw))
    url = push_export(out, "me/mixdpo-2", private=True)
    assert url == "https://huggingface.co/commit/0"
    (c, repo, kw), (u, repo2, ukw) = rec.calls
    assert (c, repo, kw["private"], kw["exist_ok"]) == ("create_repo", "me/mixdpo-2", True, True)
    assert (u, repo2, ukw["folder_path"], ukw["repo_type"]) == ("upload_folder", "me/mixdpo-2", out, "model")
    (tmp_path / "export" / "expert_1" / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match="expert_1/README.md"):
        push_export(out, "me/mixdpo-2", api=Recorder())
    with pytest.raises(ValueError, match="hub_model_id"):
        push_export(out, "a/b/c", api=Recorder())
