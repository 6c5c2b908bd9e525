"""The prototype task selector: class means of frozen base-model features, kept task by task.

Each fitted task keeps a few prototypes -- the mean feature of each of its classes when the caller gives labels
(``fit_task_selector(task, batches, labels=...)``, what the continual trainer does), else the centroids of a k-means
over its features -- and one threshold. An input goes to the task of its most similar prototype (cosine similarity),
or to the base model when that similarity is below the task's threshold: the ``selector_quantile`` share of the
task's own held-out inputs scores above it, as with the autoencoders' thresholds. SimpleCIL and RanPAC show how far
class means of frozen features go in class-incremental learning; here they pick the task, not the class.

No training sample is stored: a task's prototypes and threshold are computed from its own features when it is
fitted and never change afterwards, so fitting a later task leaves every earlier decision statistic as it was.

``scoring="lda"`` (opt-in) lets the classes compete through a linear discriminant instead of the cosine: each task
also keeps, for the unit features of its own training inputs, the mean and the number of samples of each class and
its within-class scatter ``sum (x - mean_c)(x - mean_c)^T`` ``(F, F)``. The covariance the discriminant whitens with
is pooled over every fitted task's scatter and shrunk towards its average variance (``shrinkage``), as in SLDA /
the second-order statistics of RanPAC; it is derived at decision time, never stored. A sample goes to the owner of
its best class ``argmax_c x^T S^-1 m_c - m_c^T S^-1 m_c / 2``, and to the base model when its cosine similarity to
that task's own prototypes is below the task's threshold (the same threshold as ``"cosine"``). Fitting task ``k``
leaves the statistics of tasks ``< k`` as they were but changes the pooled covariance, hence every class's
discriminant: earlier tasks' decisions can move, their out-of-distribution test cannot (it reads only their own
prototypes and threshold, which a pooled Mahalanobis threshold would not allow: calibrated when its task was fitted,
it would be stale once the covariance moves, and no held-out sample is kept to recalibrate it).

Why pooled and not per-task whitening: on the frozen MiniLM features of ``benchmarks/bench_selector.py``, a
covariance of each task's own (fixed forever) identified fewer tasks on validation rows than the pooled one (in_domain
73.6 vs 78.8 %, default 93.6 vs 97.2 %: a task has few samples for 384 features), and the cosine threshold sent more
foreign inputs to the base model than a Mahalanobis one (``benchmarks/results/bench_selector_cpu.md``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F


SCORING = ("cosine", "lda")


class PrototypeFit(NamedTuple):
    """One fitted task: prototypes ``(K, F)`` (unit norm), its threshold ``()`` and the held-out similarities
    ``(n_holdout,)``; for ``scoring="lda"``, the statistics of the unit training features: class means ``(K, F)``
    (``prototypes`` are these, normalized), samples per class ``(K,)`` and the within-class scatter ``(F, F)``."""

    prototypes: torch.Tensor
    threshold: torch.Tensor
    holdout_scores: torch.Tensor
    means: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    scatter: Optional[torch.Tensor] = None


def _kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iterations: int = 25) -> torch.Tensor:
    """Spherical k-means of unit rows ``x`` ``(N, F)`` -> centroids ``(k, F)`` (unit norm), seeded by ``gen``."""
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
    for _ in range(iterations):
        assign = (x @ centroids.T).argmax(dim=1)
        for c in range(k):
            members = x[assign == c]
            if members.shape[0]:
                centroids[c] = members.mean(dim=0)
        centroids = F.normalize(centroids, dim=-1)
    return centroids


def fit_prototypes(
    features: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    num_prototypes: int = 4,
    holdout: float = 0.2,
    quantile: float = 0.99,
    seed: int = 0,
) -> PrototypeFit:
    """Prototypes of one task from its features ``(N, F)``: the unit mean of each class of ``labels`` ``(N,)``, or
    ``num_prototypes`` k-means centroids without labels; fitted on all but a random ``holdout`` share, whose best
    similarities calibrate the threshold (their ``1 - quantile`` quantile)."""
    if features.dim() != 2:
        raise ValueError(f"Selector features must be (N, F), got shape {tuple(features.shape)}.")
    n = features.shape[0]
    if n < 4:
        raise ValueError(f"Fitting a task selector needs at least 4 samples, got {n}.")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have one entry per sample ({n}), got shape {tuple(labels.shape)}.")
    x = F.normalize(features.detach().float(), dim=-1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(x.device)
    n_hold = min(max(1, int(round(n * holdout))), n - 2) if holdout > 0 else 0
    held, train = (perm[:n_hold], perm[n_hold:]) if n_hold else (perm, perm)
    if labels is not None:
        _, groups = torch.unique(labels.to(x.device)[train], return_inverse=True)  # class ids -> 0..K-1, sorted
        prototypes = F.normalize(_group_means(x[train], groups), dim=-1)
    else:
        prototypes = _kmeans(x[train], min(num_prototypes, train.numel()), gen)
        groups = (x[train] @ prototypes.T).argmax(dim=1)  # the clusters play the classes
    scores = (x[held] @ prototypes.T).max(dim=1).values
    threshold = torch.quantile(scores, 1.0 - quantile)
    means, counts, scatter = class_statistics(x[train], groups, prototypes.shape[0])
    return PrototypeFit(prototypes, threshold, scores, means, counts, scatter)


def _group_means(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[groups == c].mean(dim=0) for c in range(int(groups.max()) + 1)])


def class_statistics(x: torch.Tensor, groups: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class means ``(k, F)``, samples per class ``(k,)`` and within-class scatter ``(F, F)`` of features ``x``
    ``(N, F)`` in classes ``groups`` ``(N,)`` (0..k-1; an empty class keeps a zero mean and count). Summed in float64:
    the scatter is a sum of N outer products."""
    x64 = x.double()
    counts = torch.bincount(groups, minlength=k).to(x64)
    means = torch.zeros(k, x.shape[1], dtype=x64.dtype, device=x.device).index_add_(0, groups, x64)
    means = means / counts.clamp_min(1).unsqueeze(1)
    centered = x64 - means[groups]
    return means.float(), counts.float(), (centered.T @ centered).float()


