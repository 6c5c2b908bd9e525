"""benchmarks/bench_selector.py's goal verdicts (issue #15): thresholds, and the cost read per feature kind."""

import pytest
from benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_selector") as module:
        yield module


def _row(selector, identification, agnostic, ood, cost, sequence="in_domain"):
    return dict(
        sequence=sequence,
        selector=selector,
        identification=identification,
        agnostic_last=agnostic,
        aware_last=0.93,
        ood_to_base={"all": ood},
        cost=cost,
    )


def test_goal_verdicts(bench):
    rows = [
        _row("prototype/deep+shallow", 0.86, 0.89, 0.90, 2.05),  # the extra pass at 1.05x the forward: allowed
        _row("prototype/shallow", 0.84, 0.87, 0.95, 1.06),  # 6 % of the forward on shallow features: not
        _row("prototype/deep", 0.99, 0.99, 0.99, 1.5, sequence="default"),  # goals are on in_domain only
        dict(_row("max-confidence", 0.5, 0.5, 0.0, None), ood_to_base=None),  # no selector cost to judge
    ]
    lines = bench.goal_lines(rows)
    assert len(lines) == 2
    verdicts = [[part.rsplit(": ", 1)[1] for part in line.split(": ", 1)[1].split(", ")] for line in lines]
    assert verdicts[0] == ["PASS", "PASS", "PASS", "PASS"]
    assert verdicts[1] == ["FAIL", "FAIL", "PASS", "FAIL"]  # 84 % id., 6 points below task-aware, 6 % cost
