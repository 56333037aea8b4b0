"""A word-level tokenizer over the review vocabulary: one token per word, so sequences stay short (a prompt is
4–5 tokens, a response at most ~20) and the tiny model's LM head is ~80 rows.

    tok = build_review_tokenizer("/tmp/reviews_tok")     # saved, then loaded back with AutoTokenizer
    tok("the plot is great .")["input_ids"]

Special tokens `<pad>` (0), `<eos>` (1, also bos), `<unk>` (2). Decoding joins words with single spaces, which is
exactly the text format of the generator, so decoded samples can be scored by the annotator rules.
"""
from __future__ import annotations

import os

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mixdpo_ds.apps.datasets import vocab

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_review_tokenizer(out_dir: str) -> PreTrainedTokenizerFast:
    """Build, save to `out_dir` and reload (AutoTokenizer.from_pretrained) the word-level review tokenizer."""
    words = [PAD, EOS, UNK, *vocab.all_words()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=EOS,
                                   unk_token=UNK, model_max_length=64)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