def shared_discriminant(
    means: torch.Tensor, counts: torch.Tensor, scatter: torch.Tensor, shrinkage: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear discriminant of classes with means ``(P, F)`` and samples ``(P,)``, sharing the covariance pooled
    from the tasks' within-class scatters ``(T, F, F)``: ``S = sum_t scatter_t / (N - P)``, shrunk as
    ``(1 - shrinkage) S + shrinkage tr(S)/F I``. Returns weights ``(P, F)`` = ``means S^-1`` and biases ``(P,)`` =
    ``-means S^-1 means^T / 2`` (equal class priors: the tasks' sizes should not decide)."""
    f = means.shape[1]
    dof = (counts.sum() - means.shape[0]).clamp_min(1.0)
    pooled = scatter.double().sum(dim=0) / dof.double()
    eye = torch.eye(f, dtype=pooled.dtype, device=pooled.device)
    shrunk = (1.0 - shrinkage) * pooled + shrinkage * (torch.trace(pooled) / f) * eye
    # the shrinkage keeps it invertible: one task alone has fewer samples than features
    weights = torch.linalg.solve(shrunk, means.double().T).T
    biases = -0.5 * (weights * means.double()).sum(dim=1)
    biases = biases.masked_fill(counts == 0, float("-inf"))  # an empty k-means cluster never wins
    return weights.float(), biases.float()


def _forget_discriminant(module: PrototypeSelector, incompatible_keys=None) -> None:
    """Load-state-dict post hook: loaded statistics make the cached discriminant stale."""
    module._discriminant = None


class PrototypeSelector(nn.Module):
    """The prototype selector of one adapter: every fitted task's prototypes, stacked.

    Buffers: ``prototypes (P, F)`` (unit rows), ``owner (P,)`` long (the position of each prototype's task in the
    fitted task list), ``threshold (T,)``; with ``scoring="lda"`` also ``means (P, F)``, ``counts (P,)`` and
    ``scatter (T, F, F)`` (:class:`PrototypeFit`). ``sizes`` (prototypes per task, the config's
    ``selector_classes``) rebuilds the shapes before a checkpoint's values are loaded. ``shrinkage`` (in (0, 1]) is
    the ``"lda"`` covariance's shrinkage towards its average variance.
    """

    def __init__(
        self, features: int, sizes: Optional[list[int]] = None, scoring: str = "cosine", shrinkage: float = 0.6
    ) -> None:
        super().__init__()
        if scoring not in SCORING:
            raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}.")
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage!r}.")
        sizes = list(sizes or [])
        self.features, self.scoring, self.shrinkage = features, scoring, shrinkage
        owner = torch.cat([torch.full((k,), t, dtype=torch.long) for t, k in enumerate(sizes)]) if sizes else None
        self.register_buffer("prototypes", torch.zeros(sum(sizes), features))
        self.register_buffer("owner", owner if owner is not None else torch.zeros(0, dtype=torch.long))
        self.register_buffer("threshold", torch.ones(len(sizes)))
        if scoring == "lda":  # only then: adapters saved with cosine scoring keep loading with their own keys
            self.register_buffer("means", torch.zeros(sum(sizes), features))
            self.register_buffer("counts", torch.zeros(sum(sizes)))
            self.register_buffer("scatter", torch.zeros(len(sizes), features, features))
        self._discriminant: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # derived, rebuilt when stale
        self.register_load_state_dict_post_hook(_forget_discriminant)  # a function, not a closure: picklable

    @property
    def feature_dim(self) -> int:
        return self.features

    def __len__(self) -> int:
        return self.threshold.shape[0]

    @torch.no_grad()
    def set_task(self, position: int, fit: PrototypeFit) -> None:
        """Write ``fit`` as task ``position`` (``position == len(self)`` appends); the other tasks' statistics are
        untouched (with ``"lda"``, the pooled covariance they are compared through changes)."""
        if not 0 <= position <= len(self):
            raise IndexError(f"Selector entry {position} out of range 0..{len(self)}.")
        lda = self.scoring == "lda"
        if lda and fit.scatter is None:
            raise ValueError("scoring='lda' needs a fit with class statistics (fit_prototypes gives them).")
        keep = self.owner != position
        new = fit.prototypes.to(self.prototypes)
        self.prototypes = torch.cat([self.prototypes[keep], new])
        if lda:
            self.means = torch.cat([self.means[keep], fit.means.to(self.means)])
            self.counts = torch.cat([self.counts[keep], fit.counts.to(self.counts)])
        self.owner = torch.cat([self.owner[keep], torch.full((new.shape[0],), position, device=self.owner.device)])
        order = torch.argsort(self.owner, stable=True)  # prototypes grouped by task, as `sizes` rebuilds them
        self.prototypes, self.owner = self.prototypes[order], self.owner[order]
        if lda:
            self.means, self.counts = self.means[order], self.counts[order]
        threshold = fit.threshold.to(self.threshold)
        scatter = fit.scatter.to(self.scatter).unsqueeze(0) if lda else None
        if position == len(self):
            self.threshold = torch.cat([self.threshold, threshold.reshape(1)])
            if lda:
                self.scatter = torch.cat([self.scatter, scatter])
        else:
            self.threshold[position] = threshold
            if lda:
                self.scatter[position] = scatter[0]
        self._discriminant = None

    def sizes(self) -> list[int]:
        return torch.bincount(self.owner, minlength=len(self)).tolist()

    def discriminant(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``"lda"``: weights ``(P, F)`` and biases ``(P,)`` of every class (:func:`shared_discriminant`), computed
        once after each change of the statistics (a solve of ``F x F``), on the buffers' device."""
        cached = self._discriminant
        if cached is None or cached[0].device != self.means.device:
            cached = shared_discriminant(self.means, self.counts, self.scatter, self.shrinkage)
            self._discriminant = cached
        return cached

    @torch.no_grad()
    def select(self, features: torch.Tensor, compare: str = "raw") -> torch.Tensor:
        """Per-sample choice for features ``(B, F)``: position in the fitted task list, or ``-1`` (base model).
        ``compare`` is the autoencoders' option and has no effect here (similarities are comparable as they are)."""
        if len(self) == 0:
            raise ValueError("The task selector has no fitted task; call fit_task_selector(...) first.")
        if features.shape[-1] != self.features:
            raise ValueError(
                f"Task selector expects {self.features} features but got {features.shape[-1]}: it was fitted on "
                "another layer or model."
            )
        x = F.normalize(features.float(), dim=-1)
        sims = x @ self.prototypes.float().T  # (B, P)
        if self.scoring == "lda":
            weights, biases = self.discriminant()
            task = self.owner[(x @ weights.T + biases).argmax(dim=1)]
            # out-of-distribution test: the similarity to the chosen task's own prototypes
            best = sims.masked_fill(self.owner.unsqueeze(0) != task.unsqueeze(1), float("-inf")).max(dim=1).values
        else:
            best, index = sims.max(dim=1)
            task = self.owner[index]
        return torch.where(best < self.threshold.float()[task], torch.full_like(task, -1), task)


__all__ = ["SCORING", "PrototypeFit", "PrototypeSelector", "class_statistics", "fit_prototypes", "shared_discriminant"]
