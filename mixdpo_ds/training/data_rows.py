"""One preference row → prompt / response texts → token ids (docs/ARCHITECTURE.md "Data").
Used by `mixdpo_ds.training.data`.

Everything here is a pure function of one row (plus the tokenizer); a row that cannot become a
training pair raises `BadRow(reason, message)`, and `data.py` turns that into an error naming the
source and row, or (`data.on_bad_row = skip`) into a count in `PreferenceData.skipped`.

Two row formats:
- strings. HH-RLHF transcripts repeat the prompt inside `chosen` / `rejected`; a prompt prefix is cut
  off, and without a prompt column the prompt is derived as the shared prefix up to the last
  "\\n\\nAssistant:" (`split_transcripts`).
- chat message lists `[{"role", "content"}]`, rendered with the tokenizer's chat template; the
  response text is the rendered conversation minus the rendered prompt (`render_chat`).
"""
from __future__ import annotations

HH_ASSISTANT = "\n\nAssistant:"


class BadRow(Exception):
    """A row that cannot become a training pair. `reason` is the key counted in `PreferenceData.skipped`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _common_prefix_len(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_transcripts(prompt: str | None, chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) strings → (prompt, chosen response, rejected response).

    With a prompt: a response that starts with the prompt has it cut off (HH-RLHF repeats the whole
    transcript). If both remainders then start with "\\n\\nAssistant:", that turn header moves into the
    prompt, so the prompt ends where the assistant starts speaking, exactly as in the derived case.
    Without a prompt (`None`): the prompt is the longest common prefix of chosen and rejected that ends
    with "\\n\\nAssistant:" (the HH-RLHF convention); without one, TRL's implicit prompt: the whole shared
    start (a space just before the split goes to the responses), as `trl.extract_prompt`; no shared start, or one
    that leaves a response empty, is a bad row.
    """
    if prompt is None:
        shared = _common_prefix_len(chosen, rejected)
        cut = chosen.rfind(HH_ASSISTANT, 0, shared)  # whole marker inside the shared prefix
        if cut >= 0:
            cut += len(HH_ASSISTANT)
            return chosen[:cut], chosen[cut:], rejected[cut:]
        # TRL's implicit prompt (trl.extract_prompt): the shared start, a space before the split left to the responses
        cut = shared - 1 if shared > 0 and chosen[shared - 1] == " " else shared
        if cut == 0 or cut >= min(len(chosen), len(rejected)):
            raise BadRow("no_prompt", f"no prompt column, and 'chosen' / 'rejected' share no prefix to split the "
                                      f"prompt at (neither a {HH_ASSISTANT!r} turn nor a common start followed by "
                                      "two different responses)")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if prompt:
        chosen = chosen[len(prompt):] if chosen.startswith(prompt) else chosen
        rejected = rejected[len(prompt):] if rejected.startswith(prompt) else rejected
        if chosen.startswith(HH_ASSISTANT) and rejected.startswith(HH_ASSISTANT):
            prompt = prompt + HH_ASSISTANT
            chosen, rejected = chosen[len(HH_ASSISTANT):], rejected[len(HH_ASSISTANT):]
    return prompt, chosen, rejected


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _same_messages(a: list[dict], b: list[dict]) -> bool:
    # datasets gives every message all struct fields of the column (missing ones as None): compare
    # only what a chat template renders for sure.
    return [(m.get("role"), m.get("content")) for m in a] == [(m.get("role"), m.get("content")) for m in b]


