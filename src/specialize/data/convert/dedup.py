"""Exact and near-duplicate removal for converted rows (the first occurrence is kept).

Exact: question and answer equal after normalising Unicode form (NFKC), case, punctuation
and whitespace, so "How do I pay?" and "how do I pay" with the same answer are one pair.
Conversations are exact duplicates when every turn is.

Near: the same measure `specialize lint` reports, so a converted file passes lint's check —
Jaccard similarity of the word 3-shingles of question + answer at or above `threshold`,
found with exact prefix filtering in `specialize.data.similarity` (no quadratic all-pairs
loop, fine for 50k rows). Only question/answer rows are compared; two long conversations
that differ in one turn are different examples.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from specialize.data.similarity import shingles, similar_pairs

_NOT_WORD = re.compile(r"[^\w\s]+")


def normalise(text: str) -> str:
    """Casefolded NFKC text without punctuation, whitespace collapsed (the exact-duplicate key)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NOT_WORD.sub(" ", text).replace("_", " ").split())


def _exact_key(row: dict) -> tuple:
    if "messages" in row:
        return tuple((m.get("role"), normalise(str(m.get("content") or ""))) for m in row["messages"])
    return normalise(row["question"]), normalise(row["answer"])


def dedup_rows(rows: list[dict], threshold: float) -> tuple[list[dict], Counter]:
    """Rows without exact and near duplicates (order kept), and the counts removed by reason."""
    dropped: Counter = Counter()
    seen: set[tuple] = set()
    unique: list[dict] = []
    for row in rows:
        key = _exact_key(row)
        if key in seen:
            dropped["exact duplicate"] += 1
        else:
            seen.add(key)
            unique.append(row)
    positions = [i for i, row in enumerate(unique) if "messages" not in row]
    sets = [shingles(unique[i]["question"] + "\n" + unique[i]["answer"]) for i in positions]
    # similar_pairs on one list matches each row only against earlier rows: the later one goes.
    near = {positions[later] for later, _, _ in similar_pairs(sets, threshold=threshold)}
    if near:
        dropped["near duplicate"] += len(near)
    return [row for i, row in enumerate(unique) if i not in near], dropped
