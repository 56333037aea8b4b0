"""The Mix-DPO / MoE-DPO recipe: `MixDPOTrainer(cfg)` with setup / train / save_checkpoint / cleanup.

`em_step()` is one optimizer step of Algorithm 1 (docs/math.md §9), read top to bottom. For each micro-batch:

    policy forward   log π_k of chosen and rejected rows, all K experts (and the reference)     `policy_forward`
    gate forward     log w of the pairs, no gradient                                            `gate_forward`
    E-step + loss    q (exact posterior, Dirichlet warm-up or Gumbel samples), L_policy         `batch_loss`
    policy M-step    backward; the engine steps at the accumulation boundary                    `policy_m_step`

With `loss.fused` (the default wherever it applies: heads experts, exact E-step) the first three are one engine call,
`fused_forward`: the trunk, the gate on its prompt features, and the heads with their loss and gradients, chunk of
pairs by chunk, with no logits recompute (training/fused_step.py, docs/math.md §16); the E-step then runs on the
detached log-probs for the gate loss and the metrics. Then, once for the whole optimizer batch, after the policy's
step: the gate's E-step and M-step (closed form, joint, alternate or frozen, with the optional refresh),
`GateStep.step` in training/gate_step.py.

Run it (CPU, one GPU, several GPUs):
    mixdpo train --config configs/tiny.yaml model.name_or_path=/path/to/tiny train.max_steps=20
    CUDA_VISIBLE_DEVICES=0 mixdpo train --config configs/gpt2_imdb.yaml
    deepspeed --num_gpus 8 $(which mixdpo) train --config configs/llama.yaml deepspeed.config=zero3

The gate is not part of the DeepSpeed engine: it is tiny, replicated, and has its own AdamW (gate_step.py). The
engine owns only the K experts (ZeRO shards them).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from mixdpo_ds.core.em import tau_at
from mixdpo_ds.core.losses import MixDPOOutput, chosen_nll
from mixdpo_ds.kernels import mbt_loss
from mixdpo_ds.model.experts import PolicyOutput
from mixdpo_ds.model.lowrank_heads import FusedLoss
from mixdpo_ds.training import checkpoint as ckpt
from mixdpo_ds.training.batch import as_pairs, batches, chosen_prompt_features, collate, model_inputs
from mixdpo_ds.training.build import (
    skippable_adamw,
)
from mixdpo_ds.training.callbacks import CallbackList
from mixdpo_ds.training.config import RunConfig
from mixdpo_ds.training.deepspeed_config import build_deepspeed_config, zero_stage_of
from mixdpo_ds.training.distributed import init_distributed, on_cpu
from mixdpo_ds.training.draws import row_positions, step_draws
from mixdpo_ds.training.fused_step import GateCall
from mixdpo_ds.training.gate_step import MicroRecord, StepRecord
from mixdpo_ds.training.memory import mmap_large_allocations, release_free_heap, write_memory_report
from mixdpo_ds.training.metrics import MetricAccumulator, plot_metrics
from mixdpo_ds.training.plan import log_plan
from mixdpo_ds.training.run_dir import mark_finished, take_lock
from mixdpo_ds.training.trackers import tracker_callbacks
from mixdpo_ds.training.trainer_setup import TrainerSetup

log = logging.getLogger("mixdpo_ds")


class MixDPOTrainer(TrainerSetup):
    """The recipe. `setup()` builds everything, `train()` runs the EM loop, `cleanup()` releases."""

    def __init__(self, cfg: RunConfig, callbacks=None):
        self.cfg = cfg
        self.callbacks = CallbackList([*(callbacks or []), *tracker_callbacks(cfg.train.report_to)])
        self.stop_requested = False  # a callback may end training after the current step (HFCallback)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro batches of this epoch already consumed
        self.out_dir = Path(cfg.train.output_dir)

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Data, model, EM machinery, then the checkpoint to resume from (each a method below)."""
        t = self.cfg.train
        init_distributed(timeout_s=t.dist_timeout_s)
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self._lock = take_lock(self.out_dir, self.rank)
        if t.host_mmap_threshold_mb and on_cpu():  # freed tensors leave the RSS at once (training/memory.py)
            mmap_large_allocations(t.host_mmap_threshold_mb << 20)
        torch.manual_seed(t.seed)
        self._setup_data()
        ds_config = build_deepspeed_config(self.cfg.deepspeed.config, t.micro_batch_size, t.grad_accum, self.world,
                                           self.cfg.model.dtype, self.cfg.deepspeed.zero_stage, t.gradient_clipping)
        self.zero_stage = zero_stage_of(ds_config)
        if self.rank == 0:
            log_plan(self.cfg, self.world)  # the per-rank memory estimate (training/plan.py, docs/scaling.md)
        policy = self._setup_model(ds_config)
        self._setup_em(policy)
        self._setup_resume()
        release_free_heap()  # what loading and partitioning freed (training/memory.py)
        if not self.finished:  # per-rank tensor bytes and peak RSS of each stage (docs/scaling.md)
            write_memory_report(self.out_dir, self.rank, "setup", self.engine.module, self.optimizer)

    def _run_identity(self) -> dict:
        """What a resumed run must share with its checkpoint (training/resume.py)."""
        return {**self.cfg.to_dict(), "world_size": self.world}

    def _collate(self, examples: list[dict]) -> dict:
        return collate(examples, self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------- the steps
    def next_batch(self) -> dict:
        """This rank's next micro-batch of the deterministic, resumable data order."""
        t = self.cfg.train
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        examples = next(batches(self.data.train, t.micro_batch_size, t.seed, self.epoch, start=self.batch_in_epoch,
                                rank=self.rank, world_size=self.world))
        self.batch_in_epoch += 1
        return self._collate(examples)

    def policy_forward(self, batch: dict):
        """PolicyOutput: logps (2B, K), prompt_features (2B, H) detached, ref_logps (2B,) for frozen-trunk heads."""
        return self.engine(**model_inputs(batch, self.device))

    def fused_forward(self, batch: dict, resp=None):
        """`loss.fused`: one engine call gives the logps (2B, K) detached and L_policy with its gradients
        (PolicyOutput.policy_loss); -> (out, log_w (B, K), ref_logps (B, 2[, K]))."""
        B = batch["index"].shape[0]
        in_pass = self.ref_tables is None and self.reference.builtin  # the frozen base head's, from the same pass
        gate_call = GateCall(lambda features: self.gate_forward(PolicyOutput(None, features), batch))
        ref_logps = None if in_pass else self.ref_logps(batch)
        fused = FusedLoss(gate_call, ref_logps, self.beta(), {**self.estep_options(), "resp": resp})
        out = self.engine(**model_inputs(batch, self.device), loss=fused)
        return out, gate_call.log_w, as_pairs(out.ref_logps, B) if in_pass else ref_logps

    def ref_logps(self, batch: dict, out=None, split: str = "train") -> torch.Tensor:
        """(B, 2) shared or (B, 2, K) per-expert reference log-probs of the batch."""
        B = batch["index"].shape[0]
        if self.ref_tables is not None:
            return self.ref_tables[split][batch["index"]].to(self.device)
        if out is not None and out.ref_logps is not None and self.reference.builtin:
            return as_pairs(out.ref_logps, B)  # computed in the policy's own forward (frozen-trunk heads)
        return as_pairs(self.reference.logps(batch).to(self.device), B)

    def gate_forward(self, out, batch: dict, grad: bool = False) -> torch.Tensor:
        """(B, K) log w from the prompt features of the chosen rows (same prompt as the rejected rows)."""
        B = batch["index"].shape[0]
        return self.gate_step.log_w(chosen_prompt_features(out, B), batch["user_ids"].to(self.device), B, grad=grad)

    def phase(self):
        """The regulariser phase (docs/math.md §7) in force at the current step."""
        return self.schedule.at(self.step / self.total_steps)

    def beta(self) -> float:
        """β at the current step: the phase's, else loss.beta."""
        phase = self.phase()
        return phase.beta if phase.beta is not None else self.cfg.loss.beta

    def estep_options(self) -> dict:
        """The exact E-step's options of the MBT loss at the current step (shared by both loss paths)."""
        return dict(posterior_correction=self.cfg.em.posterior_correction, label_smoothing=self.cfg.em.label_smoothing,
                    estep=self.phase().estep)

    def batch_loss(self, policy_logps, ref_logps, log_w, resp=None, noise=None, mode: str | None = None,
                   lambda_global: float = 0.0) -> MixDPOOutput:
        """E-step and MBT loss (`loss.impl`) of pairs: policy_logps (B, 2, K), ref_logps (B, 2[, K]), log_w (B, K).

        `resp` replaces the E-step (warm-up); `noise` (L, B, K) gives the Gumbel samples in `em.mode=gumbel`."""
        em = self.cfg.em
        return mbt_loss(policy_logps, ref_logps, log_w, self.beta(), **self.estep_options(),
                        lambda_global=lambda_global, resp=resp, mode=mode or em.mode,
                        gumbel=em.gumbel, noise=noise, generator=self.dev_gen, tau=tau_at(self.step, em),
                        impl=self.cfg.loss.resolved_impl(self.device) if policy_logps.shape[1] == 2 or
                        self.cfg.loss.impl != "auto" else "naive")  # rankings: the PyTorch path (docs/math.md §15)

    def policy_objective(self, res: MixDPOOutput, batch: dict, policy_logps) -> tuple[torch.Tensor, dict]:
        """L_policy (+ α · RPO's responsibility-weighted chosen NLL) and its extra metrics."""
        alpha = self.cfg.loss.rpo_alpha
        if alpha == 0:
            return res.policy_loss, {}
        B = policy_logps.shape[0]
        nll = chosen_nll(policy_logps, (batch["labels"][:B] != -100).sum(1).to(self.device), res.resp)
        return res.policy_loss + alpha * nll, {"rpo_nll": nll.detach()}

    def policy_m_step(self, loss: torch.Tensor, boundary: bool, record: StepRecord) -> torch.Tensor | None:
        """Backward through the engine; at the accumulation boundary the optimizer steps. -> grad norm there.
        Before it, the step's losses and gradient norm are checked (training/guard.py); a bad step runs no update."""
        self.engine.backward(loss)
        norm = None
        if boundary and self.zero_stage == 0:  # ZeRO-0 keeps the (already all-reduced) gradients in p.grad
            grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else None
        if boundary and not self.guard.step_ok([m.metrics["policy_loss"] for m in record.micro], norm, self.step,
                                               [m.batch for m in record.micro]):
            record.skipped = True
            skippable_adamw(self.optimizer).skip_next = True  # parameters and AdamW moments stay as they are
        self.engine.step()
        if boundary and norm is None and self.engine.get_global_grad_norm() is not None:
            norm = torch.as_tensor(float(self.engine.get_global_grad_norm()))
        return norm

    def em_step(self) -> StepRecord:
        """One optimizer step of Algorithm 1: per micro-batch policy forward, gate forward, E-step + loss, policy
        M-step; then the gate's E/M-step on the whole optimizer batch (training/gate_step.py)."""
        warm = self.step < self.cfg.em.warmup_random_steps
        t = self.cfg.train  # the step's draws, for its global batch (training/draws.py)
        resp_all, noise_all, gate_noise = step_draws(t.grad_accum * t.micro_batch_size * self.world, self.K,
                                                     self.cfg.em, warm, self.gate_step.mode == "alternate",
                                                     self.cpu_gen, self.dev_gen, self.device)
        record = StepRecord(warm=warm, step=self.step, lambda_global=self.phase().lambda_global)
        G, norm = self.cfg.train.grad_accum, None
        for micro in range(G):
            batch = self.next_batch()
            B = batch["index"].shape[0]
            rows = row_positions(micro, B, self.rank, self.world, self.device)
            resp = None if resp_all is None else resp_all[rows]
            if self.fused:  # the gate runs inside the forward, which returns L_policy itself (training/fused_step.py)
                out, log_w, ref_logps = self.fused_forward(batch, resp)
                policy_logps = as_pairs(out.logps, B)   # detached: this E-step gives the gate loss and the tables
                res = replace(self.batch_loss(policy_logps, ref_logps, log_w, resp=resp), policy_loss=out.policy_loss)
            else:
                out = self.policy_forward(batch)
                log_w = self.gate_forward(out, batch)
                policy_logps, ref_logps = as_pairs(out.logps, B), self.ref_logps(batch, out)
                res = self.batch_loss(policy_logps, ref_logps, log_w, resp=resp,
                                      noise=None if noise_all is None else noise_all[:, rows])
            loss, extra = self.policy_objective(res, batch, policy_logps)
            feats = chosen_prompt_features(out, B)
            record.micro.append(MicroRecord(
                batch, feats, policy_logps.detach(), ref_logps, log_w.clone(), res.resp, res.margins.detach(),
                None if noise_all is None else noise_all[:, rows],
                {"policy_loss": loss.detach(), "gate_loss": res.gate_loss.detach(), **res.metrics, **extra}))
            norm = self.policy_m_step(loss, boundary=micro == G - 1, record=record)
        if gate_noise is not None:  # this rank's rows, in the order of record.cat
            record.gate_noise = gate_noise[:, torch.cat([row_positions(j, B, self.rank, self.world, self.device)
                                                         for j in range(G)])]
        if not record.skipped:
            record.gate_metrics = self.gate_step.step(record, self._refresh_forward, self.batch_loss)
        record.metrics = self._step_metrics(record, norm)
        return record

    @torch.no_grad()
    def _refresh_forward(self, batch: dict):
        """The policy's log-probs (B, 2, K) and prompt features after its step (the paper's reward update)."""
        out = self.policy_forward(batch)
        B = batch["index"].shape[0]
        return as_pairs(out.logps, B), chosen_prompt_features(out, B)

    def _step_metrics(self, record: StepRecord, grad_norm) -> dict[str, torch.Tensor]:
        """Means over the step's micro-batches; `loss` is the optimised objective (docs/math.md §10)."""
        names = record.micro[0].metrics
        metrics = {k: torch.stack([m.metrics[k] for m in record.micro]).mean() for k in names}
        metrics.update(record.gate_metrics)
        # the gate term counts in `loss` only when a gradient step optimised it (not Mix-DPO's closed form, not warm-up)
        metrics["loss"] = metrics["policy_loss"] + record.gate_metrics.get("gate_loss", 0)
        phase = self.phase()
        metrics["beta"] = torch.tensor(self.beta())
        metrics["estep/alpha"] = torch.tensor(phase.estep.alpha)
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        from tqdm.auto import tqdm

        t = self.cfg.train
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or not t.progress_bar,
                   desc="mixdpo", dynamic_ncols=True)
        self.callbacks.on_train_begin(self)
        if self.finished:  # the same run, already trained and exported: nothing to do, nothing rewritten
            log.info("%s holds a finished run (step %d of %d): nothing to train", self.out_dir, self.step,
                     self.total_steps)
            return
        tokens, t0 = 0, time.perf_counter()
        self.engine.train()
        while self.step < self.total_steps and not self.stop_requested:
            record = self.em_step()
            tokens += sum(int(m.batch["attention_mask"].sum()) for m in record.micro)  # CPU tensors: no sync
            self.step += 1
            if self.gate_step.scheduler is not None:  # in step with the engine's lr schedule, warm-up included
                self.gate_step.scheduler.step()
            if record.skipped:
                self.guard.skip_step()
            else:
                self.acc.add(record.metrics)
                self.collapse.add(record.cat("margins"), record.cat("resp"), record.cat("log_w").exp())
                self.repair.maybe_split(self, self.step)  # em.split_every: re-seed dead / merged experts
            self.callbacks.on_step_end(self, self.step, record)
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                metrics = self.log_metrics(tokens, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                tokens, t0 = 0, time.perf_counter()
            paused = time.perf_counter()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            t0 += time.perf_counter() - paused  # tokens/s counts training time only
        bar.close()
        if (verdict := self.collapse.summary()) is not None:
            log.warning(verdict)
        self.evaluate()
        self.save_checkpoint()
        write_memory_report(self.out_dir, self.rank, "trained", self.engine.module, self.optimizer)
        self.finish()
        write_memory_report(self.out_dir, self.rank, "exported")
        self.callbacks.on_train_end(self)

    def log_metrics(self, tokens: int, elapsed: float) -> dict[str, float]:
        """Write the means over the logging interval (all ranks) with throughput, lr and epoch."""
        metrics = self.acc.reduce()
        metrics["tokens_per_s"] = tokens * self.world / max(elapsed, 1e-9)
        metrics["learning_rate"] = float(self.lr_scheduler.get_last_lr()[0])
        metrics["epoch"] = self.epoch + self.batch_in_epoch / self.batches_per_epoch
        metrics["nonfinite/skipped_steps"] = self.guard.skipped
        metrics.update(self.collapse.metrics())
        if self.repair.every:
            metrics["repair/splits"] = float(self.repair.splits)
        self.divergence.update(self.step, metrics.get("loss", math.nan), metrics["learning_rate"])
        self.logger.log(self.step, metrics)
        self.callbacks.on_log(self, self.step, metrics)
        return metrics

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
            batch = self._collate(examples[i:i + bs])
            out = self.policy_forward(batch)
            res = self.batch_loss(as_pairs(out.logps, batch["index"].shape[0]), self.ref_logps(batch, out, "eval"),
                                  self.gate_forward(out, batch), mode="exact", lambda_global=self.phase().lambda_global)
            acc.add({"loss": res.loss, "policy_loss": res.policy_loss, "gate_loss": res.gate_loss, **res.metrics})
        self.engine.train()
        metrics = acc.reduce()
        self.logger.log(self.step, metrics, prefix="eval/")
        self.callbacks.on_evaluate(self, self.step, metrics)
        return metrics

    # ------------------------------------------------------------------------------------------- state
    def trainer_state(self) -> dict:
        acc = self.acc
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "gate_step": self.gate_step.state_dict(), "repair_splits": self.repair.splits,
            "cpu_gen": self.cpu_gen.get_state(), "dev_gen": self.dev_gen.get_state(),
            "metrics_acc": (acc.names, acc.total, acc.count), "total_steps": self.total_steps,
            "run": self._run_identity(),  # the resolved config + world size (training/resume.py)
        }

    def _load_state(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.gate_step.load_state_dict(state["gate_step"])
        self.repair.splits = state.get("repair_splits", 0)
        self.cpu_gen.set_state(state["cpu_gen"])
        self.dev_gen.set_state(state["dev_gen"])
        self.acc.names, self.acc.total, self.acc.count = state["metrics_acc"]

    def save_checkpoint(self) -> Path:
        path = ckpt.save_checkpoint(self.engine, self.out_dir, self.step, self.trainer_state(),
                                    self.cfg.train.keep_last)
        self.callbacks.on_save(self, self.step, path)
        return path

    def finish(self) -> None:
        """Export the experts + gate, plots and the resolved config (rank 0)."""
        t = self.cfg.train
        if t.export:
            self.export()
        if t.push_to_hub and t.export and self.rank == 0:  # training/hub.py
            from mixdpo_ds.training.hub import push_export

            push_export(self.out_dir / "export", t.hub_model_id or self.out_dir.name, private=t.hub_private_repo)
        if self.rank == 0 and t.plots:
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir)
        if self.rank == 0:
            mark_finished(self.out_dir, self.step)

    def export(self) -> Path:
        from mixdpo_ds.training.export import export_from_engine

        return export_from_engine(self.engine.module, self.gate, self.out_dir / "export", self.tokenizer,
                                  self.data.user_vocab, self.zero_stage, self.rank, cfg=self.cfg)

    def cleanup(self) -> None:
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
        self.engine = self.optimizer = self.reference = None
        self._hf_ds_config = None  # else later from_pretrained calls in this process would still shard (ZeRO-3)
