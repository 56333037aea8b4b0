"""mixdpo_ds.training.data_rows (one row → texts → truncated ids) and chat-message columns through the loader."""
import json

import pytest

from mixdpo_ds.training.data import DataConfig, load_preference_data
from mixdpo_ds.training.data_rows import BadRow, render_chat, split_transcripts, truncate_pair

A = "\n\nAssistant:"


def test_split_transcripts_with_prompt_moves_the_assistant_header_into_the_prompt():
    p = "Human: hi"
    assert split_transcripts(p, p + A + " hello", p + A + " go") == (p + A, " hello", " go")
    # responses that do not repeat the prompt are kept whole
    assert split_transcripts("Q?", " yes", " no") == ("Q?", " yes", " no")
    # only one response repeats it: cut that one, keep the header where it is (not shared)
    assert split_transcripts(p, p + A + " hello", " go") == (p, A + " hello", " go")


def test_split_transcripts_derives_the_prompt_at_the_last_shared_assistant_turn():
    c = "Human: a" + A + " b\n\nHuman: c" + A + " I think so"
    r = "Human: a" + A + " b\n\nHuman: c" + A + " I do not"
    # shared prefix runs into " I " — the cut is still after the last whole "\n\nAssistant:"
    assert split_transcripts(None, c, r) == ("Human: a" + A + " b\n\nHuman: c" + A, " I think so", " I do not")
    with pytest.raises(BadRow) as e:
        split_transcripts(None, "Human: a\n\nAssist", "Human: a\n\nAssistant")  # marker not whole in both
    assert e.value.reason == "no_prompt"


def test_truncate_pair_hand_example():
    """prompt 10, chosen 7, rejected 3 tokens; max_length 8, max_prompt_length 5:
    prompt → its last 5 = [5..9]; room = 8 - 5 = 3 → chosen = first 3 = [20, 21, 22], rejected whole."""
    p, c, r = truncate_pair(list(range(10)), list(range(20, 27)), [30, 31, 32], 8, 5)
    assert (p, c, r) == ([5, 6, 7, 8, 9], [20, 21, 22], [30, 31, 32])


def test_truncate_pair_keeps_the_bos_prefix_and_one_response_token():
    """keep_prefix 1: prompt [0..9] → [0] + last 4 = [0, 6, 7, 8, 9]; room = 6 - 5 = 1 response token."""
    p, c, r = truncate_pair(list(range(10)), [20, 21], [30, 31], 6, 5, keep_prefix=1)
    assert (p, c, r) == ([0, 6, 7, 8, 9], [20], [30])
    # max_prompt_length < max_length: whatever the lengths, >= 1 response token remains
    for n in range(1, 30):
        _, c, r = truncate_pair(list(range(n)), [1, 2], [3], 6, 5)
        assert len(c) >= 1 and len(r) >= 1


def test_truncate_pair_no_room_and_identical_prefix_are_bad_rows():
    with pytest.raises(BadRow) as e:
        truncate_pair(list(range(6)), [1], [2], 6, 6)  # prompt fills max_length=6 → room 0
    assert e.value.reason == "no_room" and "data.max_length=6" in e.value.message
    with pytest.raises(BadRow) as e:
        truncate_pair([0], [5, 6, 7], [5, 6, 8], 3, 2)  # room 2: [5, 6] == [5, 6]
    assert e.value.reason == "identical_after_truncation"


# ---------------------------------------------------------------------------------------- chat columns
def user(t):
    return {"role": "user", "content": t}


def bot(t):
    return {"role": "assistant", "content": t}


def test_render_chat_cuts_the_rendered_prompt_off_the_conversation(tiny_tokenizer):
    p, c, r = render_chat(tiny_tokenizer, [user("hi")], [user("hi"), bot("hello")], [bot("go")])
    assert p == "<|user|>\nhi<eos>\n<|assistant|>\n"
    assert (c, r) == ("hello<eos>\n", "go<eos>\n")
    # no prompt: the shared leading messages, never ending in an assistant turn
    p2, c2, r2 = render_chat(tiny_tokenizer, None, [user("a"), bot("b"), user("c"), bot("d")],
                             [user("a"), bot("b"), user("c"), bot("e")])
    assert p2.endswith("<|user|>\nc<eos>\n<|assistant|>\n") and (c2, r2) == ("d<eos>\n", "e<eos>\n")
    p3, _, _ = render_chat(tiny_tokenizer, None, [user("a"), bot("b")], [user("a"), bot("b"), bot("x")])
    assert p3 == "<|user|>\na<eos>\n<|assistant|>\n"


def test_render_chat_errors_when_the_template_breaks_the_prefix_property(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    # a template that renders the generation header differently from a real assistant turn
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<bot>{% endif %}")
    with pytest.raises(ValueError, match="does not render the prompt .* as a prefix"):
        render_chat(tok, [user("hi")], [bot("a")], [bot("b")])
    tok.chat_template = None
    with pytest.raises(ValueError, match="tokenizer has no chat_template"):
        render_chat(tok, [user("hi")], [bot("a")], [bot("b")])


def test_loader_reads_chat_message_columns(tmp_path, tiny_tokenizer):
    rows = [  # UltraFeedback-style: a string prompt, full conversations as responses
        {"prompt": "hi", "chosen": [user("hi"), bot("hello there")], "rejected": [user("hi"), bot("go")]},
        {"prompt": "bye", "chosen": [user("bye"), bot("see you")], "rejected": [user("bye"), bot("")]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 1: 'rejected' is empty after removing the prompt messages"):
        load_preference_data(DataConfig(path=str(path)), tiny_tokenizer)
    data = load_preference_data(DataConfig(path=str(path), on_bad_row="skip"), tiny_tokenizer)
    assert data.skipped == {"empty_response": 1}
    ex = data.train[0]
    dec = lambda ids: tiny_tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    assert dec(ex["prompt_ids"]) == "<|user|>\nhi<eos>\n<|assistant|>\n"
    # the template already ends the turn with <eos>: no second EOS is appended
    assert dec(ex["chosen_ids"]) == "hello there<eos>\n" and dec(ex["rejected_ids"]) == "go<eos>\n"