def render_chat(tokenizer, prompt, chosen, rejected) -> tuple[str, str, str]:
    """Chat rows → (prompt text, chosen response text, rejected response text), rendered.

    prompt: message list, a string (one user turn) or None (derived: the messages chosen and rejected
    share at the start). chosen / rejected: message lists (a leading copy of the prompt is removed) or a
    string (one assistant turn). The prompt is rendered with `add_generation_prompt=True`; each response
    text is the rendered full conversation minus that rendered prompt, which must be a prefix of it.
    A template that breaks this prefix property raises ValueError (a setup error, not a bad row).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the rows hold chat messages but the tokenizer has no chat_template; "
                         "use a chat model's tokenizer or plain-string columns")
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise BadRow("no_prompt", "no prompt column, and 'chosen' / 'rejected' are not both message lists")
        n = 0
        while n < min(len(chosen), len(rejected)) and _same_messages(chosen[n:n + 1], rejected[n:n + 1]):
            n += 1
        while n > 0 and chosen[n - 1].get("role") == "assistant":  # the prompt ends before an assistant turn
            n -= 1
        if n == 0:
            raise BadRow("no_prompt", "no prompt column, and 'chosen' / 'rejected' share no leading messages")
        prompt = chosen[:n]
    prompt_msgs = _as_messages(prompt, "user")
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    out = [prompt_text]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        msgs = _as_messages(value, "assistant")
        if _same_messages(msgs[:len(prompt_msgs)], prompt_msgs):
            msgs = msgs[len(prompt_msgs):]
        if not msgs or all(not (m.get("content") or "").strip() for m in msgs):
            raise BadRow("empty_response", f"{name!r} is empty after removing the prompt messages")
        full = tokenizer.apply_chat_template(prompt_msgs + msgs, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                f"the chat template does not render the prompt (with add_generation_prompt=True) as a prefix of "
                f"the full conversation, so the {name!r} response cannot be cut off it.\n"
                f"prompt: {prompt_text[-200:]!r}\nfull:   {full[:len(prompt_text) + 50][-250:]!r}")
        out.append(full[len(prompt_text):])
    return out[0], out[1], out[2]


def row_texts(tokenizer, prompt, chosen, rejected, prompt_column: str | None) -> tuple[str, str, str, bool]:
    """Checks one row's values and returns (prompt text, chosen text, rejected text, is_chat).

    `prompt` is None when the dataset has no prompt column (`prompt_column` None); a None *value* in an
    existing column is a bad row ("missing_value"), like an empty response or chosen == rejected.
    """
    values = {"chosen": chosen, "rejected": rejected}
    if prompt_column is not None:
        values["prompt"] = prompt
    for name, value in values.items():
        if value is None:
            raise BadRow("missing_value", f"{name!r} is missing (None)")
        if not isinstance(value, (str, list)):
            raise BadRow("bad_type", f"{name!r} is a {type(value).__name__}, expected a string or a message list")
    is_chat = any(isinstance(v, list) for v in values.values())
    if is_chat:
        prompt, chosen, rejected = render_chat(tokenizer, prompt, chosen, rejected)
    else:
        stripped = prompt_column is None or bool(prompt) and chosen.startswith(prompt)
        prompt, chosen, rejected = split_transcripts(prompt, chosen, rejected)
        after = " after removing the prompt" if stripped else ""
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise BadRow("empty_response", f"{name!r} is empty{after}")
    if chosen == rejected:
        raise BadRow("chosen_equals_rejected", "'chosen' and 'rejected' responses are identical")
    return prompt, chosen, rejected, is_chat


def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
    max_length: int, max_prompt_length: int, keep_prefix: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Truncate one pair so that prompt + each response fits in `max_length` tokens.

    The prompt keeps its last `max_prompt_length` tokens (left truncation: the end of a dialogue matters
    most), but always its first `keep_prefix` tokens (a BOS the tokenizer adds). Each response keeps its
    first `max_length - len(prompt)` tokens. With `max_prompt_length < max_length` (the default
    512 / 256) at least one response token always remains; with `max_prompt_length == max_length` a
    prompt that fills the budget is a bad row ("no_room") instead of being cut.
    Example: prompt 10, chosen 7, rejected 3 tokens, max_length 8, max_prompt_length 5 → prompt = last 5,
    room 8 - 5 = 3 → chosen = first 3, rejected = all 3.
    """
    if len(prompt_ids) > max_prompt_length:
        keep_prefix = min(keep_prefix, max_prompt_length - 1)
        tail = max_prompt_length - keep_prefix
        prompt_ids = prompt_ids[:keep_prefix] + prompt_ids[len(prompt_ids) - tail:]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise BadRow("no_room", f"the prompt ({len(prompt_ids)} tokens) leaves no room for a response within "
                                f"data.max_length={max_length}")
    chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    if chosen_ids == rejected_ids:
        raise BadRow("identical_after_truncation", f"'chosen' and 'rejected' are identical in their first {room} "
                                                   "tokens (all that fits after the prompt)")
    return prompt_ids, chosen_ids, rejected_ids


