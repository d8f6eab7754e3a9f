"""The ensemble math against values computed by hand."""
import numpy as np
import pytest
import torch

from ensemble.core import math as em

# two members, three samples, three classes; labels 0, 1, 2
A = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
B = np.array([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
Y = np.array([0, 1, 2])


def test_mean_of_softmaxes_by_hand():
    mean = em.combine([A, B]).numpy()
    assert np.allclose(mean[0], [0.4, 0.5, 0.1])
    assert np.allclose(mean[2], [0.4, 0.25, 0.35])
    weighted = em.combine([A, B], weights=[3, 1]).numpy()
    assert np.allclose(weighted[0], [0.55, 0.35, 0.1])


def test_geometric_mean_is_softmax_of_mean_logits_and_differs_from_mean():
    logits_a, logits_b = np.log(A) + 5.0, np.log(B) - 2.0  # logits up to a per-row constant
    softmax_mean_logits = torch.tensor((logits_a + logits_b) / 2).softmax(1).numpy()
    geo = em.combine([A, B], method="geometric").numpy()
    assert np.allclose(geo, softmax_mean_logits, atol=1e-6)
    # sample 0 by hand: sqrt(.7*.1)=.2646, sqrt(.2*.8)=.4, sqrt(.1*.1)=.1 -> normalised
    g = np.array([np.sqrt(0.07), 0.4, 0.1])
    assert np.allclose(geo[0], g / g.sum(), atol=1e-6)
    # the rules disagree when one member is confident and the other all but rules a class out:
    # mean = [.45, .3, .25] picks class 0; geometric ~ [.0095, .22, ~0] picks class 1
    p1, p2 = np.array([[0.9, 0.1, 0.0]]), np.array([[0.0001, 0.5, 0.4999]])
    assert em.combine([p1, p2]).numpy().argmax() == 0
    assert em.combine([p1, p2], method="geometric").numpy().argmax() == 1


def test_top1_top5_with_ties():
    p = np.array([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0],  # 4-way tie at the top, label inside it
                  [0.3, 0.2, 0.2, 0.1, 0.1, 0.1],      # label 5 tied with 3 and 4 at ranks 4-6
                  [0.1, 0.1, 0.1, 0.1, 0.1, 0.5]])
    y = np.array([2, 5, 0])
    # a tie with the true class is not a hit: sample 0's label shares the top with 3 others
    assert em.topk_correct(p, y, 1).tolist() == [False, False, False]
    assert em.topk_correct(p, y, 4).tolist() == [True, False, False]
    # samples 1 and 2: the label ties with others for ranks 4-6 and 1-5 (5 classes are at
    # least as probable in both), so neither is a top-5 hit
    assert em.topk_correct(p, y, 5).tolist() == [True, False, False]
    assert em.topk_error(p, y, 1) == pytest.approx(1.0)

def test_top1_error_of_a_member():
    # A's argmax: 0, 1, 0 -> right, right, wrong
    assert em.topk_error(A, Y, 1) == pytest.approx(1 / 3)
    assert em.topk_error(B, Y, 1) == pytest.approx(2 / 3)  # 1 (wrong), 2 (wrong), 2 (right)
    assert em.topk_error(A, Y, 2) == pytest.approx(1 / 3)  # sample 2: 0.1 is last


def test_nll_by_hand():
    assert em.nll(A, Y) == pytest.approx(-(np.log(0.7) + np.log(0.5) + np.log(0.1)) / 3)


def test_ece_by_hand():
    # confidences .7 (right), .5 (right), .6 (wrong) fall in bins (.667,.733], (.467,.533], (.533,.6]
    # ECE = (|1-.7| + |1-.5| + |0-.6|) / 3
    assert em.ece(A, Y, bins=15) == pytest.approx((0.3 + 0.5 + 0.6) / 3)
    # one bin: |accuracy - mean confidence| = |2/3 - 0.6|
    assert em.ece(A, Y, bins=1) == pytest.approx(abs(2 / 3 - 0.6))


def test_disagreement_and_oracle():
    pa, pb = A.argmax(1), B.argmax(1)  # [0, 1, 0] and [1, 2, 2]: they differ everywhere
    assert em.disagreement(pa, pb) == pytest.approx(1.0)
    assert em.disagreement(pa, pa) == 0.0
    # A is right on samples 0, 1; B on sample 2: some member is right everywhere
    assert em.oracle_error([em.topk_correct(A, Y, 1), em.topk_correct(B, Y, 1)]) == 0.0
    assert em.oracle_error([em.topk_correct(A, Y, 1)]) == pytest.approx(1 / 3)


def test_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 10)) * 3
    true_t = 2.5
    probs_true = torch.tensor(logits / true_t).softmax(1).numpy()
    labels = np.array([rng.choice(10, p=row) for row in probs_true])
    overconfident = torch.tensor(logits).softmax(1).numpy()  # the member's T=1 outputs
    t = em.fit_temperature(overconfident, labels)
    assert t == pytest.approx(true_t, rel=0.1)
    assert em.nll(em.apply_temperature(overconfident, t), labels) < em.nll(overconfident, labels)


