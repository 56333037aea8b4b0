"""Annotator reward functions of the synthetic review tasks: plain callables `reward(prompt, response) -> float`.

The paper (§4, App. H) annotates GPT-2 IMDb completions with three reward models: sentiment, informativeness and
grammar. Here each is a transparent rule over a small review vocabulary, so the Bayes ceilings of the data can be
computed exactly and samples from a trained model can be scored with the very rules that labelled its data:

- `sentiment`: VADER compound score of the response (`vaderSentiment` lexicon + rules: "but", negation,
  intensifiers), mapped to [0, 1] as (compound + 1) / 2.
- `informativeness`: (distinct specific aspect nouns + 0.5 · neutral descriptive adjectives) / 4.5, clipped to [0, 1].
  "the pacing is slow" says something; "it is great" does not.
- `grammar`: 1 / (1 + errors), errors = subject–verb agreement errors ("the plot are"), a copula not preceded by
  a noun, adjacent repeated words ("the the"), and a missing final period.

All three accept any text (model samples included): unknown words are simply ignored by the rules.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from mixdpo_ds.apps.datasets import vocab

Reward = Callable[[str, str], float]


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=65536)
def _compound(text: str) -> float:
    return float(_vader().polarity_scores(text)["compound"])


def sentiment(prompt: str, response: str) -> float:
    """(VADER compound + 1) / 2 ∈ [0, 1]; 0.5 is neutral. The prompt is ignored."""
    return (_compound(response.strip()) + 1.0) / 2.0


def informativeness(prompt: str, response: str) -> float:
    """min(1, (#distinct specific nouns + 0.5 · #neutral adjectives) / 4.5).

    Example: "the pacing is slow and the plot is great ." → nouns {pacing, plot} = 2, neutral adjectives
    {slow} = 1 → (2 + 0.5) / 4.5 = 0.5556.
    """
    words = response.split()
    nouns = {w for w in words if w in vocab.SPECIFIC_NOUNS}
    neutral = sum(1 for w in words if w in vocab.NEUTRAL_ADJ)
    return min(1.0, (len(nouns) + 0.5 * neutral) / 4.5)


def grammar_errors(response: str) -> int:
    """Count rule violations: agreement, copula without a noun subject, adjacent repeats, missing final period.

    Example: "the plot are great and and it is good" → "plot are" (1) + "and and" (1) + no final "." (1) = 3.
    """
    words = response.split()
    errors = 0
    for i, w in enumerate(words):
        if i > 0 and w == words[i - 1]:
            errors += 1
        if w in vocab.BE_SINGULAR or w in vocab.BE_PLURAL:
            subject = words[i - 1] if i > 0 else ""
            if subject in vocab.SINGULAR_SUBJECTS:
                errors += w in vocab.BE_PLURAL
            elif subject in vocab.PLURAL_SUBJECTS:
                errors += w in vocab.BE_SINGULAR
            else:
                errors += 1
    if not words or words[-1] != ".":
        errors += 1
    return errors


def grammar(prompt: str, response: str) -> float:
    """1 / (1 + grammar_errors(response)) ∈ (0, 1]; 1 = no error, 0.5 = one error."""
    return 1.0 / (1.0 + grammar_errors(response))


ANNOTATORS: dict[str, Reward] = {
    "sentiment": sentiment,
    "informativeness": informativeness,
    "grammar": grammar,
}


def score(reward: Reward, prompts: list[str], responses: list[str]) -> list[float]:
    """Score a list of (prompt, response) with one reward callable."""
    return [reward(p, r) for p, r in zip(prompts, responses, strict=True)]
