"""MixDPOTrainer's set-up, step by step (`MixDPOTrainer.setup` in training/trainer.py calls these in order).

    _setup_data     tokenizer, the checked data, steps per epoch and in all
    _setup_model    policy, gate, DeepSpeed engine, reference (docs/deepspeed.md)
    _setup_em       the gate's M-step, the β / E-step schedule, random streams, the run's watches
    _setup_resume   gate pre-training or the newest intact checkpoint; the metrics log
"""
from __future__ import annotations

import logging
import math

import torch

from mixdpo_ds.training import checkpoint as ckpt
from mixdpo_ds.training.batch import num_batches
from mixdpo_ds.training.build import (
    build_engine,
    build_reference,
    load_checked_data,
    pretrain_gate_on_labels,
    warn_identical_experts,
)
from mixdpo_ds.training.fused_step import resolve_fused
from mixdpo_ds.training.gate_step import GateStep
from mixdpo_ds.training.guard import DivergenceWatch, NonFiniteGuard
from mixdpo_ds.training.metrics import CollapseWatch, MetricAccumulator, MetricsLogger
from mixdpo_ds.training.repair import SplitRepair
from mixdpo_ds.training.resume import load_newest_intact
from mixdpo_ds.training.run_dir import finished_step
from mixdpo_ds.training.schedule import lr_multiplier
from mixdpo_ds.training.user_features import attach_user_features

log = logging.getLogger("mixdpo_ds")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class TrainerSetup:
    """The set-up steps of MixDPOTrainer (which owns cfg, rank, world, out_dir and the run's state)."""

    def _setup_data(self) -> None:
        from transformers import AutoTokenizer

        cfg, t = self.cfg, self.cfg.train
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.data = load_checked_data(cfg, self.tokenizer)
        if self.data.skipped:
            log.warning("data: skipped bad rows %s", self.data.skipped)
        self.batches_per_epoch = num_batches(len(self.data.train), t.micro_batch_size, self.world)
        if self.batches_per_epoch < t.grad_accum:
            raise ValueError(f"{len(self.data.train)} training pairs give {self.batches_per_epoch} micro batches per "
                             f"epoch, fewer than train.grad_accum={t.grad_accum}; lower train.micro_batch_size")
        self.total_steps = t.max_steps if t.max_steps > 0 else max(
            1, math.ceil(t.epochs * self.batches_per_epoch / t.grad_accum))

    def _setup_model(self, ds_config: dict):
        """Policy, gate, DeepSpeed engine and reference; returns the policy module."""
        from mixdpo_ds.model.experts import build_policy
        from mixdpo_ds.model.gating import build_gate

        cfg, t = self.cfg, self.cfg.train
        if self.zero_stage == 3:  # must stay alive while from_pretrained runs (docs/deepspeed.md §4)
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        dtype = DTYPES[cfg.model.dtype]
        policy = build_policy(cfg.model.name_or_path, cfg.experts, torch_dtype=dtype, seed=t.seed)
        self.K = policy.num_experts
        num_users = cfg.gate.num_users if cfg.gate.num_users is not None else len(self.data.user_vocab)
        gate = build_gate(cfg.gate, self.K, policy.config.hidden_size, num_users, seed=t.seed)
        attach_user_features(gate, cfg, self.data.user_vocab)  # gate.user_features: the users' feature table
        self.engine, self.optimizer, self.lr_scheduler = build_engine(policy, cfg, ds_config, self.total_steps)
        self.fused = resolve_fused(cfg, policy, self.engine.device,  # L_policy inside the forward (loss.fused)
                                   ranked=bool(self.data.train) and "response_ids" in self.data.train[0])
        self.device = self.engine.device
        # after the engine: under ZeRO-3 the reference runs through an engine (docs/deepspeed.md §7); before the
        # checkpoint is loaded (the tables are the initial, frozen reference's)
        self.reference, self.ref_tables = build_reference(cfg, self.engine, self.data, self.zero_stage, self.rank,
                                                          self.world, self._collate, self.out_dir, dtype, ds_config)
        self.gate = gate.to(self.device)
        return policy

    def _setup_em(self, policy) -> None:
        """The gate's M-step, the β / E-step schedule, the random streams and the run's watches."""
        cfg, t, em = self.cfg, self.cfg.train, self.cfg.em
        self.gate_step = GateStep(self.gate, cfg.gate.kind, em.gate_update, em.refresh, cfg.gate.lr,
                                  lr_multiplier(t, self.total_steps), self.world,
                                  eps=cfg.gate.adam_epsilon or t.adam_epsilon,
                                  hold_until=em.warmup_random_steps + cfg.gate.hold_steps,
                                  trust_region=cfg.gate.trust_region,
                                  trust_max_scale=cfg.gate.trust_max_scale)
        self.schedule = em.schedule(cfg.loss.beta)
        self.cpu_gen = torch.Generator().manual_seed(t.seed + 1)  # Dirichlet warm-up
        self.dev_gen = torch.Generator(device=self.device).manual_seed(t.seed + 2)  # Gumbel noise
        warn_identical_experts(cfg, self.K)
        self.guard, self.divergence = NonFiniteGuard(t.nonfinite, self.zero_stage, self.device), DivergenceWatch()
        self.collapse = CollapseWatch()
        self.repair = SplitRepair(policy, em, t.seed)

    def _setup_resume(self) -> None:
        """Gate pre-training on a fresh run, or the newest intact checkpoint; the metrics log and config.yaml."""
        cfg, t = self.cfg, self.cfg.train
        resume = ckpt.resolve_resume(t.resume_from, self.out_dir)
        self.acc = MetricAccumulator()
        if resume is None and cfg.gate.pretrain_steps > 0:  # on resume the gate comes from the checkpoint
            pretrain_gate_on_labels(cfg, self.engine, self.gate, self.data.train, self._collate, self.K, self.device)
        if resume is not None:
            resume, state = load_newest_intact(self.engine, self.out_dir, resume, self._run_identity())
            self._load_state(state)
        self.finished = resume is not None and self.step == self.total_steps == finished_step(self.out_dir)
        self.logger = MetricsLogger(self.out_dir, t.tensorboard, enabled=self.rank == 0 and not self.finished,
                                    truncate_after=self.step if resume is not None else None)
        if self.rank == 0 and not self.finished:
            self.cfg.to_yaml(self.out_dir / "config.yaml")
