"""`experts:` of the run config (`ExpertsConfig`): which kind of K experts, how they start, how they train and
how their log-probs are computed (model/experts.py builds them; docs/math.md §1, §8)."""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("heads", "models", "lora")
TRUNK_MODES = ("frozen", "trainable")
LOGPROB_IMPLS = ("auto", "naive", "chunked", "triton")
DEFAULT_INIT_NOISE = 0.05


@dataclass
class ExpertsConfig:
    kind: str = field(default="heads", metadata={"help": "heads (Case 1) | models (Case 2) | lora (K adapters)"})
    num_experts: int = field(default=3, metadata={"help": "K, the number of experts"})
    init_noise: float | None = field(default=None, metadata={
        "help": "None: 0.05 when num_experts > 1 (symmetry must be broken: docs/math.md §8), else 0. Otherwise the std "
                "of the Gaussian noise added to each expert copy, relative to the std of the weight it is added "
                "to: heads: the base head; models: every weight matrix (ndim >= 2); lora: each lora_B gets noise "
                "relative to its base layer's weight std. 0 keeps the copies identical (symmetry: docs/math.md §8)"})
    trunk: str = field(default="frozen", metadata={
        "help": "heads only: frozen (no grad, eval mode, run under no_grad; low-capacity experts specialise) | "
                "trainable"})
    init_paths: list[str] | None = field(default=None, metadata={
        "help": "models only: K initial checkpoints (default: every expert starts from the base)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "peft target modules (None: peft's default for the architecture; the LM head may not be one)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lr_trunk: float | None = field(default=None, metadata={"help": "trunk learning rate (heads, trainable trunk); "
                                                                   "None: the optimizer lr"})
    lr_experts: list[float] | float | None = field(default=None, metadata={
        "help": "per-expert learning rate (one value or K values; heads: all K equal, they are one parameter)"})
    logprob_impl: str = field(default="auto", metadata={
        "help": "expert_logprobs implementation: auto (triton on CUDA, chunked otherwise) | naive | chunked | triton"})
    chunk_size: int | None = field(default=None, metadata={"help": "vocabulary chunk of the chunked kernel"})
    head_rank: int | None = field(default=None, metadata={
        "help": "heads only: None: K full (V, H) heads; r >= 1: expert k's head is W + A_k B_k with W the shared "
                "base head (frozen with a frozen trunk, trained with a trainable one) and A_k (V, r), B_k (r, H): "
                "K experts for about one head plus K·r/H of one (docs/math.md §16)"})
    ep_size: int = field(default=1, metadata={"help": "expert-parallel group size (model/parallel.py); 1 = dense"})
    disable_dropout: bool = field(default=True, metadata={
        "help": "set every dropout p to 0 in the experts (as TRL does for DPO: policy and reference log-probs "
                "must be comparable)"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"experts.kind={self.kind!r}: allowed {KINDS}")
        if self.num_experts < 1:
            raise ValueError(f"experts.num_experts={self.num_experts}: must be >= 1")
        if self.init_noise is None:
            self.init_noise = DEFAULT_INIT_NOISE if self.num_experts > 1 else 0.0
        if self.init_noise < 0:
            raise ValueError(f"experts.init_noise={self.init_noise}: must be >= 0")
        if self.trunk not in TRUNK_MODES:
            raise ValueError(f"experts.trunk={self.trunk!r}: allowed {TRUNK_MODES}")
        if self.logprob_impl not in LOGPROB_IMPLS:
            raise ValueError(f"experts.logprob_impl={self.logprob_impl!r}: allowed {LOGPROB_IMPLS}")
        if self.init_paths is not None:
            if self.kind != "models":
                raise ValueError(f"experts.init_paths is for experts.kind='models', not {self.kind!r}")
            if len(self.init_paths) != self.num_experts:
                raise ValueError(f"experts.init_paths has {len(self.init_paths)} paths; experts.num_experts="
                                 f"{self.num_experts}")
        if isinstance(self.lr_experts, (list, tuple)):
            if len(self.lr_experts) != self.num_experts:
                raise ValueError(f"experts.lr_experts has {len(self.lr_experts)} values; need one or "
                                 f"experts.num_experts={self.num_experts}")
            if self.kind == "heads" and len(set(self.lr_experts)) > 1:
                raise ValueError("experts.lr_experts: kind 'heads' keeps the K heads in one (K, V, H) parameter "
                                 "(one fused kernel call), so the K values must be equal")
        if self.lora_r < 1:
            raise ValueError(f"experts.lora_r={self.lora_r}: must be >= 1")
        if self.lora_target_modules and any("lm_head" in m for m in self.lora_target_modules):
            raise ValueError("experts.lora_target_modules: the LM head may not be a LoRA target (the head is read "
                             "as a plain weight by the log-prob kernel)")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(f"experts.ep_size={self.ep_size}: must be >= 1 and divide experts.num_experts="
                             f"{self.num_experts}")
        if self.head_rank is not None:
            if self.head_rank < 1 or self.kind != "heads" or self.ep_size > 1 or self.logprob_impl == "triton":
                raise ValueError(f"experts.head_rank={self.head_rank}: must be >= 1, with experts.kind='heads' "
                                 f"(got {self.kind!r}), experts.ep_size=1 (got {self.ep_size}) and "
                                 f"experts.logprob_impl auto | naive | chunked (got {self.logprob_impl!r}; the "
                                 "Triton kernel has no low-rank variant yet)")
        if self.ep_size > 1 and self.kind != "heads":
            raise ValueError(f"experts.ep_size={self.ep_size} is implemented for experts.kind='heads' only, "
                             f"got {self.kind!r}; use experts.ep_size=1")

    def expert_lr(self, k: int, lr: float) -> float:
        if self.lr_experts is None:
            return lr
        if isinstance(self.lr_experts, (list, tuple)):
            return float(self.lr_experts[k])
        return float(self.lr_experts)
