"""push_to_hub of an export (`train.push_to_hub`, `MixDPOTrainer.push_to_hub()`), through huggingface_hub.

    push_export("runs/x/export", "me/mixdpo-2-experts", private=True)

One repository holds the whole export: the root model card, `expert_k/` (adapters or models, each with its card),
`gate/` and `export.json`. The token is huggingface_hub's own (HF_TOKEN or `hf auth login`); it is never part of
the run config. Before anything is sent the export is checked (export.json, K expert directories, a card in each),
so a broken export fails here rather than as a half-uploaded repository.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("mixdpo_ds")


def check_export(export_dir: str | Path) -> int:
    """-> K; raises naming what is missing from an export directory."""
    export = Path(export_dir)
    meta = export / "export.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{export}: no export.json; export the run first (trainer.save_model())")
    k = json.loads(meta.read_text())["num_experts"]
    missing = [p for p in [export / "README.md", *(export / f"expert_{i}" / "README.md" for i in range(k))]
               if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{export}: missing {[str(p.relative_to(export)) for p in missing]}")
    return k


def push_export(export_dir: str | Path, repo_id: str, private: bool = False, commit_message: str = "Mix-DPO experts",
                api=None, **upload_kwargs) -> str:
    """Create `repo_id` (if needed) and upload the export folder as one commit; -> the commit URL."""
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"hub_model_id={repo_id!r}: expected 'name' or 'owner/name'")
    k = check_export(export_dir)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", repo_id)
    log.info("push_to_hub: uploading %s (K=%d) to %s", export_dir, k, repo_id)
    info = api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message, **upload_kwargs)
    return str(getattr(info, "commit_url", info))


__all__ = ["check_export", "push_export"]
