"""The prototype task selector: class means of frozen base-model features, kept task by task.

Each fitted task keeps a few prototypes -- the mean feature of each of its classes when the caller gives labels
(``fit_task_selector(task, batches, labels=...)``, what the continual trainer does), else the centroids of a k-means
over its features -- and one threshold. An input goes to the task of its most similar prototype (cosine similarity),
or to the base model when that similarity is below the task's threshold: the ``selector_quantile`` share of the
task's own held-out inputs scores above it, as with the autoencoders' thresholds. SimpleCIL and RanPAC show how far
class means of frozen features go in class-incremental learning; here they pick the task, not the class.

No training sample is stored: a task's prototypes and threshold are computed from its own features when it is
fitted and never change afterwards, so fitting a later task leaves every earlier decision statistic as it was.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F


class PrototypeFit(NamedTuple):
    """One fitted task: prototypes ``(K, F)`` (unit norm), its threshold ``()`` and the held-out similarities."""

    prototypes: torch.Tensor
    threshold: torch.Tensor
    holdout_scores: torch.Tensor


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
        train_labels = labels.to(x.device)[train]
        prototypes = torch.stack([x[train][train_labels == c].mean(dim=0) for c in torch.unique(train_labels)])
        prototypes = F.normalize(prototypes, dim=-1)
    else:
        prototypes = _kmeans(x[train], min(num_prototypes, train.numel()), gen)
    scores = (x[held] @ prototypes.T).max(dim=1).values
    threshold = torch.quantile(scores, 1.0 - quantile)
    return PrototypeFit(prototypes, threshold, scores)


class PrototypeSelector(nn.Module):
    """The prototype selector of one adapter: every fitted task's prototypes, stacked.

    Buffers: ``prototypes (P, F)`` (unit rows), ``owner (P,)`` long (the position of each prototype's task in the
    fitted task list), ``threshold (T,)``. ``sizes`` (prototypes per task, the config's ``selector_classes``)
    rebuilds the shapes before a checkpoint's values are loaded.
    """

    def __init__(self, features: int, sizes: Optional[list[int]] = None) -> None:
        super().__init__()
        sizes = list(sizes or [])
        self.features = features
        owner = torch.cat([torch.full((k,), t, dtype=torch.long) for t, k in enumerate(sizes)]) if sizes else None
        self.register_buffer("prototypes", torch.zeros(sum(sizes), features))
        self.register_buffer("owner", owner if owner is not None else torch.zeros(0, dtype=torch.long))
        self.register_buffer("threshold", torch.ones(len(sizes)))

    @property
    def feature_dim(self) -> int:
        return self.features

    def __len__(self) -> int:
        return self.threshold.shape[0]

    @torch.no_grad()
    def set_task(self, position: int, fit: PrototypeFit) -> None:
        """Write ``fit`` as task ``position`` (``position == len(self)`` appends); the other tasks are untouched."""
        if not 0 <= position <= len(self):
            raise IndexError(f"Selector entry {position} out of range 0..{len(self)}.")
        keep = self.owner != position
        new = fit.prototypes.to(self.prototypes)
        self.prototypes = torch.cat([self.prototypes[keep], new])
        self.owner = torch.cat([self.owner[keep], torch.full((new.shape[0],), position, device=self.owner.device)])
        order = torch.argsort(self.owner, stable=True)  # prototypes grouped by task, as `sizes` rebuilds them
        self.prototypes, self.owner = self.prototypes[order], self.owner[order]
        threshold = fit.threshold.to(self.threshold)
        if position == len(self):
            self.threshold = torch.cat([self.threshold, threshold.reshape(1)])
        else:
            self.threshold[position] = threshold

    def sizes(self) -> list[int]:
        return torch.bincount(self.owner, minlength=len(self)).tolist()

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
        sims = F.normalize(features.float(), dim=-1) @ self.prototypes.float().T  # (B, P)
        best, index = sims.max(dim=1)
        task = self.owner[index]
        return torch.where(best < self.threshold.float()[task], torch.full_like(task, -1), task)


__all__ = ["PrototypeFit", "PrototypeSelector", "fit_prototypes"]
