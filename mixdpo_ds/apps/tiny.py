"""Tiny, fully local tokenizer and model builders for tests, the demo and CPU smoke configs.

Nothing here touches the Hugging Face hub: the tokenizer is a byte-level BPE trained in a second on a
few strings, the model a 2-layer GPT-2 built from a config. Both are saved with `save_pretrained`, so
the code under test loads them exactly as it loads a real checkpoint (`AutoTokenizer.from_pretrained`,
`AutoModelForCausalLM.from_pretrained`).

    from mixdpo_ds.apps.tiny import build_tiny_tokenizer, build_tiny_model
    tok = build_tiny_tokenizer("/tmp/tiny")
    build_tiny_model("/tmp/tiny", tok)          # /tmp/tiny is now a complete model directory
"""
from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# A minimal chat template: each turn is "<|role|>\n{content}<eos>\n". The generation prompt is the
# assistant header, so the rendered prompt is a prefix of the rendered conversation (data.py relies
# on that prefix property and checks it).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DEFAULT_TEXTS = [
    "Human: What is a good book to read on a rainy day?\n\nAssistant: A long novel, like a mystery.",
    "Human: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, let it rise, then bake it.",
    "The movie was wonderful, the acting was great and I loved the music.",
    "The movie was terrible, the plot was boring and the ending made no sense.",
    "This product works well. I would buy it again. Five stars.",
    "This product broke after a week. Do not buy it. One star.",
    "Please answer the question briefly and politely.",
    "0 1 2 3 4 5 6 7 8 9 , . ! ? ' \" : ; ( ) - the a an and or but not is are was were be",
]


def build_tiny_tokenizer(
    out_dir: str, texts: list[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (default: a few built-in sentences), save it to `out_dir`
    and return it loaded back with `AutoTokenizer.from_pretrained`.

    Byte-level: every string is encodable (no unknown characters), so test data need not be covered by
    the training texts; `<unk>` exists only because some code paths expect an unk token. Special tokens:
    `<pad>` (id 0), `<eos>` (id 1, also bos), `<unk>` (id 2), and the chat role markers. `pad != eos`
    on purpose, so tests catch code that confuses them.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) if texts else DEFAULT_TEXTS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=EOS, unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS, model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def build_tiny_model(
    out_dir: str, tokenizer, n_layer: int = 2, n_embd: int = 32, seed: int = 0, n_head: int = 2, n_positions: int = 128
) -> str:
    """Build a seeded GPT-2 of the given size over `tokenizer`'s vocabulary and save model and tokenizer
    to `out_dir` (a complete `from_pretrained` directory). Returns `out_dir`.

    The same seed gives bit-identical weights, so tests can rebuild a model instead of copying one.
    """
    # imported here: the model stack costs seconds to import, and tokenizer-only users (data tests) skip it
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    gen = torch.random.fork_rng()  # seed locally: leave the caller's global RNG untouched
    with gen:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