def test_greedy_selection_with_replacement_on_a_known_case():
    y = np.array([0, 1, 2, 0])
    good = np.array([[.8, .1, .1], [.1, .8, .1], [.1, .1, .8], [.4, .5, .1]])     # wrong on sample 3 only
    fixer = np.array([[.6, .2, .2], [.4, .3, .3], [.4, .3, .3], [.9, .05, .05]])  # right on 0 and 3
    bad = np.array([[.05, .9, .05], [.05, .05, .9], [.9, .05, .05], [.05, .9, .05]])  # always wrong
    members = [bad, fixer, good]
    chosen, curve = em.greedy_selection(lambda i: members[i], 3, y, rounds=3, init=1, metric="top1")
    assert chosen[0] == 2                       # sorted init: the best member first
    assert chosen[1] == 1                       # adding the fixer makes all 4 right
    assert curve[0] == pytest.approx(0.25) and curve[1] == pytest.approx(0.0)
    assert 0 not in chosen                      # the always-wrong member is never picked
    w = em.weights_from_selection(chosen, 3)
    assert w.sum() == pytest.approx(1) and w[0] == 0


@pytest.mark.parametrize("seed", range(20))
def test_greedy_selection_returns_its_best_prefix(seed):
    rng = np.random.default_rng(seed)
    n, c, m = 60, 5, 6
    y = rng.integers(0, c, n)
    members = [torch.from_numpy(rng.dirichlet(np.ones(c) * 0.5, size=n)).float() for _ in range(m)]
    chosen, curve = em.greedy_selection(lambda i: members[i], m, y, rounds=8, init=1, metric="nll")
    assert len(curve) == 9 and 1 <= len(chosen) <= 9
    returned = em.nll(em.combine([members[i] for i in chosen]), y)
    assert returned == pytest.approx(min(curve), abs=1e-6)
    # no prefix of the sequence is better on the selection rows than what is returned
    assert all(returned <= c_ + 1e-6 for c_ in curve)


def per_round_selection(members, labels, rounds, metric, method):
    """The selection as it was written before: every candidate's rows loaded again in
    every round (the reference the held version must equal, float for float)."""
    own = [em.selection_loss(p, labels, metric) for p in members]
    chosen = sorted(range(len(members)), key=own.__getitem__)[:1]
    comb = em.Combiner(method)
    comb.add(members[chosen[0]])
    curve = [em.selection_loss(comb.result(), labels, metric)]
    for _ in range(rounds):
        losses = [em.selection_loss(comb.result_with(p), labels, metric) for p in members]
        best = int(np.argmin(losses))
        chosen.append(best)
        comb.add(members[best])
        curve.append(losses[best])
    return chosen[:1 + int(np.argmin(curve))], curve