# ------------------------------------------------------------------------------------------- ranked rows
def ranking_order(n: int, ranking=None, scores=None) -> list[int]:
    """The indices of a row's `n` responses, best first (docs/math.md §15), from one of:

    ranking: the response indices best first, a permutation of 0..n-1 ([2, 0, 1]: response 2 is best);
    scores: one number per response, higher is better (UltraFeedback-style ratings); sorted descending.
    Ties policy: a Plackett–Luce likelihood needs a strict order, and a tie says nothing about which of the tied
    responses came first, so tied scores make the row a bad row ("tied_scores": an error, or dropped and counted
    with data.on_bad_row=skip); they are never broken by position. A wrong length, a repeated or out-of-range index,
    or a missing / non-numeric score is a bad row too ("bad_ranking").
    """
    if ranking is not None:
        if not isinstance(ranking, (list, tuple)) or not all(isinstance(r, int) and not isinstance(r, bool)
                                                             for r in ranking):
            raise BadRow("bad_ranking", f"'ranking' must be a list of response indices (ints), got {ranking!r}")
        if len(ranking) != n:
            raise BadRow("bad_ranking", f"'ranking' has {len(ranking)} entries for {n} responses")
        repeated = sorted({r for r in ranking if ranking.count(r) > 1})
        if repeated:
            raise BadRow("bad_ranking", f"'ranking' repeats response index(es) {repeated}: {list(ranking)}")
        if sorted(ranking) != list(range(n)):
            raise BadRow("bad_ranking", f"'ranking' must be a permutation of 0..{n - 1}, got {list(ranking)}")
        return list(ranking)
    if not isinstance(scores, (list, tuple)) or len(scores) != n:
        got = f"{len(scores)} scores" if isinstance(scores, (list, tuple)) else repr(scores)
        raise BadRow("bad_ranking", f"'scores' must hold one number per response ({n}), got {got}")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s == s for s in scores):
        raise BadRow("bad_ranking", f"'scores' must be numbers (no None / NaN), got {list(scores)}")
    if len(set(scores)) != n:
        tied = sorted({s for s in scores if list(scores).count(s) > 1})
        raise BadRow("tied_scores", f"'scores' {list(scores)} tie at {tied}: a ranking needs a strict order "
                                    "(tied rows are not broken by position)")
    return sorted(range(n), key=lambda i: -scores[i])


def ranked_row_texts(tokenizer, prompt, responses, prompt_column: str | None, ranking=None, scores=None
                     ) -> tuple[str, list[str], bool]:
    """One ranked row (`responses` list + `ranking` or `scores`) -> (prompt text, response texts best first, is_chat).

    Each response may be a string or a message list, as `chosen` / `rejected` of a pair (`row_texts`: prompt
    prefixes cut off, chat templates rendered); every pair (best, other) must give the same prompt text.
    """
    if not isinstance(responses, (list, tuple)) or len(responses) < 2:
        raise BadRow("bad_responses", f"'responses' must be a list of >= 2 responses, got {type(responses).__name__}"
                                      f"{f' of {len(responses)}' if isinstance(responses, (list, tuple)) else ''}")
    order = ranking_order(len(responses), ranking, scores)
    prompt_text, texts, is_chat = None, [], False
    for j in order[1:]:
        a = order[0]
        try:
            p, best, other, chat = row_texts(tokenizer, prompt, responses[a], responses[j], prompt_column)
        except BadRow as bad:
            raise BadRow(bad.reason, f"responses[{a}] (best) vs responses[{j}] as chosen / rejected: "
                                     f"{bad.message}") from None
        if prompt_text is not None and p != prompt_text:
            raise BadRow("no_prompt", f"responses[{a}] and responses[{j}] do not share the prompt of the others")
        prompt_text, is_chat = p, is_chat or chat
        texts = texts or [best]
        texts.append(other)
    seen = {}
    for j, text in zip(order, texts, strict=True):
        if text in seen:
            raise BadRow("chosen_equals_rejected", f"responses[{seen[text]}] and responses[{j}] are identical")
        seen[text] = j
    return prompt_text, texts, is_chat


