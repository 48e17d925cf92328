"""Continual-learning metrics on hand-made accuracy matrices (exact values)."""
import pytest

from sleepray import eval_metrics as M

# 3 sleeps, 4 episodes; parts: [e0], [e1, e2], [e3]
EPS = ["e0", "e1", "e2", "e3"]
PARTS = [["e0"], ["e1", "e2"], ["e3"]]
R = [[0.8, 0.1, 0.0, 0.2],
     [0.6, 0.9, 0.7, 0.1],
     [0.5, 0.4, 0.7, 1.0]]
B = [0.0, 0.1, 0.1, 0.0]


def test_part_of():
    assert M.part_of(PARTS, EPS) == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="in no part"):
        M.part_of(PARTS, EPS + ["e9"])


def test_metrics_by_hand():
    p = M.part_of(PARTS, EPS)
    m = M.metrics(R, p, B)
    assert m["ACC"] == pytest.approx((0.5 + 0.4 + 0.7 + 1.0) / 4)
    # episodes before the last part: e0 (0.5 - 0.8), e1 (0.4 - 0.9), e2 (0.7 - 0.7)
    assert m["BWT"] == pytest.approx((-0.3 - 0.5 + 0.0) / 3)
    # episodes after the first part, the sleep before they arrive: e1 (0.1-0.1), e2 (0.0-0.1), e3 (0.1-0.0)
    assert m["FWT"] == pytest.approx((0.0 - 0.1 + 0.1) / 3)
    assert m["LA"] == pytest.approx((0.8 + 0.9 + 0.7 + 1.0) / 4)
    # best earlier value minus final: e0 max(0.8, 0.6) - 0.5, e1 0.9 - 0.4, e2 0.7 - 0.7
    assert m["forgetting"] == pytest.approx((0.3 + 0.5 + 0.0) / 3)


def test_perfect_memory_has_no_forgetting_and_fwt_against_baseline():
    Rp = [[1.0, 0.0], [1.0, 1.0]]
    m = M.metrics(Rp, [0, 1], [0.0, 0.25])
    assert (m["ACC"], m["BWT"], m["forgetting"], m["LA"]) == (1.0, 0.0, 0.0, 1.0)
    assert m["FWT"] == pytest.approx(-0.25)


def test_one_sleep_has_no_bwt_or_fwt():
    m = M.metrics([[0.5, 0.25]], [0, 0], [0.0, 0.0])
    assert m["BWT"] is None and m["FWT"] is None and m["forgetting"] is None
    assert m["ACC"] == m["LA"] == pytest.approx(0.375)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="ragged"):
        M.metrics([[0.1, 0.2], [0.3]], [0, 1], [0, 0])
    with pytest.raises(ValueError, match="part indices"):
        M.metrics([[0.1, 0.2]], [0, 1], [0, 0])
    with pytest.raises(ValueError, match="baseline"):
        M.metrics([[0.1, 0.2]], [0, 0], [0])
    with pytest.raises(ValueError, match="missing"):
        M.metrics([[0.1, None]], [0, 0], [0, 0])


def test_rows_matrices_and_spread():
    p = M.part_of(PARTS, EPS)
    assert M.mean_rows(R) == pytest.approx([0.275, 0.575, 0.65])
    assert M.seen_mean_rows(R, p) == pytest.approx([0.8, (0.6 + 0.9 + 0.7) / 3, 0.65])
    assert M.mean_matrix([[[0.0, 1.0]], [[1.0, 0.0]]]) == [[0.5, 0.5]]
    s = M.spread([0.2, 0.4, None, 0.6])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.4) and s["std"] == pytest.approx(0.2)
    assert M.spread([0.3]) == {"mean": 0.3, "std": 0.0, "n": 1}
    assert M.spread([None]) == {"mean": None, "std": None, "n": 0}
    runs = [{"metrics": {"ACC": 0.5, "BWT": None}}, {"metrics": {"ACC": 0.7, "BWT": -0.1}}]
    out = M.summarize(runs, ["ACC", "BWT"])
    assert out["ACC"]["mean"] == pytest.approx(0.6) and out["BWT"] == {"mean": -0.1, "std": 0.0, "n": 1}


def test_phrasing_metrics_on_the_episodes_that_have_the_phrasing():
    from sleepray.eval_run import PHRASING_METRICS, phrasing_metrics
    p = M.part_of(PARTS, EPS)
    # unseen questions in e1 and e3 only: the metrics are those of R's columns 1 and 3
    unseen = [[None if j in (0, 2) else v for j, v in enumerate(row)] for row in R]
    out = phrasing_metrics({"seen": R, "unseen": unseen}, p, None)
    assert set(out) == set(PHRASING_METRICS)
    assert out["ACC_seen"] == pytest.approx(M.acc(R)) and out["LA_seen"] == pytest.approx(M.learning_accuracy(R, p))
    assert out["BWT_seen"] == pytest.approx(M.bwt(R, p))
    sub, sp = [[row[1], row[3]] for row in R], [p[1], p[3]]
    assert out["ACC_unseen"] == pytest.approx(M.acc(sub)) == pytest.approx(0.7)
    assert out["LA_unseen"] == pytest.approx(M.learning_accuracy(sub, sp)) == pytest.approx(0.95)
    assert out["BWT_unseen"] == pytest.approx(0.4 - 0.9)
    assert out["ACC_in_context_seen"] is None and out["ACC_in_context_unseen"] is None  # not measured
    out = phrasing_metrics({"seen": R}, p, {"seen": R})  # no unseen group in the stream
    assert out["ACC_in_context_seen"] == pytest.approx(M.acc(R))
    assert out["ACC_unseen"] is out["LA_unseen"] is out["BWT_unseen"] is out["ACC_in_context_unseen"] is None
