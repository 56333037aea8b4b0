"""Model shapes for `mixdpo plan` (training/plan.py): what the memory formulas need of a transformers config
(GPT-2 and Llama-style decoders), and built-in presets of published models (shapes only, no weights).

    shape = Shape.of(preset_config("llama-3-8b"))   # or Shape.of(AutoConfig.from_pretrained(path))
    shape.model_params(), shape.lora_params(16, ["q_proj", "v_proj"]), shape.layer_activation_elems()
"""
from __future__ import annotations

from dataclasses import dataclass

LLAMA_TYPES = ("llama", "mistral")
MODEL_TYPES = ("gpt2", *LLAMA_TYPES)
# peft's default LoRA targets (peft.utils.constants) for the architectures counted here
DEFAULT_LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"]}


def _presets() -> dict:
    from transformers import GPT2Config, LlamaConfig

    def llama(h, layers, inter, heads):
        return LlamaConfig(vocab_size=128256, hidden_size=h, num_hidden_layers=layers, intermediate_size=inter,
                           num_attention_heads=heads, num_key_value_heads=8, max_position_embeddings=8192,
                           tie_word_embeddings=False)

    return {"llama-3-8b": llama(4096, 32, 14336, 32), "llama-3-70b": llama(8192, 80, 28672, 64),
            "gpt2": GPT2Config(), "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
            "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
            "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25)}


PRESETS = ("llama-3-8b", "llama-3-70b", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def preset_config(name: str):
    """The transformers config of a built-in preset (shapes only, no weights)."""
    if name not in PRESETS:
        raise ValueError(f"--model {name!r}: unknown preset; allowed {list(PRESETS)}")
    return _presets()[name]


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """What the formulas need of a transformers config (GPT-2 and Llama-style decoders)."""
    model_type: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    positions: int      # GPT-2's learned position table (0 for rotary models)
    tied: bool
    bias: bool          # Llama: attention_bias; GPT-2 always has biases

    @classmethod
    def of(cls, config) -> Shape:
        t = getattr(config, "model_type", None)
        if t == "gpt2":
            H = config.n_embd
            return cls(t, config.vocab_size, H, config.n_layer, config.n_inner or 4 * H, config.n_head,
                       config.n_head, H // config.n_head, config.n_positions, bool(config.tie_word_embeddings), True)
        if t in LLAMA_TYPES:
            H, a = config.hidden_size, config.num_attention_heads
            return cls(t, config.vocab_size, H, config.num_hidden_layers, config.intermediate_size, a,
                       config.num_key_value_heads or a, getattr(config, "head_dim", None) or H // a, 0,
                       bool(config.tie_word_embeddings), bool(getattr(config, "attention_bias", False)))
        raise ValueError(f"model_type {t!r}: the memory plan counts {list(MODEL_TYPES)}; pass --model PRESET")

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """name -> (in, out, count per layer) of every linear map of one layer."""
        H, I, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.model_type == "gpt2":  # c_proj is both attn.c_proj (H, H) and mlp.c_proj (I, H)
            return {"c_attn": (H, 3 * H, 1), "attn.c_proj": (H, H, 1), "c_fc": (H, I, 1), "mlp.c_proj": (I, H, 1)}
        return {"q_proj": (H, q, 1), "k_proj": (H, kv, 1), "v_proj": (H, kv, 1), "o_proj": (q, H, 1),
                "gate_proj": (H, I, 1), "up_proj": (H, I, 1), "down_proj": (I, H, 1)}

    def layer_params(self) -> int:
        H = self.hidden
        weights = sum(i * o * c for i, o, c in self.linears().values())
        if self.model_type == "gpt2":
            return weights + sum(o * c for _, o, c in self.linears().values()) + 4 * H     # biases, ln_1, ln_2
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return weights + (q + 2 * kv + H if self.bias else 0) + 2 * H                      # biases, two RMSNorms

    def trunk_params(self) -> int:
        """The decoder without its LM head (`model.base_model`): embeddings, layers, final norm."""
        H = self.hidden
        final_norm = 2 * H if self.model_type == "gpt2" else H
        return self.vocab * H + self.positions * H + self.layers * self.layer_params() + final_norm

    def model_params(self) -> int:
        """sum(p.numel()) of the causal LM (a tied head is the input embedding, counted once)."""
        return self.trunk_params() + (0 if self.tied else self.vocab * self.hidden)

    def lora_params(self, r: int, targets: list[str] | None) -> int:
        """One adapter's lora_A (r, in) + lora_B (out, r) on every matching linear of every layer."""
        targets = targets or DEFAULT_LORA_TARGETS[self.model_type]
        per_layer = sum(r * (i + o) * c for name, (i, o, c) in self.linears().items()
                        if any(name == t or name.endswith("." + t) for t in targets))
        return self.layers * per_layer

    def layer_activation_elems(self) -> int:
        """Elements one transformer layer saves for its backward, per token (docs/scaling.md "Activations")."""
        H, I = self.hidden, self.intermediate
        if self.model_type == "gpt2":
            return 9 * H + 2 * I
        return (10 + 4 * self.kv_heads // self.heads) * H + 4 * I
