"""Configuration of AnA (Adapter-in-Adapter with an MoE gate, from PathWeave, arXiv 2410.20178)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ...routing.selector import SelectorConfigMixin
from ...routing.tasks import ContinualConfigMixin
from ..config_checks import check_layer_selection, check_positive_ints, normalize_module_names


IN_ADAPTER_INITS = ("linear", "identity", "zero")

# The paper's placement in BLIP-2's Q-Former: query/key/value of self- and cross-attention and the attention output
# dense of every layer (not the feed-forward denses). Matches transformers' `Blip2QFormerModel` module names.
QFORMER_TARGET_MODULES = r".*\.(attention|crossattention)\.(attention\.(query|key|value)|output\.dense)$"
# PathWeave's other adapters: plain per-task adapters on the projection from the Q-Former into the LLM, summed
# (`summed_target_modules`). Matches transformers' `Blip2ForConditionalGeneration.language_projection`.
BLIP2_PROJECTION_MODULES = ["language_projection"]


@dataclass
class AnAConfig(SelectorConfigMixin, ContinualConfigMixin, PeftConfig):
    """Configuration of an [`AnAModel`]: one continual learner whose tasks are named inside one PEFT adapter.

    For every targeted linear layer (``W: d_in -> d_out``) and task ``t`` (0-based, in ``task_names`` order):

    * the task's own adapter ``A_t(x) = s_t * up_t(down_t(x))`` (rank ``r``, both projections with biases, no
      activation, learnable scalar ``s_t``);
    * one in-adapter ``F_i^t`` (``r x r`` linear with bias) per earlier task ``i < t``, inserted between the frozen
      ``down_i`` and ``up_i``: the expert ``A_i^t(x) = s_i * up_i(F_i^t(down_i(x)))``;
    * a gate (per token): ``g = softmax over the top-k of x @ W_gate (+ noise while training)``, ``W_gate`` and the
      noise weights ``(d_in, t + 1)`` zero-initialized, and the layer returns ``W x + sum_e g_e * expert_e(x)`` over
      the experts ``[A_0^t, ..., A_{t-1}^t, A_t]``. Task 0 has a single expert and no gate.

    Task ``t``'s trainable parameters are ``A_t``, its in-adapters and its gate; everything of earlier tasks is
    frozen, so training task ``t`` cannot change the outputs of tasks ``< t``. Per targeted layer that is::

        P(t) = r*(d_in + d_out) + r + d_out + 1        # down_t (weight+bias), up_t (weight+bias), s_t
             + t * (r*r + r)                           # F_0^t .. F_{t-1}^t
             + [t > 0] * G * d_in * (t + 1)            # gate (G = 2 with noisy_gating, else 1)

    and the adapter's total after ``T`` tasks is ``sum_{t<T} P(t)`` per layer (see
    :func:`peft_ext.tuners.ana.layer.ana_task_parameter_count`).

    **Summed layers** (``summed_target_modules``): task ``t`` has only its own adapter ``A_t`` (no in-adapters, no
    gate) and the layer returns ``W x + sum_{i<=t} A_i(x)``, the earlier tasks' adapters frozen; ``P(t)`` there is
    the first line of the formula alone. This is PathWeave's placement on BLIP-2's LLM projection
    (``docs/pathweave.md``).

    Args:
        r (`int`):
            Rank of every task adapter and size of the ``r x r`` in-adapters (the paper uses 8).
        scale_init (`float`):
            Initial value of each task's learnable scalar scale ``s_t``.
        in_adapter_init (`str`):
            Initialization of a new task's in-adapters ``F_i^t``: ``"linear"`` (default: PyTorch's default
            ``nn.Linear`` init, as in the reference code), ``"identity"`` (weight = I, bias = 0: the expert starts as
            the plain frozen ``A_i``) or ``"zero"`` (weight = bias = 0: the expert starts as the constant
            ``s_i * up_i.bias``). Measured with ``benchmarks/bench_ana.py --init-study`` (4 digit domains, 40
            samples per task, 5 seeds; mean accuracy of tasks 1-3 right after training them): zero 0.590, linear
            0.579, identity 0.553 (with 60 samples and 3 seeds: 0.670 / 0.668 / 0.660). Identity is worst: each
            expert starts as an earlier task's confident output and interferes with the new task. Linear and zero
            are within noise of each other, so the default stays the reference's choice.
        top_k (`Optional[int]`):
            Number of experts each token is routed to. ``None`` (default, as in the reference): all ``t + 1``
            experts (dense softmax gate). With ``top_k=1`` the chosen expert's gate is always 1, so the gate
            weights get no gradient (only the noise decides): use ``None`` or ``>= 2``. Every expert is still
            computed (unselected ones with gate 0); ``gate_top_k`` is the same gate computing only the selected
            experts.
        gate_top_k (`Optional[int]`):
            Sparse gate: per token only the ``k`` experts (paths) with the highest gate logits are computed, and their
            gates are the softmax over those ``k`` logits (renormalized over the selected paths; the others
            contribute nothing). The (token, path) pairs are grouped by path in blocks and each block gathers its
            path's weights, so the projections cost about ``k`` rank-``r`` adapters whatever the number of tasks; on a
            1-thread CPU the dispatch overhead (sort, gathers, small batched matmuls) still makes it slower than the
            dense gate at 30 tasks (``benchmarks/bench_ana.py``). ``None`` (default): the dense gate, every path
            computed. A task with at most ``gate_top_k`` paths (task ``t`` has ``t + 1``) uses all of them, which is
            the dense gate. Positive integer; not together with ``top_k``. With ``gate_top_k=1`` the chosen path's
            gate is always 1 (the gate weights get no gradient, as with ``top_k=1``).
        noisy_gating (`bool`):
            Add learned Gaussian noise ``N(0, 1) * softplus(x @ W_noise)`` to the gate logits while training
            (Shazeer et al.); the noise weights are trainable gate parameters. Never applied in eval mode.
        target_modules (`Union[list[str], str]`):
            Names (or a regex) of the ``nn.Linear`` / ``Conv1D`` modules to adapt, or ``"all-linear"``. For
            BLIP-2's Q-Former use ``QFORMER_TARGET_MODULES`` (the paper's placement).
        exclude_modules (`Union[list[str], str]`):
            Names (or a regex) of modules not to adapt.
        summed_target_modules (`Union[list[str], str]`):
            Names (or a regex, matched as ``target_modules`` is) of further ``nn.Linear`` / ``Conv1D`` modules that
            get *summed* per-task adapters: task ``t``'s output there is ``W x + sum_{i<=t} s_i * up_i(down_i(x))``,
            with no in-adapters and no gate (shapes as above: ``down_i`` ``d_in -> r``, ``up_i`` ``r -> d_out``).
            A module matching both lists is summed; ``exclude_modules`` applies, ``layers_to_transform`` does not.
            ``None`` (default): no summed layer (adapters saved before this option existed load unchanged). PathWeave
            puts such adapters on BLIP-2's ``language_projection`` (``BLIP2_PROJECTION_MODULES``). A summed layer
            outside every routed tower (BLIP-2's projection sits between the Q-Former and the LLM) follows the
            routing of the tower before it in module order (the Q-Former's), see
            :func:`peft_ext.routing.core.assign_scopes`.
        fan_in_fan_out (`bool`):
            True when the target stores its weight as ``(fan_in, fan_out)`` like GPT-2's ``Conv1D`` (set
            automatically).
        modules_to_save (`list[str]`):
            Modules apart from the adapters to train and save (e.g. a classifier head). They are shared by all tasks.
        init_weights (`bool`):
            True: kaiming-uniform ``down``, zero ``up`` weight and biases, so a new adapter leaves the model
            unchanged. False: random non-zero ``up``, biases, gates and in-adapters (for tests). A config that
            lists several ``task_names`` builds them all at once (as loading does); with True the earlier (frozen)
            tasks then get a random ``up`` weight with zero bias and all in-adapters start at zero, which still
            leaves the model unchanged while giving the last task's in-adapters a gradient.
        layers_to_transform (`Union[list[int], int]`):
            Indices of the layers to adapt (needs a layer pattern the model matches).
        layers_pattern (`Union[list[str], str]`):
            Name of the layer list, used with ``layers_to_transform``.
        task_names (`list[str]`):
            The tasks of this adapter, in training order (filled by ``add_task``; loading rebuilds every task from
            it). Empty: one task named after the adapter.
        routing_token (`str`):
            Which token's features represent a sample for the task selector (``"first"``, ``"mean"``, ``"last"``).
            AnA's gates are per token and do not use it. When the first adapted layer is layer 0's attention, its
            input is the embedding output, where the first (CLS) token is the same vector for every input: use
            ``"mean"`` there (the BERT/ViT/CLIP-vision presets do).
        ended_tasks (`list[str]`):
            Tasks finished with ``end_task`` (bookkeeping, saved so that a reloaded adapter keeps them frozen).
            Every task but the last one is always frozen.
        selector_hidden, selector_quantile, selector_holdout, selector_epochs, selector_lr, selector_batch_size,
        selector_compare, selector_feature_dim, selector_tasks, selector_reference:
            The task selector (DDAS, shared with MoE-CL) used by ``task_ids="auto"``: see
            :class:`peft_ext.routing.selector.SelectorConfigMixin`. The selector is fitted per task with
            ``fit_task_selector`` and saved with the adapter; it is not counted in the trainable parameters.
    """

    r: int = field(default=8, metadata={"help": "Rank of each task adapter and size of the r x r in-adapters."})
    scale_init: float = field(default=1.0, metadata={"help": "Initial value of each task's learnable scale."})
    in_adapter_init: Literal["linear", "identity", "zero"] = field(
        default="linear",
        metadata={
            "help": "Init of the r x r in-adapters: 'linear' (PyTorch default, the reference), 'identity' (expert "
            "starts as the frozen earlier adapter) or 'zero'.",
            "choices": list(IN_ADAPTER_INITS),
        },
    )
    top_k: Optional[int] = field(
        default=None, metadata={"help": "Experts per token; None = all (dense gate, as in the reference)."}
    )
    gate_top_k: Optional[int] = field(
        default=None,
        metadata={"help": "Sparse gate: compute only the k best paths per token; None = dense gate (all paths)."},
    )
    noisy_gating: bool = field(
        default=True, metadata={"help": "Learned gate noise while training (Shazeer's noisy gating)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or regex to adapt (nn.Linear, Conv1D), or 'all-linear'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex not to adapt."}
    )
    summed_target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Further module names or regex to adapt with plain per-task adapters summed over tasks <= t "
            "(no in-adapters, no gate), e.g. BLIP-2's language_projection (PathWeave)."
        },
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True for layers storing weight as (fan_in, fan_out), e.g. GPT-2 Conv1D."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. the classifier head."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: zero up-projection (identity at start). False: random non-identity init (tests)."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Layer list name used with layers_to_transform."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.ANA
        normalize_module_names(self)
        if isinstance(self.summed_target_modules, list):
            self.summed_target_modules = set(self.summed_target_modules)  # as target_modules (PEFT's convention)
        check_positive_ints(self, "r")
        if self.in_adapter_init not in IN_ADAPTER_INITS:
            raise ValueError(f"in_adapter_init must be one of {IN_ADAPTER_INITS}, got {self.in_adapter_init!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise ValueError(f"top_k must be None or a positive integer, got {self.top_k!r}.")
        if self.gate_top_k is not None:
            if isinstance(self.gate_top_k, bool) or not isinstance(self.gate_top_k, int) or self.gate_top_k <= 0:
                raise ValueError(f"gate_top_k must be None or a positive integer, got {self.gate_top_k!r}.")
            if self.top_k is not None:
                raise ValueError("Set either top_k (dense computation) or gate_top_k (sparse computation), not both.")
        check_layer_selection(self)
        self._validate_continual_fields()
        self._validate_selector_fields()
