"""The Mix-DPO / MoE-DPO recipe: `MixDPOTrainer(cfg)` with setup / train / save_checkpoint / cleanup.

One optimizer step is Algorithm 1 (SPEC §1) written out in `train()`, top to bottom:
batch → policy forward (chosen + rejected rows in one batch) → reference log-probs (frozen model or
precomputed cache) → gate forward (log w) → E-step (Dirichlet-random during the warm-up; Gumbel samples
in `em.mode=gumbel`) → `mbt_loss` (`loss.impl`) → backward / step through the DeepSpeed engine → optional refresh
→ gate update by `em.gate_update`.

Run it (CPU, one GPU, several GPUs):
    mixdpo train --config configs/tiny.yaml model.name_or_path=/path/to/tiny train.max_steps=20
    CUDA_VISIBLE_DEVICES=0 mixdpo train --config configs/gpt2_imdb.yaml
    deepspeed --num_gpus 8 $(which mixdpo) train --config configs/llama.yaml deepspeed.config=zero3

The gate is not part of the DeepSpeed engine: it is tiny, replicated, and has its own AdamW. The engine
owns only the K experts (ZeRO shards them). Gate gradients are averaged over ranks by hand.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from mixdpo_ds.core.em import random_responsibilities, tau_at
from mixdpo_ds.core.losses import MixDPOOutput, chosen_nll, kl_to_uniform
from mixdpo_ds.kernels import mbt_loss
from mixdpo_ds.model.reference import PolicyReference
from mixdpo_ds.training import checkpoint as ckpt
from mixdpo_ds.training.config import RunConfig
from mixdpo_ds.training.data import batches, collate, load_preference_data, num_batches
from mixdpo_ds.training.deepspeed_config import build_deepspeed_config, lr_lambda, zero_stage_of
from mixdpo_ds.training.distributed import (
    all_reduce_mean,
    differentiable_global_mean_rows,
    global_mean_rows,
    init_distributed,
    replicated_load,
)
from mixdpo_ds.training.metrics import MetricAccumulator, MetricsLogger, plot_metrics

log = logging.getLogger("mixdpo_ds")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "prompt_last_index")


def build_engine(policy, cfg: RunConfig, ds_config: dict, total_steps: int):
    """The seam for parallelism: policy + run config -> (engine, optimizer, lr_scheduler).

    One AdamW with the policy's param groups (trunk / each expert at its own lr). The expert-parallel
    helper replaces this function's body for `experts.ep_size > 1`."""
    import deepspeed

    t = cfg.train
    groups = policy.param_groups(t.lr, t.weight_decay)
    if cfg.experts.ep_size > 1:  # expert parallel: the heads go in DeepSpeed 'moe' groups (mixdpo_ds.model.parallel)
        from mixdpo_ds.model.parallel import check_expert_parallel, moe_param_groups

        check_expert_parallel(cfg.experts.num_experts, cfg.experts.ep_size, zero_stage_of(ds_config),
                              torch.distributed.get_world_size())
        groups = moe_param_groups(groups)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, total_steps, t.lr_schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    return engine, optimizer, scheduler


def as_pairs(x: torch.Tensor, B: int) -> torch.Tensor:
    """(2B,) -> (B, 2) or (2B, K) -> (B, 2, K): rows 0..B-1 chosen, B..2B-1 rejected (ARCHITECTURE.md)."""
    return x.view(2, B, *x.shape[1:]).transpose(0, 1)


