"""mixdpo_ds.apps.tiny: the local tokenizer and GPT-2 builders behind the shared fixtures."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixdpo_ds.apps.tiny import build_tiny_model


def test_tiny_tokenizer_round_trips_and_has_distinct_special_tokens(tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    text = "Human: héllo ✓\n\nAssistant: ok"  # byte-level: any text round-trips
    assert tok.decode(tok(text)["input_ids"], clean_up_tokenization_spaces=False) == text
    assert tok.chat_template is not None


def test_tiny_gpt2_dir_loads_and_rebuilds_bit_identically(tiny_gpt2_dir, tiny_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (2, 32, 2, 128)
    assert cfg.vocab_size == len(tiny_tokenizer) and cfg.pad_token_id == 0
    assert AutoTokenizer.from_pretrained(tiny_gpt2_dir).eos_token_id == 1
    state = torch.get_rng_state()
    again = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / "m"), tiny_tokenizer, seed=0))
    assert torch.equal(torch.get_rng_state(), state)  # the builder does not consume the global RNG
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / "o"), tiny_tokenizer, seed=1))
    assert not torch.equal(model.transformer.wte.weight, other.transformer.wte.weight)
