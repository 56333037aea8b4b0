"""Helpers on a Hugging Face causal LM, shared by the experts (`mixdpo_ds.model.experts`) and the reference
(`mixdpo_ds.model.reference`): the LM head as a plain (V, H) weight, the trunk pass, sequence log-probs over
response tokens, dropout off, and the ZeRO-3 plumbing for weights read outside their module's forward.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from mixdpo_ds.compat import is_zero3_partitioned

IGNORE_INDEX = -100


def response_tokens(hidden: torch.Tensor, labels: torch.Tensor):
    """The response tokens of a batch: (rows (N,), token_hidden (N, H), targets (N,)) from (2B, T, H), (2B, T).

    Token t predicts labels[t + 1] (the shift of causal LMs); only positions whose shifted label is not -100 go in.
    """
    targets = labels[:, 1:]                                           # (2B, T-1)
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)     # (N,), (N,)
    return rows, hidden[:, :-1][rows, cols], targets[rows, cols]


def sum_per_row(token_logps: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(N, K) token log-probs summed into their rows with index_add_ -> (num_rows, K) fp32."""
    out = torch.zeros(num_rows, token_logps.shape[1], dtype=torch.float32, device=token_logps.device)
    return out.index_add_(0, rows, token_logps.float())


def sequence_logps(hidden: torch.Tensor, heads: torch.Tensor, labels: torch.Tensor, impl: str = "auto",
                   chunk_size: int | None = None) -> torch.Tensor:
    """Sequence log-probs of K heads over response tokens: (2B, T, H), (K, V, H), (2B, T) -> (2B, K) fp32.

    The response tokens (`response_tokens`) go into `expert_logprobs` as an (N, H) matrix, and the (N, K) token
    log-probs are summed per row (docs/math.md §1: lp_k = Σ_t log π_k(y_t | x, y_<t) over response tokens only).
    """
    from mixdpo_ds.kernels import default_impl, expert_logprobs  # lazy: keeps `import experts` light

    rows, token_hidden, targets = response_tokens(hidden, labels)
    impl = default_impl(hidden.device) if impl == "auto" else impl
    token_logps = expert_logprobs(token_hidden, heads, targets, impl=impl, chunk_size=chunk_size)  # (N, K)
    return sum_per_row(token_logps, rows, hidden.shape[0])                                        # (2B, K)


def head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The (V, H) output embedding of a causal LM; heads with a bias are refused (GPT-2, Llama have none)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: LM heads with a bias are not supported by the expert kernel")
    return head.weight


def trunk_hidden(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # no KV cache: nothing here decodes, and a cache is incompatible with gradient checkpointing
    return trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (2B, T, H)


def disable_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def register_heads_for_zero3(module: nn.Module, weights: list[torch.Tensor]) -> None:
    """Let ZeRO-3 gather LM-head weights that `module.forward` reads outside the head's own forward.

    ZeRO-3 materialises a parameter only inside its owning module's forward (docs/deepspeed.md §5); the `models`,
    `lora` and reference paths read `get_output_embeddings().weight` from the enclosing forward, so the weight
    is registered as an external parameter of that module. Only a dict on the module: harmless without ZeRO-3.
    Done when deepspeed is already imported (the trainer imports it before building the policy), so plain
    inference does not pay deepspeed's import.
    """
    if "deepspeed" not in sys.modules:
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for w in weights:
        register_external_parameter(module, w)


def partitioned(params) -> bool:
    """True for ZeRO-3 parameters partitioned at load (`HfDeepSpeedConfig` + from_pretrained): data is empty."""
    return any(is_zero3_partitioned(p) for p in params)


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modify: bool = False):
    """Full values of ZeRO-3 parameters inside the block (rank 0's edits kept when modify); a no-op otherwise."""
    if not partitioned(params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield
