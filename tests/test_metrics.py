"""Continual metrics from the accuracy matrix, through the local `evaluate` module (no network)."""

import evaluate
import pytest

from peft_ext.trainers.continual_metrics import continual_scores
from peft_ext.trainers.metrics import METRIC_SCRIPT, compute_continual_metrics, load_metric


# Hand-made 3-task matrix (row i: after training task i), lower triangle only. By hand:
#   last       = (0.6 + 0.65 + 0.5) / 3                      = 0.583333...
#   avg        = (0.9 + (0.8 + 0.7) / 2 + 1.75 / 3) / 3      = (0.9 + 0.75 + 0.583333) / 3 = 0.744444...
#   bwt        = ((0.6 - 0.9) + (0.65 - 0.7)) / 2            = -0.175
#   forgetting = ((max(0.9, 0.8) - 0.6) + (0.7 - 0.65)) / 2  = (0.3 + 0.05) / 2 = 0.175
MATRIX = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.65, 0.5]]

# The same run with the tasks not trained yet evaluated too (a01 = 0.4, a02 = 0.1, a12 = 0.5). By hand:
#   transfer = mean_{j>=1} mean_{i<j} a_ij = (a01 + (a02 + a12) / 2) / 2 = (0.4 + 0.3) / 2      = 0.35
#              (the rejected mean_{j>=1} a_{j-1,j} would give (0.4 + 0.5) / 2 = 0.45)
#   avg_all  = (0.9 + 0.4 + 0.1  +  0.8 + 0.7 + 0.5  +  0.6 + 0.65 + 0.5) / 9 = (1.4 + 2.0 + 1.75) / 9 = 5.15 / 9
#   fwt      = ((a01 - zs1) + ((a02 + a12) / 2 - zs2)) / 2 = ((0.4 - 0.3) + (0.3 - 0.2)) / 2       = 0.1
#              (= transfer - (zs1 + zs2) / 2 = 0.35 - 0.25; zs0 plays no part)
FULL_3 = [[0.9, 0.4, 0.1], [0.8, 0.7, 0.5], [0.6, 0.65, 0.5]]
ZERO_SHOT_3 = [0.1, 0.3, 0.2]

# A 4-task matrix, complete; task 1 improves after task 2 (0.9 -> 0.95), so forgetting != -bwt. By hand:
#   last       = (0.5 + 0.85 + 0.6 + 0.9) / 4                                     = 2.85 / 4 = 0.7125
#   avg        = (0.8 + (0.7 + 0.9) / 2 + (0.6 + 0.95 + 0.7) / 3 + 2.85 / 4) / 4
#              = (0.8 + 0.8 + 0.75 + 0.7125) / 4                                  = 3.0625 / 4 = 0.765625
#   bwt        = ((0.5 - 0.8) + (0.85 - 0.9) + (0.6 - 0.7)) / 3                   = -0.45 / 3 = -0.15
#   forgetting = ((max(0.8, 0.7, 0.6) - 0.5) + (max(0.9, 0.95) - 0.85) + (0.7 - 0.6)) / 3
#              = (0.3 + 0.1 + 0.1) / 3                                            = 0.5 / 3
#   transfer   = (a01 + (a02 + a12) / 2 + (a03 + a13 + a23) / 3) / 3
#              = (0.3 + (0.2 + 0.4) / 2 + (0.1 + 0.3 + 0.8) / 3) / 3 = (0.3 + 0.3 + 0.4) / 3 = 1.0 / 3
#              (the rejected mean_{j>=1} a_{j-1,j} would give (0.3 + 0.4 + 0.8) / 3 = 0.5)
#   avg_all    = (1.4 + 2.3 + 3.05 + 2.85) / 16 (row sums)                        = 9.6 / 16 = 0.6
#   fwt        = ((0.3 - 0.2) + (0.3 - 0.3) + (0.4 - 0.1)) / 3                    = 0.4 / 3
#              (= transfer - (0.2 + 0.3 + 0.1) / 3 = 1/3 - 0.2)
FULL_4 = [
    [0.8, 0.3, 0.2, 0.1],
    [0.7, 0.9, 0.4, 0.3],
    [0.6, 0.95, 0.7, 0.8],
    [0.5, 0.85, 0.6, 0.9],
]
ZERO_SHOT_4 = [0.25, 0.2, 0.3, 0.1]
EXPECTED_4 = {
    "avg": 3.0625 / 4,
    "last": 2.85 / 4,
    "bwt": -0.15,
    "forgetting": 0.5 / 3,
    "transfer": 1.0 / 3,
    "avg_all": 0.6,
    "fwt": 0.4 / 3,
}


def lower_triangle(matrix):
    return [[v if j <= i else None for j, v in enumerate(row)] for i, row in enumerate(matrix)]


def test_hand_made_matrix():
    scores = compute_continual_metrics(MATRIX)
    assert scores["last"] == pytest.approx(1.75 / 3)
    assert scores["avg"] == pytest.approx((0.9 + 0.75 + 1.75 / 3) / 3)
    assert scores["bwt"] == pytest.approx(-0.175)
    assert scores["forgetting"] == pytest.approx(0.175)
    # upper triangle not measured: nothing about tasks before their training
    assert scores["transfer"] is None and scores["avg_all"] is None and scores["fwt"] is None


def test_forgetting_uses_best_earlier_score_not_the_diagonal():
    # Task 0 improves after task 1 (0.5 -> 0.9), then drops to 0.7: BWT sees +0.2, forgetting sees 0.9 - 0.7.
    scores = compute_continual_metrics([[0.5, None, None], [0.9, 1.0, None], [0.7, 1.0, 1.0]])
    assert scores["bwt"] == pytest.approx(((0.7 - 0.5) + (1.0 - 1.0)) / 2)
    assert scores["forgetting"] == pytest.approx(((0.9 - 0.7) + 0.0) / 2)


def test_full_3x3_matrix():
    scores = compute_continual_metrics(FULL_3, zero_shot=ZERO_SHOT_3)
    assert scores["transfer"] == pytest.approx(0.35)
    assert scores["avg_all"] == pytest.approx(5.15 / 9)
    assert scores["fwt"] == pytest.approx(0.1)
    # the cells above the diagonal do not move the lower-triangle metrics
    lower = compute_continual_metrics(MATRIX)
    for key in ("avg", "last", "bwt", "forgetting"):
        assert scores[key] == pytest.approx(lower[key])


def test_full_4x4_matrix():
    scores = compute_continual_metrics(FULL_4, zero_shot=ZERO_SHOT_4)
    assert set(scores) == set(EXPECTED_4)
    for key, value in EXPECTED_4.items():
        assert scores[key] == pytest.approx(value), key
    assert scores["fwt"] == pytest.approx(scores["transfer"] - (0.2 + 0.3 + 0.1) / 3)


def test_zero_shot_only_feeds_fwt():
    with_zs = compute_continual_metrics(FULL_4, zero_shot=ZERO_SHOT_4)
    without = compute_continual_metrics(FULL_4)
    assert without["fwt"] is None
    assert {k: v for k, v in with_zs.items() if k != "fwt"} == pytest.approx(
        {k: v for k, v in without.items() if k != "fwt"}
    )


