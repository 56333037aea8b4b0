"""Shared fixtures: a tiny local tokenizer and a tiny GPT-2 directory (session-scoped, built once).

`tiny_tokenizer`: byte-level BPE `PreTrainedTokenizerFast` loaded with `AutoTokenizer.from_pretrained`;
pad `<pad>` (0), eos/bos `<eos>` (1), unk `<unk>` (2), and a chat template (see `mixdpo_ds.apps.tiny`).
`tiny_gpt2_dir`: a directory with a seeded 2-layer GPT-2 (n_embd 32, n_head 2, n_positions 128) and the
tokenizer, loadable with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
"""
import os
from pathlib import Path

import pytest
import torch

# Triton picks interpreter or compiler when `triton` is first imported (deepspeed imports it), so this must run
# before any test module is collected: on a CPU-only machine the kernels run under the interpreter
# (docs/deepspeed.md §11).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from mixdpo_ds.apps.tiny import build_tiny_model, build_tiny_tokenizer

TEST_DATA = Path(__file__).parent / "data"
SHM_BUFFERS = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"


@pytest.fixture(scope="session", autouse=True)
def _remove_shm_buffers_made_by_the_tests():
    """A process removes its own DeepSpeed CPU all-reduce buffer (69 MB) at exit, but one a test SIGKILLs, or one
    that dies in a collective's timeout, cannot: after the session every buffer that appeared during it goes."""
    import glob

    before = set(glob.glob(SHM_BUFFERS))
    yield
    for path in set(glob.glob(SHM_BUFFERS)) - before:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_gpt2")), tiny_tokenizer, n_layer=2, n_embd=32, seed=0)
