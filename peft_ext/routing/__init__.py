"""Machinery shared by the routed continual methods (AnA, MoE-CL): task bookkeeping and per-forward routing,
noisy gating, and the task selector (DDAS)."""
