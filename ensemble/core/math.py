"""The ensemble math, in one place. Arrays are [N, C] class probabilities (softmax rows).

Combination rules
- `mean`: the arithmetic mean of member softmaxes, optionally weighted. This is what the
  ILSVRC entries did (AlexNet, GoogLeNet, VGG, ResNet: "softmax outputs averaged"), and the
  default here.
- `geometric`: the normalised geometric mean of the softmaxes. Since log softmax(z) = z -
  logsumexp(z), this equals softmax(mean of logits): the "logit averaging" of some modern
  TTA code. A different estimator (it rewards agreement, punishes one confident dissent),
  kept as an ablation.

Metrics
- top-k error, **a tie with the true class is not a hit**: the true class's rank is the
  number of *other* classes whose probability is at least its own, and it is top-k
  correct iff that rank is < k. Deterministic (unlike `argsort`/`topk`, whose tie order
  is arbitrary) and never flattering: uniform rows are top-1 wrong, a member that gives
  most classes exactly 0 cannot "hit" by having fewer than k non-zero classes. It is the
  pessimistic bound of the expected error under random tie-breaking; the two differ only
  on exact ties. Every figure the platform prints (per-epoch metrics, final member
  metrics, search choice, `ensemble.evaluate`) uses this one rule, on probabilities
  stored as float32 (no float16 underflow to exact 0; see ensemble/core/predictions.py);
- NLL (mean negative log-probability of the true class, clipped at 1e-12);
- ECE with 15 equal-width confidence bins (Guo et al. 2017, "On Calibration of Modern
  Neural Networks"): sum over bins of |accuracy - confidence| weighted by bin size;
- oracle error: no member has the true class at top-1 (a lower bound for any combination);
- pairwise disagreement: fraction of samples where two members' top-1 classes differ.

Uncertainty
- 95% percentile bootstrap over samples (Efron & Tibshirani 1993): resample the reported
  rows with replacement, recompute each error (and each paired difference, such as the
  ensemble's gain over its best member, on the same resample), take the 2.5th and 97.5th
  percentiles. `bootstrap_ci` does all figures on shared resamples (`resampled_means`).

Selection and calibration (fitted on a *selection* split, never the reported one)
- greedy forward selection with replacement from a sorted initialisation (Caruana et al.
  2004, "Ensemble Selection from Libraries of Models"): start from the best `init` members,
  then repeatedly add (again, possibly) the member whose addition most lowers the
  selection-split loss; repeats become weights;
- temperature scaling (Guo et al. 2017): per member, the T minimising NLL of p^(1/T)
  renormalised (= softmax(z / T)), as Ashukha et al. 2020 do before comparing ensembles.
"""
from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-12


def as_tensor(probs) -> torch.Tensor:
    return torch.as_tensor(probs).float()


def topk_correct(probs, labels, k: int) -> torch.Tensor:
    """Bool [N]: the true class is among the k most probable, a tie counting as a miss."""
    return true_class_rank(probs, labels) < k


def topk_error(probs, labels, k: int) -> float:
    return 1.0 - topk_correct(probs, labels, k).float().mean().item()


def nll(probs, labels) -> float:
    p = as_tensor(probs)
    y = torch.as_tensor(labels, dtype=torch.long)
    return -p.gather(1, y.view(-1, 1)).clamp_min(EPS).log().mean().item()


