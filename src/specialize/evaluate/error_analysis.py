"""Behaviour checks that apply to every task, and the per-example error categories.

Scores say *how much* a system is wrong; categories say *how*, which is what decides the next
step (more data, a stop token, retrieval, a stricter output format). The rules, in order:

Quality (exactly one per example):
- `correct`       the task's match rule holds (exact match for qa / extract, the label for
                  classify, ROUGE-L >= 0.5 for generate, the same calls for tool_call) and none of the flags below except
                  `too_long` is raised; a match that has such a flag becomes `partly_right`.
- `partly_right`  some overlap (token or field F1 > 0 for qa / extract / tool_call, ROUGE-L >= 0.2
                  for generate), or a match with a behaviour flag.
- `wrong`         no overlap (classify: any other label).

Flags (any number):
- `too_long`      more words than 2 x the longest reference + 10.
- `repetitive`    some word 4-gram occurs at least 3 times (a generation loop).
- `never_stopped` the row says `stopped: false` (hit the token limit instead of EOS).
- `bad_format`    extract with JSON targets: the prediction is not one JSON object;
                  classify: the label is not one of the gold labels of the test set;
                  tool_call: a `<tool_call>` block that is not a JSON call, or never closed.
- `unsupported`   the hallucination proxy: more than half of the prediction's content words
                  (lower-cased, punctuation split off, stop words dropped) appear in neither
                  the references, the retrieved context nor the question. Not used for
                  classify, where a wrong label is already `wrong`, nor tool_call.
"""

from __future__ import annotations

import collections
import string

CATEGORIES = ("correct", "partly_right", "wrong", "too_long", "repetitive", "never_stopped",
              "bad_format", "unsupported")

REPEAT_NGRAM = 4          # words per n-gram in the loop check
REPEAT_MIN_COUNT = 3      # occurrences of one n-gram that make a loop
UNSUPPORTED_SHARE = 0.5   # share of unsupported content words above which a prediction is flagged
TOO_LONG_FACTOR = 2       # too_long: words > TOO_LONG_FACTOR x reference words + TOO_LONG_SLACK
TOO_LONG_SLACK = 10
GENERATE_CORRECT_ROUGE = 0.5
GENERATE_PARTLY_ROUGE = 0.2

# A small English stop-word list: function words carry no claim, so they never count as
# hallucinated. Kept in the code (not nltk's download) so results never depend on the network.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each either else etc even ever
every few for from further had has have having he her here hers herself him himself his how i if
in into is it its itself just least less let like may me might more most much must my myself
neither no nor not now of off often on once one only or other our ours ourselves out over own per
rather same shall she should so some such than that the their theirs them themselves then there
these they this those though through thus to too under until up upon us very via was we were what
when where whether which while who whom whose why will with within without would yes yet you your
yours yourself yourselves s t d ll m re ve
""".split())

_PUNCT_TO_SPACE = str.maketrans({ch: " " for ch in string.punctuation})
_PUNCT_DROP = str.maketrans("", "", string.punctuation)


def content_words(text: str) -> list[str]:
    """Lower-cased words with ASCII punctuation split off ("os.path.join()" -> os, path, join)."""
    return [w for w in text.lower().translate(_PUNCT_TO_SPACE).split() if w not in STOPWORDS]


def support_vocabulary(texts: list[str]) -> set[str]:
    """Words a prediction may use without being flagged.

    Both ways of treating punctuation are added (split off, and dropped as SQuAD does) so that
    "don't" in a source supports "dont" and "U.S." supports "us".
    """
    vocab: set[str] = set()
    for text in texts:
        lowered = text.lower()
        vocab.update(lowered.translate(_PUNCT_TO_SPACE).split())
        vocab.update(lowered.translate(_PUNCT_DROP).split())
    return vocab


def unsupported_share(prediction: str, sources: list[str]) -> float:
    """Share of the prediction's content words found in none of the sources (0 if it has none)."""
    words = content_words(prediction)
    if not words:
        return 0.0
    vocab = support_vocabulary(sources)
    return sum(w not in vocab for w in words) / len(words)


def is_repetitive(text: str) -> bool:
    """True when some word n-gram (lower-cased, white-space words) repeats REPEAT_MIN_COUNT times."""
    words = text.lower().split()
    grams = collections.Counter(tuple(words[i:i + REPEAT_NGRAM])
                                for i in range(len(words) - REPEAT_NGRAM + 1))
    return any(count >= REPEAT_MIN_COUNT for count in grams.values())


def is_too_long(prediction_words: int, reference_words: int) -> bool:
    """More than twice the reference plus some slack (short answers may add a few words)."""
    return prediction_words > TOO_LONG_FACTOR * reference_words + TOO_LONG_SLACK


def categorize(*, match: bool, partial: bool, flags: dict[str, bool]) -> list[str]:
    """Categories of one example, in CATEGORIES order.

    Args:
        match: the task's match rule holds (exact match, right label, high ROUGE-L).
        partial: some overlap with the reference.
        flags: too_long / repetitive / never_stopped / bad_format / unsupported -> raised?
    """
    raised = {name for name, on in flags.items() if on}
    # A right answer that loops, runs to the token limit, breaks the format or adds unsupported
    # claims is not something a user can ship, so it is only partly right.
    blocking = raised - {"too_long"}
    if match and not blocking:
        quality = "correct"
    elif match or partial:
        quality = "partly_right"
    else:
        quality = "wrong"
    return [c for c in CATEGORIES if c == quality or c in raised]


def count_categories(per_example: list[dict]) -> dict[str, int]:
    """How many examples fall in each category (every category listed, zeros included)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for example in per_example:
        for category in example["categories"]:
            counts[category] += 1
    return counts
