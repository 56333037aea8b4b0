"""The closed vocabulary of the synthetic review tasks (about 70 words).

Word lists are chosen against the VADER lexicon: only the evaluative adjectives (and the connector "but",
which VADER's rules weigh) move the sentiment score; nouns, neutral adjectives, titles and function words are
absent from the lexicon, so the three annotator rules read disjoint features of a response.
"""

SINGULAR_NOUNS = ("plot", "ending", "dialogue", "pacing", "setting", "story", "tone")
PLURAL_NOUNS = ("characters", "scenes", "twists")
SPECIFIC_NOUNS = frozenset(SINGULAR_NOUNS + PLURAL_NOUNS)
VAGUE_SUBJECTS = ("it", "this", "everything")

SINGULAR_SUBJECTS = frozenset(SINGULAR_NOUNS + VAGUE_SUBJECTS)
PLURAL_SUBJECTS = frozenset(PLURAL_NOUNS)
BE_SINGULAR = frozenset({"is", "was"})
BE_PLURAL = frozenset({"are", "were"})
BE_PRESENT = {"singular": "is", "plural": "are"}
BE_PAST = {"singular": "was", "plural": "were"}

INTENSIFIERS = ("really", "very", "quite")
POSITIVE_ADJ = ("great", "superb", "wonderful", "good", "brilliant", "lovely", "clever", "beautiful")
NEGATIVE_ADJ = ("awful", "boring", "bad", "terrible", "dull", "weak", "poor")
NEUTRAL_ADJ = frozenset({"long", "short", "simple", "slow", "dark", "quiet", "plain"})
CONNECTORS = ("and", "but")

MOVIE_TITLES = ("heat", "alien", "jaws", "vertigo", "rocky", "psycho")
BOOK_TITLES = ("emma", "dune", "ulysses", "ivanhoe", "hamlet", "walden")
DOMAINS = ("movie", "book")


def all_words() -> list[str]:
    """Every word the generator can emit (prompts and responses), in a fixed order."""
    words = ["review", "of", ":", ".", "the", *DOMAINS, *MOVIE_TITLES, *BOOK_TITLES]
    words += [*SINGULAR_NOUNS, *PLURAL_NOUNS, *VAGUE_SUBJECTS, "is", "are", "was", "were"]
    words += [*INTENSIFIERS, *POSITIVE_ADJ, *NEGATIVE_ADJ, *sorted(NEUTRAL_ADJ), *CONNECTORS]
    return list(dict.fromkeys(words))