def reliability(probs, labels, bins: int = 15, top=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: (sum of confidence, number correct, count); bins are (a, b].
    `top` may pass a precomputed `probs.max(1)`."""
    conf, pred = top if top is not None else as_tensor(probs).max(1)
    correct = (pred == torch.as_tensor(labels, dtype=torch.long)).float()
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    conf_sum = torch.zeros(bins).index_add_(0, idx, conf)
    correct_sum = torch.zeros(bins).index_add_(0, idx, correct)
    count = torch.zeros(bins).index_add_(0, idx, torch.ones_like(conf))
    return conf_sum.numpy(), correct_sum.numpy(), count.numpy()


def ece_from_bins(conf_sum, correct_sum, count) -> float:
    n = count.sum()
    return float(np.abs(correct_sum - conf_sum).sum() / max(n, 1))


def ece(probs, labels, bins: int = 15) -> float:
    return ece_from_bins(*reliability(probs, labels, bins))


def combine(members: list, weights=None, method: str = "mean") -> torch.Tensor:
    """Combine member probabilities [M x (N, C)] by `mean` or `geometric` (see module doc)."""
    acc = Combiner(method)
    for i, p in enumerate(members):
        acc.add(p, 1.0 if weights is None else float(weights[i]))
    return acc.result()


class Combiner:
    """Streaming combination: add one member at a time, memory O(N x C)."""

    METHODS = ("mean", "geometric")

    def __init__(self, method: str = "mean"):
        if method not in self.METHODS:
            raise ValueError(f"unknown combination {method!r}; valid choices: {', '.join(self.METHODS)}")
        self.method, self.total, self.weight = method, None, 0.0

    def add(self, probs, weight: float = 1.0) -> None:
        p = as_tensor(probs)
        term = p.clamp_min(EPS).log() if self.method == "geometric" else p
        term = term * weight if weight != 1.0 else term
        self.total = term.clone() if self.total is None else self.total.add_(term)
        self.weight += weight

    def result(self) -> torch.Tensor:
        return self._finish(self.total, self.weight)

    def result_with(self, probs, weight: float = 1.0) -> torch.Tensor:
        """The result if `probs` were added, leaving this combination as it is (a
        selection step tries every candidate)."""
        p = as_tensor(probs)
        term = p.clamp_min(EPS).log() if self.method == "geometric" else p
        total = term * weight if self.total is None else self.total + term * weight
        return self._finish(total, self.weight + weight)

    def _finish(self, total: torch.Tensor, weight: float) -> torch.Tensor:
        mean = total / weight
        return mean.softmax(1) if self.method == "geometric" else mean


def oracle_error(top1_correct: list) -> float:
    """Fraction of samples that no member gets right at top-1."""
    any_right = torch.stack([torch.as_tensor(c) for c in top1_correct]).any(0)
    return 1.0 - any_right.float().mean().item()


def disagreement(pred_a, pred_b) -> float:
    return (torch.as_tensor(pred_a) != torch.as_tensor(pred_b)).float().mean().item()


def disagreement_counts(top1: torch.Tensor) -> np.ndarray:
    """[M, M] counts of rows where members i and j predict different top-1 classes, from
    their top-1 classes [M, N] (summed over blocks and divided by N: `disagreement` for
    every pair at once)."""
    return (top1[:, None, :] != top1[None, :, :]).sum(2).numpy()


def oracle_misses(top1_correct: torch.Tensor) -> int:
    """Rows [M, N] no member gets right at top-1 (summed over blocks and divided by N:
    `oracle_error`)."""
    return int((~top1_correct.any(0)).sum())


def apply_temperature(probs, t: float) -> torch.Tensor:
    """softmax(log p / T): the same as dividing the member's logits by T."""
    return (as_tensor(probs).clamp_min(EPS).log() / t).softmax(1)


def fit_temperature(probs, labels, lo: float = 0.05, hi: float = 20.0, iters: int = 40) -> float:
    """The T minimising NLL on (probs, labels): golden-section search on log T (NLL is
    unimodal in T for a fixed set of logits)."""
    logp = as_tensor(probs).clamp_min(EPS).log()
    y = torch.as_tensor(labels, dtype=torch.long).view(-1, 1)

    def loss(log_t: float) -> float:
        return -(logp / np.exp(log_t)).log_softmax(1).gather(1, y).mean().item()

    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2))


def selection_loss(probs, labels, metric: str) -> float:
    if metric == "nll":
        return nll(probs, labels)
    if metric == "top1":
        return topk_error(probs, labels, 1)
    if metric == "top5":
        return topk_error(probs, labels, 5)
    raise ValueError(f"unknown selection metric {metric!r}; valid choices: nll, top1, top5")


def greedy_selection(load, n_members: int, labels, rounds: int, init: int = 1,
                     metric: str = "nll", method: str = "mean", cost=None,
                     budget: float | None = None) -> tuple[list[int], list[float]]:
    """Caruana et al. 2004, "Ensemble Selection from Libraries of Models": sorted
    initialisation with the `init` best members, then `rounds` forward steps with
    replacement, each adding the member whose addition most lowers the selection loss of
    the combination `method` (the one that will be reported). Returns the **best prefix**
    of the chosen sequence (the paper's rule: the ensemble is the step with the lowest
    selection loss, not the last one; the first such step on ties) and the loss after
    every step (the whole curve, for plotting).

    With `cost` (per member) and `budget`, only members whose addition keeps the summed
    cost of the distinct members chosen within the budget are candidates (a member chosen
    again costs nothing more: its weight grows, not the work), as AutoGluon bounds its
    weighted ensemble by inference time (`infer_limit`).

    `load(i)` returns member i's probabilities on the selection rows and is called once per
    member: what the rounds need is held, at most one float32 copy of the rows (M x N x C x
    4 bytes), and for the mean's NLL (the default) only each member's true-class column
    (M x N x 4 bytes), from which that loss is computed exactly as from the whole rows."""
    held, labels = _held_for(load, n_members, labels, metric, method)
    own = [selection_loss(h, labels, metric) for h in held]
    fits = _within(cost, budget)
    chosen = [i for i in sorted(range(n_members), key=own.__getitem__) if fits(set(), i)][:init]
    if not chosen:
        raise ValueError(f"no member fits the budget {budget:g} (the cheapest costs {min(cost):g})")
    comb = Combiner(method)
    for i in chosen:
        comb.add(held[i])
    curve = [selection_loss(comb.result(), labels, metric)]
    for _ in range(rounds):
        losses = [selection_loss(comb.result_with(h), labels, metric) if fits(set(chosen), i) else math.inf
                  for i, h in enumerate(held)]
        best = int(np.argmin(losses))
        chosen.append(best)
        comb.add(held[best])
        curve.append(losses[best])
    best_step = int(np.argmin(curve))
    return chosen[:init + best_step], curve