@pytest.mark.parametrize("hole", [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
def test_partial_upper_triangle_gives_no_transfer(hole):
    # One missing cell above the diagonal would change which cells a task's mean covers: no number at all.
    matrix = [list(row) for row in FULL_4]
    matrix[hole[0]][hole[1]] = None
    scores = compute_continual_metrics(matrix, zero_shot=ZERO_SHOT_4)
    assert scores["transfer"] is None and scores["avg_all"] is None and scores["fwt"] is None
    for key in ("avg", "last", "bwt", "forgetting"):
        assert scores[key] == pytest.approx(EXPECTED_4[key])


def test_only_the_first_superdiagonal_is_not_enough():
    # a_{j-1,j} alone (what the rejected definition read) leaves the earlier steps of tasks 2 and 3 unknown.
    matrix = lower_triangle(FULL_4)
    for j in range(1, 4):
        matrix[j - 1][j] = FULL_4[j - 1][j]
    scores = compute_continual_metrics(matrix, zero_shot=ZERO_SHOT_4)
    assert scores["transfer"] is None and scores["avg_all"] is None and scores["fwt"] is None


def test_single_task():
    scores = compute_continual_metrics([[0.8]])
    # the 1 x 1 matrix is complete (avg_all = a00) but no task is evaluated before its training (no transfer)
    assert scores == {
        "avg": 0.8,
        "last": 0.8,
        "bwt": 0.0,
        "forgetting": 0.0,
        "transfer": None,
        "avg_all": 0.8,
        "fwt": None,
    }
    assert compute_continual_metrics([[0.8]], zero_shot=[0.5])["fwt"] is None


def test_loaded_through_evaluate_from_a_local_file():
    metric = load_metric()
    assert isinstance(metric, evaluate.EvaluationModule)
    # add_batch / compute: the evaluate protocol, one matrix row per item.
    for row in MATRIX:
        metric.add(accuracy_row=row)
    assert metric.compute()["bwt"] == pytest.approx(-0.175)
    assert METRIC_SCRIPT.is_file()


def test_evaluate_module_and_plain_function_agree():
    metric = load_metric()
    metric.add_batch(accuracy_row=FULL_4)
    through_evaluate = metric.compute(zero_shot=ZERO_SHOT_4)
    assert through_evaluate == pytest.approx(EXPECTED_4)
    assert continual_scores(FULL_4, zero_shot=ZERO_SHOT_4) == pytest.approx(through_evaluate)


# ---------------------------------------------------------------------------------------------------------------
# Published MTIL figures (CLIP ViT-B/16, order I: Aircraft, Caltech101, CIFAR100, DTD, EuroSAT, Flowers, Food, MNIST,
# OxfordPet, StanfordCars, SUN397; accuracies in percent). Source: Zheng et al., "Preventing Zero-Shot Transfer
# Degradation in Continual Learning of Vision-Language Models", ICCV 2023, Table 3 ("Comparison of different methods
# on MTIL"), as recorded by the authors in github.com/Thunderbeee/ZSCL, mtil/results.ipynb (commit b96e714), whose
# README says the paper's results are listed there. CIFAR10, evaluated there but not part of MTIL, is left out.
# ---------------------------------------------------------------------------------------------------------------
MTIL_ZERO_SHOT = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]

# ZSCL's own row of Table 3: its 11 x 11 accuracy matrix (row i: after training dataset i), from the same notebook,
# rounded here to 0.1.
MTIL_ZSCL = [
    [55.1, 86.0, 66.3, 44.9, 49.2, 70.6, 88.3, 53.6, 87.4, 61.3, 65.7],
    [48.9, 94.2, 68.5, 44.7, 50.4, 67.0, 87.6, 55.2, 85.0, 61.0, 65.9],
    [47.1, 93.1, 86.2, 46.5, 50.1, 68.8, 87.7, 63.4, 87.6, 60.6, 67.4],
    [47.0, 93.8, 85.0, 76.2, 51.7, 69.9, 87.8, 65.9, 88.4, 61.2, 67.2],
    [46.1, 92.8, 84.0, 75.0, 97.8, 69.1, 87.1, 67.6, 88.0, 60.3, 67.1],
    [43.8, 92.5, 83.2, 73.5, 97.2, 96.3, 87.1, 63.3, 86.5, 58.8, 66.9],
    [44.3, 92.2, 82.9, 71.2, 96.8, 93.8, 92.2, 63.5, 87.3, 60.3, 67.9],
    [41.9, 91.9, 80.5, 67.8, 95.3, 89.5, 91.9, 99.0, 84.4, 58.4, 66.5],
    [41.6, 91.8, 81.3, 68.2, 95.7, 90.7, 92.0, 98.8, 95.3, 58.9, 66.4],
    [39.8, 91.9, 81.8, 68.9, 95.7, 91.6, 91.8, 98.8, 94.5, 85.8, 67.3],
    [40.6, 92.2, 81.3, 70.5, 94.8, 90.5, 91.9, 98.7, 93.9, 85.3, 80.2],
]


def _percent(scores):
    return {k: None if v is None else 100 * v for k, v in scores.items()}


def test_published_mtil_zero_shot_clip():
    # Zero-shot CLIP never trains, so every row of its matrix is the zero-shot row. Published: Transfer 69.4,
    # Avg 65.3, Last 65.3. By hand: Transfer = (sum of all but Aircraft) / 10 = 693.9 / 10 = 69.39;
    # Avg = Last = 718.2 / 11 = 65.29.
    zero_shot = [v / 100 for v in MTIL_ZERO_SHOT]
    scores = _percent(compute_continual_metrics([zero_shot] * 11, zero_shot=zero_shot))
    assert scores["transfer"] == pytest.approx(69.4, abs=0.1)
    assert scores["avg_all"] == pytest.approx(65.3, abs=0.1)
    assert scores["last"] == pytest.approx(65.3, abs=0.1)
    assert scores["fwt"] == pytest.approx(0.0, abs=1e-9)  # no gain over itself


def test_published_mtil_zscl():
    # Published for ZSCL: Transfer 68.1, Avg 75.4, Last 83.6. A constant matrix (above) cannot tell the rejected
    # transfer = mean_{j>=1} a_{j-1,j} from the MTIL one; this one can: the rejected formula gives 68.3 here.
    scores = _percent(compute_continual_metrics([[v / 100 for v in row] for row in MTIL_ZSCL]))
    assert scores["transfer"] == pytest.approx(68.1, abs=0.1)
    assert scores["avg_all"] == pytest.approx(75.4, abs=0.1)
    assert scores["last"] == pytest.approx(83.6, abs=0.1)
    zero_shot = [v / 100 for v in MTIL_ZERO_SHOT]
    fwt = compute_continual_metrics([[v / 100 for v in row] for row in MTIL_ZSCL], zero_shot=zero_shot)["fwt"]
    assert 100 * fwt == pytest.approx(68.1 - 69.4, abs=0.1)  # transfer minus zero-shot CLIP's on tasks 1..10


@pytest.mark.parametrize(
    "matrix, zero_shot, message",
    [
        ([], None, "empty"),
        ([[0.9, None], [0.8]], None, "square"),
        ([[None, None], [0.8, 0.7]], None, "lacks entries"),
        (FULL_3, [0.1, 0.2], "zero_shot has 2 entries for 3 tasks"),
        (MATRIX, [0.1, 0.2, 0.3, 0.4], "zero_shot has 4 entries for 3 tasks"),  # checked without transfer too
        (FULL_3, [0.1, None, 0.2], "zero_shot lacks entries"),
    ],
)
def test_bad_input_raises(matrix, zero_shot, message):
    with pytest.raises(ValueError, match=message):
        compute_continual_metrics(matrix, zero_shot=zero_shot)