@pytest.mark.parametrize("metric,method", [("nll", "mean"), ("top1", "mean"), ("top5", "mean"),
                                           ("nll", "geometric")])
def test_greedy_selection_loads_each_member_once_and_chooses_as_before(metric, method):
    rng = np.random.default_rng(7)
    n, c, m = 300, 20, 9
    y = rng.integers(0, c, n)
    members = [torch.from_numpy(rng.dirichlet(np.ones(c) * 0.4, size=n)).float() for _ in range(m)]
    loads = []

    def load(i):
        loads.append(i)
        return members[i].numpy()  # as a reader returns it

    chosen, curve = em.greedy_selection(load, m, y, rounds=2 * m, init=1, metric=metric, method=method)
    assert sorted(loads) == list(range(m))  # M loads, not M x (rounds + 1)
    assert (chosen, curve) == per_round_selection(members, y, 2 * m, metric, method)  # exactly, not approximately


def test_greedy_selection_optimises_the_combination_in_use():
    rng = np.random.default_rng(5)
    n, c, m = 80, 4, 5
    y = rng.integers(0, c, n)
    members = [torch.from_numpy(rng.dirichlet(np.ones(c) * 0.3, size=n)).float() for _ in range(m)]
    for method in ("mean", "geometric"):
        chosen, curve = em.greedy_selection(lambda i: members[i], m, y, rounds=6, init=1, metric="nll",
                                            method=method)
        # the losses it minimised are those of its own combination rule
        assert em.nll(em.combine([members[i] for i in chosen], method=method), y) == pytest.approx(min(curve), rel=1e-5)
    geo, _ = em.greedy_selection(lambda i: members[i], m, y, rounds=6, init=1, metric="nll", method="geometric")
    assert em.nll(em.combine([members[i] for i in geo], method="mean"), y) != pytest.approx(
        em.nll(em.combine([members[i] for i in geo], method="geometric"), y), rel=1e-3)


def test_blockwise_oracle_and_disagreement_equal_the_whole_split_functions():
    rng = np.random.default_rng(1)
    top1 = torch.from_numpy(rng.integers(0, 3, (4, 100)))
    right = torch.from_numpy(rng.random((4, 100)) < 0.4)
    counts = sum(em.disagreement_counts(top1[:, s:s + 30]) for s in range(0, 100, 30)) / 100
    for i in range(4):
        for j in range(4):
            assert counts[i, j] == pytest.approx(em.disagreement(top1[i], top1[j]))
    misses = sum(em.oracle_misses(right[:, s:s + 30]) for s in range(0, 100, 30)) / 100
    assert misses == pytest.approx(em.oracle_error(list(right)))


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_rows():
    rng = np.random.default_rng(0)
    small = (rng.random((400, 1)) < 0.3).astype(float)
    large = (rng.random((10000, 1)) < 0.3).astype(float)
    (lo_s, hi_s), (lo_l, hi_l) = em.bootstrap_ci(small, 400)[0], em.bootstrap_ci(large, 400)[0]
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    # binomial s.e. sqrt(.21 / n): the 95% width is about 3.9 s.e.
    assert hi_l - lo_l == pytest.approx(3.92 * np.sqrt(0.21 / 10000), rel=0.2)
    assert hi_s - lo_s > 4 * (hi_l - lo_l)


def test_select_bench_times_both_selections_and_prints_the_ratio(tmp_path):
    """bench/select_bench.py at toy size: both selections run, agree, and the figure prints."""
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "bench/select_bench.py", "--members", "6", "--rows", "300", "--classes",
                          "10", "--old-rounds", "2", "--dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "each member loaded once: " in out.stdout and "(6 loads)" in out.stdout
    assert re.search(r"per-round loading / loading once: [\d.]+x", out.stdout)
    assert not list(tmp_path.iterdir())  # its member files are removed