def _within(cost, budget):
    """fits(chosen, i): adding member i to the distinct members `chosen` stays within budget."""
    if cost is None or budget is None:
        return lambda chosen, i: True
    return lambda chosen, i: sum(cost[j] for j in chosen | {i}) <= budget * (1 + 1e-12)


def ensemble_cost(cost, members) -> float:
    """What an ensemble of `members` (indices, repeats allowed) costs: its distinct members' sum."""
    return float(sum(cost[i] for i in set(members)))


def _held_for(load, n_members: int, labels, metric: str, method: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each member loaded once. The mean's NLL reads only the true class's probability, and
    a mean is taken column by column, so each member's true-class column (with label 0 for
    every row) gives the same floats, in the same order, as the whole rows."""
    y = torch.as_tensor(labels, dtype=torch.long)
    if metric == "nll" and method == "mean":
        return [as_tensor(load(i)).gather(1, y.view(-1, 1)) for i in range(n_members)], torch.zeros_like(y)
    return [as_tensor(load(i)).contiguous() for i in range(n_members)], y


def weights_from_selection(chosen: list[int], n_members: int) -> np.ndarray:
    """Repeats -> weights summing to 1 (a member picked 3 times of 10 weighs 0.3)."""
    counts = np.bincount(chosen, minlength=n_members).astype(np.float64)
    return counts / counts.sum()


def true_class_rank(probs, labels) -> torch.Tensor:
    """Number of other classes at least as probable as the true one (ties count against
    it): top-k correct iff < k. One comparison pass gives top-1 and top-5 together (the
    evaluation's hot loop). Works on any monotone score (probabilities or logits)."""
    p = as_tensor(probs)
    p_true = p.gather(1, torch.as_tensor(labels, dtype=torch.long, device=p.device).view(-1, 1))
    return rank_of(p, p_true)


def rank_of(p: torch.Tensor, p_true: torch.Tensor) -> torch.Tensor:
    """Classes other than the true one with p >= p_true (the true class itself always
    satisfies >=, hence the - 1). A NaN true score ranks last (never a hit)."""
    # summing the comparison as uint8 into int32 is ~2x faster than a bool -> int64 sum
    at_least = torch.ge(p, p_true).view(torch.uint8).sum(1, dtype=torch.int32) - 1
    return torch.where(torch.isnan(p_true.view(-1)), p.shape[1], at_least)


def resampled_means(columns, n_boot: int, seed: int = 0, chunk: int = 50) -> np.ndarray:
    """[n_boot, K] column means of `columns` [N, K] over `n_boot` resamples of the N rows, each
    a row-count vector (bincount of N draws): one product scores every column on it (paired)."""
    x = np.asarray(columns, dtype=np.float64)
    n, rng, means = len(x), np.random.default_rng(seed), np.empty((n_boot, x.shape[1]))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(b)])
        means[start:start + b] = counts @ x / n
    return means


def bootstrap_ci(columns, n_boot: int = 1000, seed: int = 0, level: float = 0.95, chunk: int = 50) -> np.ndarray:
    """[K, 2] percentile intervals of the column means of `columns` [N, K] (per-row misses,
    or paired differences of misses) over `n_boot` resamples of the rows."""
    if n_boot == 0:  # asked for none: no interval (NaN), not an error
        return np.full((np.shape(columns)[1], 2), np.nan)
    tail = (1 - level) / 2 * 100
    return np.percentile(resampled_means(columns, n_boot, seed, chunk), [tail, 100 - tail], axis=0).T
