"""Exact match and ROUGE-L of generated answers, as an ``evaluate`` module loaded from this local file.

Self-contained on purpose, like ``continual_metrics.py``: ``evaluate.load(path_to_this_file)`` copies the file into
its module cache and imports it on its own, so it may import nothing from peft_ext. Use it through
:func:`peft_ext.trainers.generation.load_generation_metric`.
"""

import re
import string

import datasets
import evaluate


NORMALIZATIONS = ("squad", "strip")

_DESCRIPTION = """
Exact match and ROUGE-L between generated answers (predictions) and reference answers, one reference per prediction,
both averaged over the examples.

Normalization (`normalization="squad"`, the default; SQuAD v1.1's official `normalize_answer`): lower case, remove
ASCII punctuation (`string.punctuation`), remove the articles "a", "an", "the" (whole words), collapse runs of
whitespace to one space and strip the ends. So "The Eiffel Tower." and "eiffel  tower" match. With
`normalization="strip"` only leading and trailing whitespace is removed (case and punctuation count).

    exact_match = mean over examples of [normalize(prediction) == normalize(reference)]
    rouge_l     = mean over examples of the ROUGE-L F-measure (beta = 1) of the whitespace tokens of the normalized
                  texts: LCS = longest common subsequence of the two token lists, P = LCS / len(prediction tokens),
                  R = LCS / len(reference tokens), F = 2PR / (P + R) (0 when LCS = 0)

ROUGE-L here is the sentence-level F-measure of Lin (2004), as `rouge-score`'s "rougeL" computes it (no stemming).
Tokens differ from `rouge-score`'s only in what normalization leaves: `rouge-score` also turns every non-[a-z0-9]
character into a separator, this module splits on whitespace alone (non-ASCII letters stay tokens). When both
normalized texts are empty (e.g. "The" against "a") rouge_l is 1.0, consistent with exact match (`rouge-score` gives
0.0 there); when one of them is empty it is 0.0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated answers.
    references (`list[str]`): reference answers, one per prediction.
    normalization (`str`, *optional*): "squad" (default) or "strip", see the description.
Returns:
    dict with `exact_match` and `rouge_l`, floats in [0, 1].
Examples:
    >>> metric = evaluate.load("trainers/generation_metrics.py")
    >>> metric.compute(predictions=["The cat sat."], references=["cat sat on mat"])
    {'exact_match': 0.0, 'rouge_l': 0.6666666666666666}
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text, normalization="squad"):
    """``text`` as compared: SQuAD's normalization (lower case, no punctuation or articles, single spaces), or
    only stripped."""
    if normalization == "strip":
        return str(text).strip()
    if normalization != "squad":
        raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}.")
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def lcs_length(a, b):
    """Length of the longest common subsequence of the sequences ``a`` and ``b`` (dynamic programming, one row)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l_f(prediction_tokens, reference_tokens):
    """ROUGE-L F-measure (beta = 1) of two token lists; 1.0 when both are empty, 0.0 when one is."""
    if not prediction_tokens and not reference_tokens:
        return 1.0
    lcs = lcs_length(prediction_tokens, reference_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction_tokens), lcs / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def generation_scores(predictions, references, normalization="squad"):
    """``exact_match`` and ``rouge_l`` of the module description, averaged over the examples."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not predictions:
        raise ValueError("No predictions to score.")
    exact = rouge = 0.0
    for prediction, reference in zip(predictions, references):
        p, r = normalize_answer(prediction, normalization), normalize_answer(reference, normalization)
        exact += float(p == r)
        rouge += rouge_l_f(p.split(), r.split())
    return {"exact_match": exact / len(predictions), "rouge_l": rouge / len(predictions)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenerationMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, normalization="squad"):
        return generation_scores(predictions, references, normalization=normalization)
