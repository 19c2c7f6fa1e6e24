"""SQuAD Exact Match and F1, as the official evaluation scripts define them (v1.1 and v2.0).

Both scripts normalize an answer the same way: lower case, drop every ``string.punctuation`` character, drop
the articles a, an, the as whole words, then collapse whitespace. EM is 1 when the normalized prediction
equals a normalized gold answer; F1 is the harmonic mean of token precision and recall over the
whitespace-split normalized texts (tokens counted with multiplicity); each question takes the maximum over its
gold answers. Scores are percentages, averaged over the questions.

The two versions differ in three rules, each kept here as its script has it:

- v1.1 (``evaluate-v1.1.py``): every gold answer counts as given; F1 is 0 whenever no token is shared, so an
  empty prediction scores F1 0 even against an empty gold answer (EM compares normalized strings: 1 there).
- v2.0 (``evaluate-v2.0.py``): gold answers that normalize to "" are dropped, and a question left with none
  is unanswerable, whose only correct answer is "" (EM and F1 1 for an empty prediction, else 0); F1 is 1
  when both token lists are empty and 0 when exactly one is. It also reports the answerable questions
  (``has_ans_*``: those with any gold answer before the drop) and the unanswerable ones (``no_ans_*``)
  apart. With its default no-answer threshold (no ``na_prob`` file) the script's totals are these.

A question with no prediction scores 0 and counts, as in the v1.1 script (v2.0's script cannot score such a
file). This module needs nothing beyond the standard library.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: the official scripts' ``normalize_answer``."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
    """1 when the normalized texts are equal, else 0 (both versions)."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version: int = 2) -> float:
    """Token F1 of one prediction against one gold answer, by the rules of SQuAD ``version`` (1 or 2)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == 2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str], version: int) -> list[str]:
    """The answers a prediction is compared with: v2.0 drops those that normalize to "" and uses [""] if none
    is left; v1.1 keeps them all (and needs at least one)."""
    if version == 1:
        if not answers:
            raise ValueError("SQuAD v1.1 scores questions with at least one gold answer")
        return list(answers)
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def score_question(prediction: str, answers: Sequence[str], version: int) -> tuple[int, float]:
    """``(exact match, F1)`` of one question, each the maximum over its gold answers (0/1 and [0, 1])."""
    golds = gold_answers(answers, version)
    return max(exact_match(prediction, g) for g in golds), max(f1(prediction, g, version) for g in golds)


def squad_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], version: int
) -> dict[str, float]:
    """EM and F1 in percent over ``references`` (question id -> gold answer texts; [] is unanswerable).

    Returns ``exact_match`` and ``f1``; for ``version`` 2 also ``has_ans_exact_match``, ``has_ans_f1``,
    ``no_ans_exact_match`` and ``no_ans_f1`` (each 0 when its group is empty; `group_sizes` gives the sizes).
    """
    if version not in (1, 2):
        raise ValueError(f"unknown SQuAD version {version!r}; choose 1 or 2")
    exact, f1s, has_answer = {}, {}, {}
    for qid, answers in references.items():
        has_answer[qid] = bool(answers)
        if qid in predictions:
            exact[qid], f1s[qid] = score_question(predictions[qid], answers, version)
        else:
            exact[qid], f1s[qid] = 0, 0.0

    def mean(values, ids) -> float:
        return 100.0 * sum(values[i] for i in ids) / len(ids) if ids else 0.0

    every = list(references)
    metrics = {"exact_match": mean(exact, every), "f1": mean(f1s, every)}
    if version == 2:
        for prefix, wanted in (("has_ans", True), ("no_ans", False)):
            ids = [i for i in every if has_answer[i] == wanted]
            metrics[f"{prefix}_exact_match"] = mean(exact, ids)
            metrics[f"{prefix}_f1"] = mean(f1s, ids)
    return metrics


def group_sizes(references: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """``has_ans_total`` and ``no_ans_total``: answerable and unanswerable questions, as v2.0 counts them."""
    has = sum(bool(a) for a in references.values())
    return {"has_ans_total": has, "no_ans_total": len(references) - has}
