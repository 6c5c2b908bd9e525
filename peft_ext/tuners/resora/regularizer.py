"""The de-redundancy terms of ReSoRA, as pure functions of the adapter's features and weights.

Notation: a ReSoRA adapter of rank ``r`` with ``G`` subspaces of rank ``k = r / G`` has factors ``A`` ``(r, in)``
and ``B`` ``(out, r)``; subspace ``g`` owns rows ``g*k:(g+1)*k`` of ``A`` and the same columns of ``B``. For
``N`` input vectors (tokens), ``z = A x`` ``(N, r)`` are the subspace features and ``o_g = B_g z_g`` ``(N, out)``
the subspace outputs, whose sum is the adapter's (unscaled) output.

Every term lies in ``[0, 1]`` (``"feature"``, the sum of the A- and B-side terms, in ``[0, 2]``), is finite with
finite gradients for finite inputs whose second moments fit in float32, and is computed in float32. ``mask``
``(N,)`` (True / nonzero = real token) restricts the feature statistics to the real tokens (padding excluded); it
does not change the shapes, so nothing waits for the device.

Why the bounds hold in float32 too: the variances come from centred features (two passes: mean, then moments), so
they are sums of squares and never negative -- the one-pass ``E[z z^T] - mu mu^T`` cancels catastrophically when
``|mu| >> std`` and can go negative, i.e. NaN after ``rsqrt``. Cauchy-Schwarz (``cov_ij^2 <= v_i v_j``, and
``<o_g, o_h>^2 <= |o_g|^2 |o_h|^2``) can still be broken by rounding by a few ulps, so each squared correlation /
cosine is clamped to 1; a float32 sum of ``m`` values in ``[0, 1]`` is at most ``m`` (rounding is monotone), so the
means stay in ``[0, 1]``. Autocast is switched off inside: under fp16 autocast the moments' matmul would square
features in float16, which overflows from ``|z| ~ 256`` on.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F


# A feature whose spread is within a few float32 ulps of its mean is constant as far as float32 can tell: centring
# it leaves only the rounding of the mean (~ulp(mu) = 1.2e-7 |mu|), which standardization would blow up to +-1
# correlations. Variances get a floor of (16 * 1.2e-7 * mu)^2 besides eps (a relative 2e-6 of the mean: no effect
# on features that actually vary).
_ROUNDING_FLOOR = (16 * torch.finfo(torch.float32).eps) ** 2


def _float32(t: torch.Tensor):
    """Context: autocast off on ``t``'s device (the statistics stay float32 inside ``torch.autocast``). Entered only
    when autocast is on: the context itself costs tens of microseconds per call on CPU, a few percent of the
    regularizer."""
    device_type = t.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _tokens(z: torch.Tensor, mask: Optional[torch.Tensor]):
    """``(z in float32 with padded rows zeroed, (N, 1) float weights or None, number of real tokens)``."""
    z = z.float()
    if mask is None:
        return z, None, z.shape[0]
    keep = mask.reshape(-1, 1)
    if keep.dtype != torch.bool:
        keep = keep != 0
    weights = keep.float()
    # where, not a product: a non-finite value in the padding must not reach the statistics or their gradients
    return torch.where(keep, z, 0.0), weights, weights.sum()


def _feature_decorrelation(z: torch.Tensor, weights, count, eps: float) -> torch.Tensor:
    n, r = z.shape
    if n < 2 or r < 2:
        return z.new_zeros(())
    if weights is None:
        mean = z.mean(dim=0)
        centred = z - mean
    else:
        count = count.clamp_min(1.0)
        mean = z.sum(dim=0) / count  # padded rows are 0
        centred = (z - mean) * weights
    cov = centred.T @ centred / count
    # sums of squares, >= 0 -- clamped anyway: split-precision matmuls (e.g. 3xTF32) can round them below 0
    var = cov.diagonal().clamp_min(0.0) + eps
    m = mean.detach()
    inv_std = torch.addcmul(var, m, m, value=_ROUNDING_FLOOR).rsqrt()
    corr_sq = (cov * torch.outer(inv_std, inv_std)).square().clamp_max(1.0)
    # the strict upper triangle (C is symmetric): no diagonal to subtract, which would cancel down to below 0
    return torch.triu(corr_sq, diagonal=1).sum() / (r * (r - 1) // 2)


def feature_decorrelation(z: torch.Tensor, eps: float = 1e-8, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A-side term: mean squared off-diagonal entry of the standardized cross-correlation of ``z``.

    ``z`` ``(N, r)`` -> scalar. With per-feature means ``mu`` and (population) variances ``v`` over the ``N``
    samples (the real tokens, with ``mask``), ``C_ij = cov_ij / sqrt((v_i + eps) (v_j + eps))`` ``(r, r)`` (unit
    diagonal up to ``eps``), and the loss is ``sum_{i != j} C_ij^2 / (r (r - 1))``: 0 when all features (across and
    within subspaces) are uncorrelated, 1 when they are all perfectly (anti-)correlated (Barlow Twins'
    redundancy-reduction term, normalized). Features constant up to float32 rounding count as uncorrelated.

    Computed from the ``(r, r)`` second moments of the centred features, never materializing a standardized copy
    of ``z``: the ``O(N)`` work is one mean, one subtraction and one ``z^T z``, which keeps the overhead small.
    """
    with _float32(z):
        return _feature_decorrelation(*_tokens(z, mask), eps)


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
    with _float32(z):
        inner = _SubspaceInnerProducts(z, B, num_subspaces)
        g_range = range(num_subspaces)
        return torch.stack([torch.stack([inner(g, h) for h in g_range], -1) for g in g_range], dim=1)


