"""Continual metrics from the accuracy matrix, through the local `evaluate` module (no network)."""

import evaluate
import pytest

from peft_ext.trainers.metrics import METRIC_SCRIPT, compute_continual_metrics, load_metric


# Hand-made 3-task matrix (row i: after training task i). By hand:
#   last       = (0.6 + 0.65 + 0.5) / 3                      = 0.583333...
#   avg        = (0.9 + (0.8 + 0.7) / 2 + 1.75 / 3) / 3      = (0.9 + 0.75 + 0.583333) / 3 = 0.744444...
#   bwt        = ((0.6 - 0.9) + (0.65 - 0.7)) / 2            = -0.175
#   forgetting = ((max(0.9, 0.8) - 0.6) + (0.7 - 0.65)) / 2  = (0.3 + 0.05) / 2 = 0.175
MATRIX = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.65, 0.5]]


def test_hand_made_matrix():
    scores = compute_continual_metrics(MATRIX)
    assert scores["last"] == pytest.approx(1.75 / 3)
    assert scores["avg"] == pytest.approx((0.9 + 0.75 + 1.75 / 3) / 3)
    assert scores["bwt"] == pytest.approx(-0.175)
    assert scores["forgetting"] == pytest.approx(0.175)
    assert scores["transfer"] is None and scores["fwt"] is None  # upper triangle not measured


def test_forgetting_uses_best_earlier_score_not_the_diagonal():
    # Task 0 improves after task 1 (0.5 -> 0.9), then drops to 0.7: BWT sees +0.2, forgetting sees 0.9 - 0.7.
    scores = compute_continual_metrics([[0.5, None, None], [0.9, 1.0, None], [0.7, 1.0, 1.0]])
    assert scores["bwt"] == pytest.approx(((0.7 - 0.5) + (1.0 - 1.0)) / 2)
    assert scores["forgetting"] == pytest.approx(((0.9 - 0.7) + 0.0) / 2)


def test_transfer_and_fwt_from_the_upper_triangle():
    full = [[0.9, 0.4, 0.3], [0.8, 0.7, 0.5], [0.6, 0.65, 0.5]]
    scores = compute_continual_metrics(full, zero_shot=[0.1, 0.3, 0.2])
    assert scores["transfer"] == pytest.approx((0.4 + 0.5) / 2)
    assert scores["fwt"] == pytest.approx(((0.4 - 0.3) + (0.5 - 0.2)) / 2)


def test_single_task():
    scores = compute_continual_metrics([[0.8]])
    assert scores == {"avg": 0.8, "last": 0.8, "bwt": 0.0, "forgetting": 0.0, "transfer": None, "fwt": None}


def test_loaded_through_evaluate_from_a_local_file():
    metric = load_metric()
    assert isinstance(metric, evaluate.EvaluationModule)
    # add_batch / compute: the evaluate protocol, one matrix row per item.
    for row in MATRIX:
        metric.add(accuracy_row=row)
    assert metric.compute()["bwt"] == pytest.approx(-0.175)
    assert METRIC_SCRIPT.is_file()


@pytest.mark.parametrize(
    "matrix, message",
    [
        ([], "empty"),
        ([[0.9, None], [0.8]], "square"),
        ([[None, None], [0.8, 0.7]], "lacks entries"),
    ],
)
def test_bad_matrices_raise(matrix, message):
    with pytest.raises(ValueError, match=message):
        compute_continual_metrics(matrix)
