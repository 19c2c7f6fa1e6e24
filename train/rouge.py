"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures, through Google's ``rouge-score`` package.

`rouge_scores` runs ``rouge_score.rouge_scorer.RougeScorer`` with Porter stemming (as the BART and RoCoFT
papers report ROUGE) on each (reference, generation) pair and averages each F-measure over the pairs, as
fractions in [0, 1]. ROUGE-Lsum is the summary-level LCS over sentences, which the scorer reads as lines:
`sentence_lines` keeps a text's own line breaks (CNN/DailyMail's highlights have one per sentence) and splits
a text that has none after each ``.``, ``!`` or ``?`` followed by whitespace. (HF's example scripts split
with nltk's punkt model instead, a download; ROUGE-1, ROUGE-2 and ROUGE-L ignore line breaks.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_lines(text: str) -> str:
    """``text`` with one sentence per line: its own non-empty lines, or, without any, split after . ! ?"""
    text = text.strip()
    lines = text.splitlines() if "\n" in text else _SENTENCE_END.split(text)
    return "\n".join(line.strip() for line in lines if line.strip())


def scorer():
    """The ``rouge_score`` scorer of `ROUGE_TYPES`, with stemming."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(references: Sequence[str], generations: Sequence[str]) -> dict[str, float]:
    """The mean F-measure of each of `ROUGE_TYPES` over the pairs; a ValueError for unequal or empty inputs."""
    if len(references) != len(generations) or not references:
        raise ValueError(
            f"need as many generations as references, at least one; got {len(generations)} and {len(references)}"
        )
    score = scorer().score
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for reference, generation in zip(references, generations):
        for name, value in score(sentence_lines(reference), sentence_lines(generation)).items():
            totals[name] += value.fmeasure
    return {name: total / len(references) for name, total in totals.items()}