def _output_cosine_redundancy(z: torch.Tensor, weights, count, B: torch.Tensor, num_subspaces: int, eps: float):
    if num_subspaces < 2 or z.shape[0] == 0:
        return z.new_zeros((), dtype=torch.float32)
    inner = _SubspaceInnerProducts(z, B, num_subspaces)  # only the pairs g < h and the norms are needed
    # |o_g|^2 clamped at eps: the gram trick can round a norm of ~0 below 0, and with B = 0 (init) all are 0
    sq_norms = [inner(g, g).clamp_min(eps) for g in range(num_subspaces)]
    # cos^2 = <o_g, o_h>^2 / (|o_g|^2 |o_h|^2) without a square root (infinite gradient at 0, where every output is
    # at init), as (<o_g, o_h> / |o_g|^2) (<o_g, o_h> / |o_h|^2): the 4th power of the outputs never forms (it
    # overflows float32 from |o| ~ 4e9 on)
    terms = [
        ((inner_gh / sq_norms[g]) * (inner_gh / sq_norms[h])).clamp_max(1.0)
        for g in range(num_subspaces)
        for h in range(g + 1, num_subspaces)
        for inner_gh in (inner(g, h),)
    ]
    cos_sq = torch.stack(terms)  # (pairs, N)
    if weights is None:
        return cos_sq.mean()
    # a padded row of z is 0, so its inner products are exactly 0 and so are its cos^2: only the count changes
    return cos_sq.sum() / (count.clamp_min(1.0) * len(terms))


def output_cosine_redundancy(
    z: torch.Tensor, B: torch.Tensor, num_subspaces: int, eps: float = 1e-8, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """B-side term: mean over samples (the real tokens, with ``mask``) and subspace pairs ``g < h`` of
    ``cos^2(o_g, o_h)``.

    ``z`` ``(N, r)``, ``B`` ``(out, r)`` -> scalar. 0 when the subspaces write to orthogonal output directions for
    every input, 1 when they write along the same line. With ``B = 0`` (init) every output is 0 and so is the term.
    A squared output norm below ``eps`` counts as ``eps`` (an output that small pulls its cosines towards 0).
    """
    with _float32(z):
        return _output_cosine_redundancy(*_tokens(z, mask), B, num_subspaces, eps)


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
    with _float32(A):
        a_rows = F.normalize(A.float(), dim=1)
        b_cols = F.normalize(B.float(), dim=0)
        # cos^2 of unit vectors can round to just above 1
        a_term = (a_rows @ a_rows.T)[mask].square().clamp_max(1.0).mean()
        b_term = (b_cols.T @ b_cols)[mask].square().clamp_max(1.0).mean()
    return 0.5 * (a_term + b_term)


def redundancy_terms(
    regularizer: str,
    z: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    num_subspaces: int,
    eps: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The unweighted loss of ``regularizer`` for features ``z`` ``(N, r)`` and factors ``A``, ``B``; ``mask``
    ``(N,)`` selects the real tokens of ``z`` (default: all)."""
    if regularizer in ("feature", "feature_a", "feature_b"):
        with _float32(z):
            tokens = _tokens(z, mask)
            if regularizer == "feature_a":
                return _feature_decorrelation(*tokens, eps)
            b_side = _output_cosine_redundancy(*tokens, B, num_subspaces, eps)
            return b_side if regularizer == "feature_b" else _feature_decorrelation(*tokens, eps) + b_side
    if regularizer == "weight":
        return weight_overlap(A, B, num_subspaces)
    if regularizer == "none":
        return z.new_zeros((), dtype=torch.float32)
    raise ValueError(f"Unknown ReSoRA regularizer {regularizer!r}.")
