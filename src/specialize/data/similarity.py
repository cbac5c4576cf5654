"""Exact and near-duplicate text matching, fast enough for ~50k rows on a laptop.

Two texts are *exact* duplicates when they are equal after `normalise` (case and whitespace
folded). They are *near* duplicates when the Jaccard similarity of their word 3-shingles is at
least a threshold (0.9 by default: the same text with a word or two changed). Symbols count as
words, so "Same as a + b." and "Same as a >= b." are different texts.

Comparing every pair is O(n²) — 1.25 billion pairs for 50k rows — so `similar_pairs` uses
prefix filtering (Bayardo et al., "Scaling up all pairs similarity search", WWW 2007): sort
each shingle set rarest-shingle-first; two sets with Jaccard ≥ t must then share a shingle
among the first `|x| − ⌈t·|x|⌉ + 1` of each. Only sets sharing such a prefix shingle are
compared, and the result is exact — no false negatives, unlike MinHash, and no randomness.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

SHINGLE_WORDS = 3
# Words, and runs of symbols that carry meaning in code and maths ("a + b" is not "a >= b");
# the punctuation that only ends or separates sentences is left out ("What is X?" is "what is x").
_TOKEN = re.compile(r"\w+|[^\w\s.,;:!?'\"“”‘’()\[\]{}]+")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case-folded text with every run of whitespace made one space (the key for exact duplicates)."""
    return _SPACE.sub(" ", text.casefold()).strip()


def shingles(text: str, n: int = SHINGLE_WORDS) -> frozenset[int]:
    """Hashes of the word n-grams of `text`, ignoring case and sentence punctuation.

    A text of fewer than `n` words is one shingle of all its words, so short prompts still
    compare (equal or not) instead of having nothing to compare.
    """
    words = _TOKEN.findall(text.casefold())
    if len(words) < n:
        return frozenset([hash(tuple(words))]) if words else frozenset()
    # hash() of a tuple of str is stable within one process, which is all a lint run needs.
    return frozenset(hash(tuple(words[i: i + n])) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a and not b:
        return 1.0
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


def similar_pairs(queries: Sequence[frozenset[int]], corpus: Sequence[frozenset[int]] | None = None,
                  threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """For each query, its most similar corpus set with Jaccard ≥ `threshold`.

    Args:
        queries: shingle sets to look up.
        corpus: shingle sets to search; None means the queries themselves, and then each
            query is only matched against *earlier* ones (so row j is reported as a near
            duplicate of the first similar row i < j, never the other way round).
        threshold: Jaccard similarity in (0, 1].

    Returns:
        (query index, corpus index, similarity), ordered by query index; ties go to the
        lowest corpus index. Empty sets match nothing.
    """
    self_join = corpus is None
    corpus = queries if corpus is None else corpus
    counts = Counter()
    for group in (queries,) if self_join else (queries, corpus):
        for s in group:
            counts.update(s)

    def prefix(s: frozenset[int]) -> list[int]:
        # Rarest first, ties by value: one total order shared by every set (stable sort of a sort).
        # 1e-9 keeps 0.9 * 10 = 9.000000000000002 from rounding up to 10 (a too-short prefix).
        keep = len(s) - math.ceil(threshold * len(s) - 1e-9) + 1
        return sorted(sorted(s), key=counts.__getitem__)[:keep]

    # Identical sets are common (rows that differ only in punctuation); indexing one of each
    # keeps a bucket of thousands of equal rows from turning into millions of comparisons.
    first_with: dict[frozenset[int], int] = {}
    index: dict[int, list[int]] = defaultdict(list)
    prefixes: dict[int, list[int]] = {}
    for j, s in enumerate(corpus):
        if s and s not in first_with:
            first_with[s] = j
            prefixes[j] = prefix(s)
            for token in prefixes[j]:
                index[token].append(j)

    pairs = []
    for i, q in enumerate(queries):
        if not q:
            continue
        twin = first_with.get(q)
        if twin is not None and (not self_join or twin < i):
            pairs.append((i, twin, 1.0))
            continue
        best: tuple[int, float] | None = None
        probe = prefixes[i] if self_join else prefix(q)
        for j in sorted({j for token in probe for j in index.get(token, ())}):
            if self_join and j >= i:
                break
            c = corpus[j]
            if not threshold * len(q) - 1e-9 <= len(c) <= len(q) / threshold + 1e-9:
                continue  # sizes alone rule out Jaccard ≥ threshold
            similarity = jaccard(q, c)
            if similarity >= threshold and (best is None or similarity > best[1]):
                best = (j, similarity)
        if best is not None:
            pairs.append((i, best[0], best[1]))
    return pairs


def duplicates(keys: Sequence[str], texts: Sequence[str],
               threshold: float) -> tuple[list[tuple[int, int]], list[tuple[int, int, float]]]:
    """Rows that repeat an earlier row.

    Args:
        keys: what makes two rows exact duplicates, compared after `normalise`.
        texts: what near duplicates are compared on (word shingles).

    Returns:
        (exact, near): (row, first earlier row with an equal key), and (row, most similar
        earlier row, similarity) among the rows that are not exact duplicates.
    """
    first: dict[str, int] = {}
    exact, distinct = [], []
    for i, key in enumerate(map(normalise, keys)):
        if key in first:
            exact.append((i, first[key]))
        else:
            first[key] = i
            distinct.append(i)
    pairs = similar_pairs([shingles(texts[i]) for i in distinct], threshold=threshold)
    return exact, [(distinct[q], distinct[c], similarity) for q, c, similarity in pairs]


def matches(queries: Sequence[str], corpus: Sequence[str], threshold: float) -> list[tuple[int, int, float | None]]:
    """For each query text that occurs in the corpus: (query, corpus row, None) when equal after
    `normalise`, else (query, corpus row, similarity) when its shingles are similar enough.
    Empty texts match nothing (two rows with no prompt do not share one)."""
    first: dict[str, int] = {}
    for j, text in enumerate(corpus):
        first.setdefault(normalise(text), j)
    first.pop("", None)
    near = {q: (c, s) for q, c, s in similar_pairs([shingles(t) for t in queries], [shingles(t) for t in corpus],
                                                   threshold)}
    found = []
    for i, text in enumerate(queries):
        if normalise(text) in first:
            found.append((i, first[normalise(text)], None))
        elif i in near:
            found.append((i, *near[i]))
    return found