def truncate_ranked(prompt_ids: list[int], responses_ids: list[list[int]], max_length: int, max_prompt_length: int,
                    keep_prefix: int = 0) -> tuple[list[int], list[list[int]]]:
    """`truncate_pair` for m responses: the prompt as there, every response its first max_length − |prompt|
    tokens; two responses identical after that cut make a bad row ("identical_after_truncation")."""
    prompt_ids, _, _ = truncate_pair(prompt_ids, responses_ids[0], responses_ids[1], max_length,
                                     max_prompt_length, keep_prefix)
    room = max_length - len(prompt_ids)
    out = [ids[:room] for ids in responses_ids]
    if len({tuple(ids) for ids in out}) != len(out):
        raise BadRow("identical_after_truncation", f"two ranked responses are identical in their first {room} tokens "
                                                   "(all that fits after the prompt)")
    return prompt_ids, out


def item_texts(tok, row: dict, cols: dict) -> tuple[str, list[str], bool]:
    """One row (role -> value) -> (prompt text, response texts in ranked order, is_chat): [chosen, rejected] of a
    pair, or the m responses of a ranked row best first (docs/math.md §15). `cols`: role -> column name or None."""
    if cols["responses"] is not None:
        return ranked_row_texts(tok, row["prompt"], row["responses"], cols["prompt"], row["ranking"], row["scores"])
    prompt, chosen, rejected, is_chat = row_texts(tok, row["prompt"], row["chosen"], row["rejected"], cols["prompt"])
    return prompt, [chosen, rejected], is_chat


def check_ranking_size(splits: list[list[dict]], label: str) -> None:
    """Ranked data: every row (train and eval) ranks the same number m of responses (one m·B model batch)."""
    sizes = [(len(ex["response_ids"]), ex["index"]) for split in splits for ex in split if "response_ids" in ex]
    if sizes and any(m != sizes[0][0] for m, _ in sizes):
        m, index = next((m, i) for m, i in sizes if m != sizes[0][0])
        raise ValueError(f"{label} row {index}: ranks {m} responses, but row {sizes[0][1]} ranks {sizes[0][0]}; every "
                         "row of ranked data must rank the same number of responses")


class Encoder:
    """Batched tokenisation with the tokenizer's own special prefix (e.g. BOS) kept on the prompt."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        at = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain), 0)
        self.prefix = list(with_special[:at])  # BOS for Llama-style tokenizers, [] for GPT-2
        self.eos = tokenizer.eos_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: we truncate ourselves, the "longer than model_max_length" warning does not apply
        out = self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        return [list(ids) for ids in out]

    def prompts(self, texts: list[str], is_chat: list[bool]) -> list[list[int]]:
        # A rendered chat template already carries its BOS as text.
        return [ids if chat else self.prefix + ids for ids, chat in zip(self.encode(texts), is_chat, strict=True)]

    def responses(self, texts: list[str], is_chat: list[bool]) -> list[list[int]]:
        # Chat templates end a turn themselves (often with EOS): add EOS only if the template did not.
        out = self.encode(texts)
        if self.eos is not None:
            for ids, chat in zip(out, is_chat, strict=True):
                if not (chat and self.eos in ids) and (not ids or ids[-1] != self.eos):
                    ids.append(self.eos)
        return out