class MixDPOTrainer:
    """The recipe. `setup()` builds everything, `train()` runs the EM loop, `cleanup()` releases."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro batches of this epoch already consumed
        self.out_dir = Path(cfg.train.output_dir)

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from transformers import AutoTokenizer

        from mixdpo_ds.model.experts import build_policy
        from mixdpo_ds.model.gating import build_gate

        cfg, t = self.cfg, self.cfg.train
        init_distributed()
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        torch.manual_seed(t.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.data = load_preference_data(cfg.data, self.tokenizer)
        if self.data.skipped:
            log.warning("data: skipped bad rows %s", self.data.skipped)
        self.batches_per_epoch = num_batches(len(self.data.train), t.micro_batch_size, self.world)
        if self.batches_per_epoch < t.grad_accum:
            raise ValueError(f"{len(self.data.train)} training pairs give {self.batches_per_epoch} micro batches per "
                             f"epoch, fewer than train.grad_accum={t.grad_accum}; lower train.micro_batch_size")
        self.total_steps = t.max_steps if t.max_steps > 0 else max(
            1, math.ceil(t.epochs * self.batches_per_epoch / t.grad_accum))

        ds_config = build_deepspeed_config(cfg.deepspeed.config, t.micro_batch_size, t.grad_accum, self.world,
                                           cfg.model.dtype, cfg.deepspeed.zero_stage, t.gradient_clipping)
        self.zero_stage = zero_stage_of(ds_config)
        if self.zero_stage == 3:  # must stay alive while from_pretrained runs (DEEPSPEED-NOTES)
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        dtype = DTYPES[cfg.model.dtype]
        policy = build_policy(cfg.model.name_or_path, cfg.experts, torch_dtype=dtype, seed=t.seed)
        self.K = policy.num_experts
        num_users = cfg.gate.num_users if cfg.gate.num_users is not None else len(self.data.user_vocab)
        self.gate = build_gate(cfg.gate, self.K, policy.config.hidden_size, num_users, seed=t.seed)
        self._setup_reference(policy, dtype)
        self.engine, self.optimizer, self.lr_scheduler = build_engine(policy, cfg, ds_config, self.total_steps)
        self.device = self.engine.device
        self.gate.to(self.device)
        self.gate_trainable = any(True for _ in self.gate.parameters()) and cfg.em.gate_update != "frozen"
        self.gate_optimizer = self.gate_scheduler = None
        if self.gate_trainable:
            self.gate_optimizer = torch.optim.AdamW(self.gate.parameters(), lr=cfg.gate.lr, weight_decay=0.0)
            self.gate_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.gate_optimizer, lr_lambda(t.warmup_steps, self.total_steps, t.lr_schedule))
        if cfg.gate.pretrain_steps > 0:
            self._pretrain_gate()
        self.schedule = cfg.em.schedule(cfg.loss.beta)
        self.cpu_gen = torch.Generator().manual_seed(t.seed + 1)  # Dirichlet warm-up
        self.dev_gen = torch.Generator(device=self.device).manual_seed(t.seed + 2)  # Gumbel noise
        self._warn_config()

        resume = ckpt.resolve_resume(t.resume_from, self.out_dir)
        self.acc = MetricAccumulator()
        if resume is not None:
            self._load_state(ckpt.load_checkpoint(self.engine, resume))
            log.info("resumed from %s at step %d", resume, self.step)
        self.logger = MetricsLogger(self.out_dir, t.tensorboard, enabled=self.rank == 0,
                                    truncate_after=self.step if resume is not None else None)
        if self.rank == 0:
            cfg.to_yaml(self.out_dir / "config.yaml")

    def _setup_reference(self, policy, dtype) -> None:
        """self.reference (an object with .logps(batch)) or the precomputed tables self.ref_tables[split]."""
        from mixdpo_ds.model.reference import (
            FrozenReference,
            precompute_reference_logps,
            reference_cache_key,
        )

        cfg = self.cfg
        paths = cfg.experts.init_paths if cfg.experts.kind == "models" and cfg.experts.init_paths else \
            cfg.model.name_or_path
        # ZeRO-3: the policy's weights exist only inside the engine's forward, so its built-in reference cannot
        # run (nor run on rank 0 alone for precompute); a replicated FrozenReference does
        # (training/distributed.py).
        builtin = policy.has_builtin_reference and self.zero_stage < 3
        with replicated_load():
            reference = PolicyReference(policy) if builtin else FrozenReference(
                paths, dtype, cfg.experts.logprob_impl, cfg.experts.chunk_size)
        self.reference, self.ref_tables = reference, None
        if torch.cuda.is_available():  # precompute on the GPU (the engine would move the policy only later)
            (policy if builtin else reference).to(f"cuda:{torch.cuda.current_device()}")
        if cfg.train.reference == "model":
            return
        cache_dir = cfg.train.reference_cache_dir or str(self.out_dir / "ref_cache")
        self.ref_tables = {}
        for split, examples in (("train", self.data.train), ("eval", self.data.eval)):
            if not examples:
                continue
            key = reference_cache_key(paths, self.data.fingerprint, cfg.data.max_length, cfg.data.max_prompt_length,
                                      {"dtype": cfg.model.dtype, "split": split})
            # Rank 0 computes and writes, the others then read its file; under ZeRO-3 a sharded model needs
            # every rank in every forward, so all compute (each writes the same file atomically).
            together = self.zero_stage == 3 and not builtin
            torch.distributed.barrier()
            for turn in (0, 1):
                if split not in self.ref_tables and (together or (self.rank == 0) == (turn == 0)):
                    self.ref_tables[split] = precompute_reference_logps(
                        reference, examples, self._collate, cfg.train.micro_batch_size, cache_dir, key)
                torch.distributed.barrier()
        self.reference = None  # the model is not needed any more; frees its memory

    def _warn_config(self) -> None:
        em, ex = self.cfg.em, self.cfg.experts
        distinct_init = ex.kind == "models" and ex.init_paths and len(set(ex.init_paths)) > 1
        if self.K > 1 and ex.init_noise == 0 and em.warmup_random_steps == 0 and not distinct_init \
                and em.mode == "exact" and ex.kind != "lora":
            log.warning("K=%d identical experts with experts.init_noise=0 and em.warmup_random_steps=0: under a "
                        "uniform gate they get identical updates forever (symmetry never breaks). Set "
                        "experts.init_noise > 0 and/or em.warmup_random_steps > 0.", self.K)
        if em.refresh and em.gate_update == "joint" and self.cfg.gate.kind == "moe":
            log.warning("em.refresh has no effect with em.gate_update=joint and gate.kind=moe (one backward "
                        "over policy + gate loss); use em.gate_update=alternate")

    def _pretrain_gate(self) -> None:
        from mixdpo_ds.model.gating import pretrain_gate

        col = self.cfg.gate.pretrain_label_column
        if col != self.cfg.data.group_column:
            raise ValueError(f"gate.pretrain_label_column={col!r}: only the data.group_column "
                             f"({self.cfg.data.group_column!r}) is loaded; set them equal")
        examples = [ex for ex in self.data.train if ex["group"] >= 0]
        feats, users = [], []
        with torch.no_grad():
            for i in range(0, len(examples), self.cfg.train.micro_batch_size):
                batch = self._collate(examples[i:i + self.cfg.train.micro_batch_size])
                out = self.engine(**{k: batch[k].to(self.device) for k in MODEL_KEYS})
                B = batch["index"].shape[0]
                feats.append(out.prompt_features[:B].float() if out.prompt_features is not None else None)
                users.append(batch["user_ids"].to(self.device))
        features = torch.cat(feats) if feats and feats[0] is not None else None
        labels = torch.tensor([ex["group"] for ex in examples], device=self.device) % self.K
        acc = pretrain_gate(self.gate, features, labels, self.cfg.gate.pretrain_steps, self.cfg.gate.lr,
                            user_ids=torch.cat(users), seed=self.cfg.train.seed)
        log.info("gate pre-training on %r: accuracy %.3f", col, acc)

    def _collate(self, examples: list[dict]) -> dict:
        return collate(examples, self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------- one batch
    def _ref_logps(self, batch: dict, split: str, out=None) -> torch.Tensor:
        """(B, 2) shared or (B, 2, K) per-expert reference log-probs of the batch."""
        B = batch["index"].shape[0]
        if self.ref_tables is not None:
            return self.ref_tables[split][batch["index"]].to(self.device)
        if out is not None and out.ref_logps is not None and isinstance(self.reference, PolicyReference):
            return as_pairs(out.ref_logps, B)  # computed in the policy's own forward (frozen-trunk heads)
        return as_pairs(self.reference.logps(batch).to(self.device), B)

    def _gate_logw(self, out, batch: dict, grad: bool) -> torch.Tensor:
        """(B, K) log w from the prompt features of the chosen rows (same prompt as the rejected rows)."""
        B = batch["index"].shape[0]
        feats = out.prompt_features[:B].float() if out.prompt_features is not None else None
        with torch.set_grad_enabled(grad):
            return self.gate(feats, batch["user_ids"].to(self.device), batch_size=B)

    def loss_terms(self, batch: dict, step: int, out=None, log_w: torch.Tensor | None = None,
                   resp: torch.Tensor | None = None, split: str = "train", mode: str | None = None) -> MixDPOOutput:
        """Policy forward (unless `out` is given) + reference + gate + MBT loss (`loss.impl`) of one batch at `step`."""
        em = self.cfg.em
        B = batch["index"].shape[0]
        if out is None:
            out = self.engine(**{k: batch[k].to(self.device) for k in MODEL_KEYS})  # logps (2B, K)
        if log_w is None:
            log_w = self._gate_logw(out, batch, grad=False)
        phase = self.schedule.at(step / self.total_steps)
        beta = phase.beta if phase.beta is not None else self.cfg.loss.beta
        mode, noise = mode or em.mode, None
        if mode == "gumbel" and resp is None and self.world > 1:  # global draws, this rank's rows: = 1-rank noise
            from mixdpo_ds.core.gumbel import sample_gumbel
            noise = sample_gumbel((em.gumbel.samples, B * self.world, self.K), generator=self.dev_gen,
                                  device=self.device)[:, self.rank * B:(self.rank + 1) * B]
        policy_logps = as_pairs(out.logps, B)
        # λ_global · KL(w̄ ‖ U) needs the global batch's w̄: with several ranks it is added here, through a
        # differentiable all-reduce, instead of inside the loss (which only sees this rank's rows).
        global_kl = bool(phase.lambda_global) and self.world > 1
        res = mbt_loss(policy_logps, self._ref_logps(batch, split, out), log_w, beta,
                       posterior_correction=em.posterior_correction, label_smoothing=em.label_smoothing,
                       estep=phase.estep, lambda_global=0.0 if global_kl else phase.lambda_global, resp=resp,
                       mode=mode,
                       gumbel=em.gumbel, noise=noise, generator=self.dev_gen, tau=tau_at(step, em),
                       impl=self.cfg.loss.resolved_impl(self.device))
        if global_kl:
            kl = phase.lambda_global * kl_to_uniform(differentiable_global_mean_rows(log_w.float().exp().expand(B, -1)))
            res = dataclasses.replace(res, loss=res.loss + kl, gate_loss=res.gate_loss + kl)
        alpha = self.cfg.loss.rpo_alpha
        if alpha > 0:  # RPO: + α · responsibility-weighted per-token NLL of the chosen responses
            nll = chosen_nll(policy_logps, (batch["labels"][:B] != -100).sum(1).to(self.device), res.resp)
            res = dataclasses.replace(res, loss=res.loss + alpha * nll, policy_loss=res.policy_loss + alpha * nll,
                                      metrics={**res.metrics, "rpo_nll": nll.detach()})
        return res

    def _next_batch(self) -> dict:
        t = self.cfg.train
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        examples = next(batches(self.data.train, t.micro_batch_size, t.seed, self.epoch, start=self.batch_in_epoch,
                                rank=self.rank, world_size=self.world))
        self.batch_in_epoch += 1
        return self._collate(examples)

    def _gate_step(self) -> None:
        if self.world > 1:  # the gate lives outside the engine: average its gradients by hand
            for p in self.gate.parameters():
                if p.grad is not None:
                    p.grad.copy_(all_reduce_mean(p.grad))
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)

    def _mix_update(self, resp: torch.Tensor) -> None:
        """Closed-form Mix-DPO weights (D.4) from the mean responsibilities of the global batch."""
        self.gate.update(global_mean_rows(resp)[None])  # (1, K): the update only uses mean_i q_i

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        from tqdm import tqdm

        t, em = self.cfg.train, self.cfg.em
        is_moe = self.cfg.gate.kind == "moe"
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or not t.progress_bar,
                   desc="mixdpo", dynamic_ncols=True)
        tokens, t0 = 0, time.perf_counter()
        self.engine.train()
        while self.step < self.total_steps:
            warm = self.step < em.warmup_random_steps
            for micro in range(t.grad_accum):
                boundary = micro == t.grad_accum - 1
                batch = self._next_batch()
                B = batch["index"].shape[0]
                tokens += int(batch["attention_mask"].sum())  # CPU tensor: no device sync

                # E-step + M-step of the policy (and, in `joint` mode, of the gate) on this batch.
                out = self.engine(**{k: batch[k].to(self.device) for k in MODEL_KEYS})  # logps (2B, K)
                joint = is_moe and self.gate_trainable and em.gate_update == "joint" and not warm
                log_w = self._gate_logw(out, batch, grad=joint)  # `alternate` trains the gate after the step
                # Warm-up: Dirichlet-random responsibilities break the symmetry of identical experts; they say
                # nothing about the data, so the gate is held (no gate loss, no closed-form update) meanwhile.
                # Drawn for the global batch, this rank keeps its rows: the same draws as a 1-rank run.
                resp = random_responsibilities(B * self.world, self.K, em.dirichlet_alpha, self.cpu_gen,
                                               self.device)[self.rank * B:(self.rank + 1) * B] if warm else None
                res = self.loss_terms(batch, self.step, out=out, log_w=log_w, resp=resp)
                self.engine.backward(res.loss if joint else res.policy_loss)
                self.engine.step()  # a real optimizer step only at the accumulation boundary
                if joint and boundary:
                    self._gate_step()

                # Refresh (the paper's reward update) and the gate's own E/M-step after the policy step.
                gate_resp = res.resp
                needs_refresh = not warm and (em.refresh or (is_moe and em.gate_update == "alternate"))
                if needs_refresh:
                    with torch.no_grad():
                        out2 = self.engine(**{k: batch[k].to(self.device) for k in MODEL_KEYS})
                    alt = is_moe and self.gate_trainable and em.gate_update == "alternate"
                    res2 = self.loss_terms(batch, self.step, out=out2, log_w=self._gate_logw(out2, batch, grad=alt))
                    gate_resp = res2.resp
                    if alt:
                        (res2.loss / t.grad_accum).backward()  # gradient reaches the gate only
                        if boundary:
                            self._gate_step()
                if not is_moe and em.gate_update != "frozen" and not warm:
                    self._mix_update(gate_resp)

                self.acc.add({"loss": res.loss.detach(), "policy_loss": res.policy_loss.detach(),
                              "gate_loss": res.gate_loss.detach(), **res.metrics})
            self.step += 1
            if self.gate_scheduler is not None:  # in step with the engine's lr schedule, warm-up included
                self.gate_scheduler.step()
            bar.update(1)

            if self.step % t.log_every == 0 or self.step == self.total_steps:
                metrics = self.acc.reduce()
                elapsed = time.perf_counter() - t0
                metrics["tokens_per_s"] = tokens * self.world / max(elapsed, 1e-9)
                metrics["lr"] = float(self.lr_scheduler.get_last_lr()[0])
                metrics["epoch"] = self.epoch + self.batch_in_epoch / self.batches_per_epoch
                self.logger.log(self.step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                tokens, t0 = 0, time.perf_counter()
            paused = time.perf_counter()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            t0 += time.perf_counter() - paused  # tokens/s counts training time only
        bar.close()
        self.evaluate()
        self.save_checkpoint()
        self.finish()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the eval split (exact E-step, the current phase), logged with the `eval/` prefix."""
        if not self.data.eval:
            return {}
        bs = self.cfg.train.eval_batch_size or self.cfg.train.micro_batch_size
        # Equal shards (at most world-1 pairs dropped): under ZeRO-3 every rank must run every forward.
        n = len(self.data.eval) // self.world * self.world
        examples = self.data.eval[:n][self.rank::self.world]
        acc = MetricAccumulator()
        self.engine.eval()
        for i in range(0, len(examples), bs):
            res = self.loss_terms(self._collate(examples[i:i + bs]), self.step, split="eval", mode="exact")
            acc.add({"loss": res.loss, "policy_loss": res.policy_loss, "gate_loss": res.gate_loss, **res.metrics})
        self.engine.train()
        metrics = acc.reduce()
        self.logger.log(self.step, metrics, prefix="eval/")
        return metrics

    # ------------------------------------------------------------------------------------------- state
    def trainer_state(self) -> dict:
        acc = self.acc
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "gate": self.gate.state_dict(),
            "gate_optimizer": self.gate_optimizer.state_dict() if self.gate_optimizer else None,
            "gate_scheduler": self.gate_scheduler.state_dict() if self.gate_scheduler else None,
            "cpu_gen": self.cpu_gen.get_state(), "dev_gen": self.dev_gen.get_state(), "rng": ckpt.rng_state(),
            "metrics_acc": (acc.names, acc.total, acc.count), "total_steps": self.total_steps,
            "config": self.cfg.to_dict(),
        }

    def _load_state(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.gate.load_state_dict(state["gate"])
        if self.gate_optimizer is not None and state["gate_optimizer"] is not None:
            self.gate_optimizer.load_state_dict(state["gate_optimizer"])
            self.gate_scheduler.load_state_dict(state["gate_scheduler"])
        self.cpu_gen.set_state(state["cpu_gen"])
        self.dev_gen.set_state(state["dev_gen"])
        self.acc.names, self.acc.total, self.acc.count = state["metrics_acc"]
        ckpt.set_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.engine, self.out_dir, self.step, self.trainer_state(),
                                    self.cfg.train.keep_last)

    def finish(self) -> None:
        """Export the experts + gate, plots and the resolved config (rank 0)."""
        t = self.cfg.train
        if t.export:
            self.export()
        if self.rank == 0 and t.plots:
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir)

    def export(self) -> Path | None:
        from mixdpo_ds.model.parallel import dense_policy
        from mixdpo_ds.training.export import export_experts

        out = self.out_dir / "export"
        policy = dense_policy(self.engine.module)  # expert parallel: gather the K heads (every rank calls it)
        # replicated_load: the standalone expert models are built on rank 0 alone, never under zero.Init
        if self.zero_stage == 3:  # gather the full weights on every rank, write on rank 0
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None):
                if self.rank == 0:
                    with replicated_load():
                        export_experts(policy, self.gate, str(out), self.tokenizer, user_vocab=self.data.user_vocab)
        elif self.rank == 0:
            export_experts(policy, self.gate, str(out), self.tokenizer, user_vocab=self.data.user_vocab)
        torch.distributed.barrier()
        return out

    def cleanup(self) -> None:
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        self.engine = self.optimizer = self.reference = None
        self._hf_ds_config = None  # else later from_pretrained calls in this process would still shard (ZeRO-3)
