"""SQuAD EM and F1 against hand-computed cases, including the official scripts' edge cases.

Every expected value below is worked out by hand from the rules of evaluate-v1.1.py and evaluate-v2.0.py
(normalize: lower case, drop string.punctuation, drop the articles a/an/the as words, collapse whitespace;
F1 over the normalized tokens with multiplicity; maximum over the gold answers), not by running the code.
"""

from __future__ import annotations

import pytest

from train.squad_metric import exact_match, f1, group_sizes, normalize_answer, score_question, squad_scores


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat's hat!", "cats hat"),  # punctuation goes first, then the article, then the spaces
        ("An apple, a pear and THE plum.", "apple pear and plum"),
        ("theater anthem", "theater anthem"),  # articles only as whole words
        ("A.B.C.", "abc"),  # "a" is not a word once the dots are gone
        ("the-end", "theend"),  # the hyphen goes before the article test: no article left
        ("1914\u20131918", "1914\u20131918"),  # an en dash is not in string.punctuation
        ("l'\u00e9t\u00e9", "l\u00e9t\u00e9"),
        ("  \t\n", ""),
        ("the", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_compares_normalized_texts():
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1
    assert exact_match("Denmark, Iceland, and Norway", "Denmark, Iceland and Norway") == 1  # commas vanish
    assert exact_match("Eiffel", "Eiffel Tower") == 0


def test_f1_counts_tokens_with_multiplicity():
    # "in 10th and 11th centuries" (5 tokens) against "10th and 11th centuries" (4): 4 shared, P 4/5, R 1.
    assert f1("in the 10th and 11th centuries", "10th and 11th centuries") == pytest.approx(8 / 9)
    # x x y against x y y: one x and one y shared, P = R = 2/3.
    assert f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1("France", "Italy") == 0.0
    assert f1("The France!", "france") == 1.0


def test_empty_answers_follow_each_script():
    # v1.1: F1 is 0 whenever no token is shared, so even two empty answers score 0; EM compares strings.
    assert f1("", "", version=1) == 0.0
    assert exact_match("", "the") == 1  # both normalize to ""
    # v2.0: two empty token lists agree (F1 1); exactly one empty scores 0.
    assert f1("", "", version=2) == 1.0
    assert f1("", "France", version=2) == 0.0
    assert f1("France", "", version=2) == 0.0


def test_gold_answers_that_normalize_to_nothing():
    # v2.0 drops gold answers that normalize to "" ("the", "a"); with none left, "" is the only right answer.
    assert score_question("", ["the", "a"], version=2) == (1, 1.0)
    assert score_question("the", ["the"], version=2) == (1, 1.0)  # "the" normalizes to "" too
    assert score_question("France", ["the"], version=2) == (0, 0.0)
    # v1.1 keeps them: EM matches the normalized "", F1 is 0.
    assert score_question("", ["the"], version=1) == (1, 0.0)


def test_several_gold_answers_take_the_best():
    gold = ["10th and 11th centuries", "in the 10th and 11th centuries"]
    assert score_question("in the 10th and 11th centuries", gold, version=1) == (1, 1.0)
    # "10th century" shares one token with each: 2PR/(P+R) = 1/3 against the first (P 1/2, R 1/4),
    # 2/7 against the second (P 1/2, R 1/5); the maximum is 1/3.
    em, score = score_question("the 10th century", gold, version=2)
    assert em == 0 and score == pytest.approx(1 / 3)


def test_unanswerable_questions_on_v2():
    assert score_question("", [], version=2) == (1, 1.0)
    assert score_question("Rollo", [], version=2) == (0, 0.0)
    with pytest.raises(ValueError, match="at least one gold answer"):
        score_question("", [], version=1)


def test_totals_in_percent_with_the_has_ans_and_no_ans_groups():
    references = {
        "q1": ["France"],
        "q2": ["10th and 11th centuries", "in the 10th and 11th centuries"],
        "q3": [],
        "q4": [],
    }
    predictions = {"q1": "france.", "q2": "the 10th century", "q3": "", "q4": "Rollo"}
    # per question (EM, F1): q1 (1, 1), q2 (0, 1/3), q3 (1, 1), q4 (0, 0)
    assert squad_scores(predictions, references, version=2) == pytest.approx(
        {
            "exact_match": 50.0,
            "f1": 100 * (1 + 1 / 3 + 1) / 4,
            "has_ans_exact_match": 50.0,
            "has_ans_f1": 100 * (1 + 1 / 3) / 2,
            "no_ans_exact_match": 50.0,
            "no_ans_f1": 50.0,
        }
    )
    assert group_sizes(references) == {"has_ans_total": 2, "no_ans_total": 2}
    answerable = {k: references[k] for k in ("q1", "q2")}
    assert squad_scores(predictions, answerable, version=1) == pytest.approx(
        {"exact_match": 50.0, "f1": 100 * (1 + 1 / 3) / 2}
    )


def test_a_question_with_answers_that_all_normalize_away_still_counts_as_answerable():
    # evaluate-v2.0.py: HasAns is bool(qa["answers"]); the gold texts are filtered only for scoring.
    scores = squad_scores({"q": ""}, {"q": ["the"]}, version=2)
    assert scores["has_ans_exact_match"] == 100.0 and scores["no_ans_exact_match"] == 0.0
    assert group_sizes({"q": ["the"]}) == {"has_ans_total": 1, "no_ans_total": 0}


def test_missing_predictions_score_zero():
    references = {"q1": ["France"], "q2": ["Norway"]}
    assert squad_scores({"q1": "France"}, references, version=1) == {"exact_match": 50.0, "f1": 50.0}
