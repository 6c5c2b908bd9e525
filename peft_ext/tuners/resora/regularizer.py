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

    ``z`` ``(N, r)`` -> scalar. Each feature is centered and divided by its (population) standard deviation over
    the ``N`` samples, ``C = z_hat^T z_hat / N`` ``(r, r)`` has a unit diagonal, and the loss is
    ``sum_{i != j} C_ij^2 / (r (r - 1))``: 0 when all features (across and within subspaces) are uncorrelated,
    1 when they are all perfectly (anti-)correlated (Barlow Twins' redundancy-reduction term, normalized).
    """
    z = z.float()
    n, r = z.shape
    if n < 2 or r < 2:
        return z.new_zeros(())
    centered = z - z.mean(dim=0, keepdim=True)
    z_hat = centered / (centered.pow(2).mean(dim=0, keepdim=True) + eps).sqrt()
    corr = z_hat.T @ z_hat / n
    off_diagonal = corr - torch.diag_embed(corr.diagonal())
    return off_diagonal.pow(2).sum() / (r * (r - 1))


def subspace_output_gram(z: torch.Tensor, B: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """Inner products ``<o_g, o_h>`` of the subspace outputs per sample: ``(N, G, G)``.

    Computed as ``z_g^T (B_g^T B_h) z_h`` from the ``(r, r)`` matrix ``B^T B``: ``O(N r^2 + out r^2)`` instead of
    materializing the ``(N, G, out)`` outputs, which matters because ``out`` >> ``r``.
    """
    z = z.float()
    B = B.float()
    n, r = z.shape
    k = r // num_subspaces
    btb = (B.T @ B).view(r, num_subspaces, k)  # [i, h, j] = (B^T B)[i, h*k + j]
    z_groups = z.view(n, num_subspaces, k)
    # q[n, i, h] = sum_{j in subspace h} (B^T B)[i, j] z[n, j]
    q = torch.einsum("ihj,nhj->nih", btb, z_groups)
    # gram[n, g, h] = sum_{i in subspace g} z[n, i] q[n, i, h]
    return torch.einsum("ngi,ngih->ngh", z_groups, q.view(n, num_subspaces, k, num_subspaces))


def output_cosine_redundancy(z: torch.Tensor, B: torch.Tensor, num_subspaces: int, eps: float = 1e-8) -> torch.Tensor:
    """B-side term: mean over samples and subspace pairs ``g < h`` of ``cos^2(o_g, o_h)``.

    ``z`` ``(N, r)``, ``B`` ``(out, r)`` -> scalar. 0 when the subspaces write to orthogonal output directions for
    every input, 1 when they write along the same line. With ``B = 0`` (init) every output is 0 and so is the term.
    """
    if num_subspaces < 2 or z.shape[0] == 0:
        return z.new_zeros((), dtype=torch.float32)
    gram = subspace_output_gram(z, B, num_subspaces)
    sq_norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0)  # (N, G)
    rows, cols = torch.triu_indices(num_subspaces, num_subspaces, offset=1, device=z.device)
    # cos^2 = <o_g, o_h>^2 / (|o_g|^2 |o_h|^2), without a square root: sqrt has an infinite gradient at 0, and
    # every output is 0 at init (B = 0).
    denominators = (sq_norms[:, rows] * sq_norms[:, cols]).clamp_min(eps * eps)
    return (gram[:, rows, cols].pow(2) / denominators).mean()


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
