"""The de-redundancy terms of ReSoRA, as pure functions of the adapter's features and weights.

Notation: a ReSoRA adapter of rank ``r`` with ``G`` subspaces of rank ``k = r / G`` has factors ``A`` ``(r, in)``
and ``B`` ``(out, r)``; subspace ``g`` owns rows ``g*k:(g+1)*k`` of ``A`` and the same columns of ``B``. For
``N`` input vectors (tokens), ``z = A x`` ``(N, r)`` are the subspace features and ``o_g = B_g z_g`` ``(N, out)``
the subspace outputs, whose sum is the adapter's (unscaled) output.

Every term lies in ``[0, 1]`` and is computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_decorrelation(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """A-side term: mean squared off-diagonal entry of the standardized cross-correlation of ``z``.

    ``z`` ``(N, r)`` -> scalar. With per-feature means ``mu`` and (population) variances ``v`` over the ``N``
    samples, ``C_ij = cov_ij / sqrt((v_i + eps) (v_j + eps))`` ``(r, r)`` (unit diagonal up to ``eps``), and the loss
    is ``sum_{i != j} C_ij^2 / (r (r - 1))``: 0 when all features (across and within subspaces) are uncorrelated,
    1 when they are all perfectly (anti-)correlated (Barlow Twins' redundancy-reduction term, normalized).

    Computed from the ``(r, r)`` second moments, never materializing a standardized copy of ``z``: the only
    ``O(N)`` work is one ``z^T z`` and one mean, which keeps the training overhead small.
    """
    z = z.float()
    n, r = z.shape
    if n < 2 or r < 2:
        return z.new_zeros(())
    mean = z.mean(dim=0)
    cov = z.T @ z / n - torch.outer(mean, mean)
    inv_std = (cov.diagonal() + eps).rsqrt()
    corr = cov * torch.outer(inv_std, inv_std)
    off_diagonal_sq = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
    return off_diagonal_sq / (r * (r - 1))


class _SubspaceInnerProducts:
    """``<o_g, o_h>`` per sample, computed as ``z_g^T (B_g^T B_h) z_h`` from the ``(r, r)`` matrix ``B^T B``.

    ``O(N r^2 + out r^2)`` instead of materializing the ``(N, G, out)`` subspace outputs (``out`` >> ``r``).
    """

    def __init__(self, z: torch.Tensor, B: torch.Tensor, num_subspaces: int) -> None:
        z = z.float()
        btb = B.float().T @ B.float()  # (r, r)
        self.k = k = z.shape[1] // num_subspaces
        self.z_groups = z.split(k, dim=1)
        # projected[g] = z_g @ (B_g^T B): (N, r); <o_g, o_h> sums it against z_h over subspace h's columns
        self.projected = [zg @ btb[g * k : (g + 1) * k] for g, zg in enumerate(self.z_groups)]

    def __call__(self, g: int, h: int) -> torch.Tensor:
        k = self.k
        return (self.projected[g][:, h * k : (h + 1) * k] * self.z_groups[h]).sum(-1)


def subspace_output_gram(z: torch.Tensor, B: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """Inner products ``<o_g, o_h>`` of the subspace outputs per sample: ``(N, G, G)``."""
    inner = _SubspaceInnerProducts(z, B, num_subspaces)
    g_range = range(num_subspaces)
    return torch.stack([torch.stack([inner(g, h) for h in g_range], -1) for g in g_range], dim=1)


def output_cosine_redundancy(z: torch.Tensor, B: torch.Tensor, num_subspaces: int, eps: float = 1e-8) -> torch.Tensor:
    """B-side term: mean over samples and subspace pairs ``g < h`` of ``cos^2(o_g, o_h)``.

    ``z`` ``(N, r)``, ``B`` ``(out, r)`` -> scalar. 0 when the subspaces write to orthogonal output directions for
    every input, 1 when they write along the same line. With ``B = 0`` (init) every output is 0 and so is the term.
    """
    if num_subspaces < 2 or z.shape[0] == 0:
        return z.new_zeros((), dtype=torch.float32)
    inner = _SubspaceInnerProducts(z, B, num_subspaces)  # only the pairs g < h and the norms are needed
    sq_norms = [inner(g, g).clamp_min(0) for g in range(num_subspaces)]
    # cos^2 = <o_g, o_h>^2 / (|o_g|^2 |o_h|^2), without a square root: sqrt has an infinite gradient at 0, and
    # every output is 0 at init (B = 0).
    terms = [
        inner(g, h).pow(2) / (sq_norms[g] * sq_norms[h]).clamp_min(eps * eps)
        for g in range(num_subspaces)
        for h in range(g + 1, num_subspaces)
    ]
    return torch.stack(terms).mean()


def _between_subspace_mask(r: int, num_subspaces: int, device) -> torch.Tensor:
    group = torch.arange(r, device=device) // (r // num_subspaces)
    return group.unsqueeze(0) != group.unsqueeze(1)


def weight_overlap(A: torch.Tensor, B: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """Ablation ("weight" regularizer): feature-free overlap of the subspaces' weights.

    ``A`` ``(r, in)``, ``B`` ``(out, r)`` -> scalar: mean squared cosine between rows of ``A`` that belong to
    different subspaces, plus the same for columns of ``B``, halved. 0 when the subspaces are mutually orthogonal
    on both sides.
    """
    r = A.shape[0]
    if num_subspaces < 2:
        return A.new_zeros((), dtype=torch.float32)
    mask = _between_subspace_mask(r, num_subspaces, A.device)
    a_rows = F.normalize(A.float(), dim=1)
    b_cols = F.normalize(B.float(), dim=0)
    a_term = (a_rows @ a_rows.T)[mask].pow(2).mean()
    b_term = (b_cols.T @ b_cols)[mask].pow(2).mean()
    return 0.5 * (a_term + b_term)


def redundancy_terms(
    regularizer: str, z: torch.Tensor, A: torch.Tensor, B: torch.Tensor, num_subspaces: int, eps: float
) -> torch.Tensor:
    """The unweighted loss of ``regularizer`` for features ``z`` ``(N, r)`` and factors ``A``, ``B``."""
    if regularizer == "feature":
        return feature_decorrelation(z, eps) + output_cosine_redundancy(z, B, num_subspaces, eps)
    if regularizer == "feature_a":
        return feature_decorrelation(z, eps)
    if regularizer == "feature_b":
        return output_cosine_redundancy(z, B, num_subspaces, eps)
    if regularizer == "weight":
        return weight_overlap(A, B, num_subspaces)
    if regularizer == "none":
        return z.new_zeros((), dtype=torch.float32)
    raise ValueError(f"Unknown ReSoRA regularizer {regularizer!r}.")
