"""Noisy top-k gating (Shazeer et al., 2017, "Outrageously Large Neural Networks"), shared by AnA and MoE-CL.

``logits = x @ W_gate`` (+ ``N(0, 1) * softplus(x @ W_noise)`` while training); the top ``k`` logits per row are
soft-maxed and scattered back, the other experts get gate 0. With ``k`` equal to the number of experts this is
the dense noisy softmax gate AnA uses. Both weight matrices are zero-initialized by the methods, so at init every
expert gets the same gate (``1/k`` on the first ``k`` experts in eval mode).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class GateOutput(NamedTuple):
    """Top-k routing of ``N`` rows over ``E`` experts."""

    top_gates: torch.Tensor  # (N, k): softmax over the selected experts, in the order of top_indices
    top_indices: torch.Tensor  # (N, k): selected experts, by decreasing logit
    logits: torch.Tensor  # (N, E): the (noisy while training) logits the selection was made on

    @property
    def gates(self) -> torch.Tensor:
        """``(N, E)``: ``top_gates`` scattered over all experts, 0 for unselected ones; rows sum to 1 (or 0).

        Built on access: the sparse dispatch only needs ``top_gates``/``top_indices``; statistics, balance loss
        and dense dispatch use this form.
        """
        if self.top_gates.shape[-1] == self.logits.shape[-1]:
            return self.top_gates  # dense gating keeps the expert order (top_indices is arange)
        return torch.zeros_like(self.logits).scatter(-1, self.top_indices, self.top_gates)


def noisy_top_k_gating(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: Optional[torch.Tensor],
    k: int,
    training: bool,
    noise_epsilon: float = 1e-2,
    expert_mask: Optional[torch.Tensor] = None,
    router_index: Optional[torch.Tensor] = None,
) -> GateOutput:
    """Gate ``x`` ``(N, d)`` over ``E`` experts with ``w_gate``/``w_noise`` ``(d, E)``; noise only if ``training``.

    Several routers: ``w_gate``/``w_noise`` ``(R, d, E)`` and ``router_index`` ``(N,)`` long, the router of each
    row (e.g. per-sample tasks, MoE-CL).
    ``expert_mask`` (``(E,)`` or ``(N, E)`` bool, optional): experts a row may use; the others get logit ``-inf``
    and gate 0. A row with fewer than ``k`` allowed experts spreads over the allowed ones; a row with none gets
    all-zero gates.

    Computed in float32 whatever the input dtype, so that the top-k choice does not depend on half-precision
    rounding; the gates are returned in float32.
    """
    x = x.float()
    clean_logits = _project(x, w_gate, router_index)
    if training and w_noise is not None:
        noise_std = F.softplus(_project(x, w_noise, router_index)) + noise_epsilon
        # drawn in (N, E) row order whatever the logits' memory layout (randn_like would follow it: another draw)
        noise = torch.randn(clean_logits.shape, dtype=clean_logits.dtype, device=clean_logits.device)
        logits = clean_logits + noise * noise_std
    else:
        logits = clean_logits
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask.to(torch.bool), float("-inf"))
    num_experts = logits.shape[-1]
    k = max(1, min(k, num_experts))
    if k == num_experts:
        # dense: no selection, keep the expert order
        gates = torch.softmax(logits, dim=-1)
        if expert_mask is not None:
            gates = torch.nan_to_num(gates, nan=0.0)  # rows with no allowed expert
        top_indices = torch.arange(num_experts, device=x.device).expand(logits.shape[0], -1)
        return GateOutput(gates, top_indices, logits)
    top_logits, top_indices = logits.topk(k, dim=-1)
    top_gates = torch.softmax(top_logits, dim=-1)
    if expert_mask is not None:
        top_gates = torch.nan_to_num(top_gates, nan=0.0)  # rows with no allowed expert
    return GateOutput(top_gates, top_indices, logits)


def _project(x: torch.Tensor, w: torch.Tensor, router_index: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` ``(N, d)`` times a shared ``(d, E)`` matrix, or times row ``n``'s own ``w[router_index[n]]`` of an
    ``(R, d, E)`` stack, in float32 -> ``(N, E)``."""
    w = w.float()
    if w.dim() == 2:
        # as (w^T x^T)^T: the same product, but the BLAS kernels for a wide output with few rows are up to 3x faster
        # on the CPU than those for many rows of few (E) columns (E = 30, 512 rows: 123 vs 204 us); (N, E) view
        return (w.t() @ x.t()).t()
    if router_index is None:
        raise ValueError("Several routers ((R, d, E) weights) need router_index, the router of each row.")
    if router_index.numel() < w.shape[0]:  # fewer rows than routers: each row's own router, gathered
        return torch.bmm(x.unsqueeze(1), w.index_select(0, router_index)).squeeze(1)
    # every router on every row (one batched matmul, no per-row weight copy), then each row's own router
    all_logits = torch.matmul(x.unsqueeze(0), w)  # (R, N, E)
    index = router_index.view(1, -1, 1).expand(1, -1, w.shape[-1])
    return all_logits.gather(0, index).squeeze(0)


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation of a 1-D tensor (0 for fewer than two entries)."""
    values = values.float()
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + eps)


def load_balancing_loss(gates: torch.Tensor) -> torch.Tensor:
    """Shazeer's auxiliary balance loss: ``cv²(importance) + cv²(load)`` for gates ``(N, E)``.

    importance = summed gate mass per expert (differentiable); load = number of rows routed to each expert.
    """
    importance = gates.sum(dim=0)
    load = (gates > 0).sum(dim=0).to(gates.dtype)
    return cv_squared(importance) + cv_squared(load)
