"""Configuration of MoE-CL (mixture-of-experts adapters for continual learning, arXiv 2403.11549)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ...routing.experts import DISPATCH_MODES
from ...routing.selector import SelectorConfigMixin
from ...routing.tasks import ContinualConfigMixin
from ..config_checks import check_positive_ints, normalize_module_names


ATTACH_MODES = ("auto", "parallel", "residual")


@dataclass
class MoECLConfig(SelectorConfigMixin, ContinualConfigMixin, PeftConfig):
    """Configuration of a [`MoECLModel`]: a pool of bottleneck experts beside each adapted block's MLP, one noisy
    top-k router per task, activate-freeze of the most used experts after each task, and the DDAS task selector.

    Paper defaults (CLIP ViT-B/16 in MoE-Adapters4CL): 22 experts, r = 64, top-2 routing, 2 experts frozen per
    task, output scale 0.1, dropout 0.1.

    Args:
        num_experts (`int`):
            Experts per adapted module (paper: 22). Shared by all tasks of the adapter.
        r (`int`):
            Bottleneck size of each expert (paper: 64).
        top_k (`int`):
            Experts per sample (paper: 2). The softmax runs over the selected k logits only.
        freeze_top_k (`int`):
            At `end_task`, the `freeze_top_k` experts of each module most often selected during that task's training
            forwards are frozen for good (paper: 2). 0 disables activate-freeze.
        scaling (`float`):
            Multiplier of the mixture's output (paper: 0.1).
        expert_dropout (`float`):
            Dropout on each expert's bottleneck activations (paper: 0.1).
        noisy_gating (`bool`):
            Add learned Gaussian noise `N(0,1) * (softplus(x @ W_noise) + noise_epsilon)` to the router logits while
            training (Shazeer et al.); never in eval mode.
        noise_epsilon (`float`):
            Minimum noise standard deviation of noisy gating.
        isolate_finished_tasks (`bool`):
            Improvement over the paper. False (paper): a finished task's router keeps choosing among all experts,
            so it drifts when later tasks train experts it uses. True: a finished task's router is restricted to
            the experts frozen at or before its end, so its outputs never change afterwards (zero forgetting, at
            the price of losing whatever it routed to unfrozen experts).
        balance_loss_weight (`float`):
            Weight of Shazeer's load-balancing loss `cv^2(importance) + cv^2(load)` returned by
            `get_regularization_loss()` (computed but unused in the paper's code, scale 1e-2 there). 0 = off.
        attach_mode (`str`):
            Where the experts read and write. `"parallel"`: experts get the target module's first input and their
            output is added to its output (e.g. Llama/CLIP `mlp`, or a plain `nn.Linear`). `"residual"`: for
            modules called as `module(hidden_states, input_tensor)` (BERT/RoBERTa/ViT `*Output`, which hold the
            MLP's second linear and the residual sum): experts read `input_tensor` -- the block's post-attention
            residual stream -- and their output joins the residual sum (added to `input_tensor` before the module
            runs, i.e. inside BERT's post-residual LayerNorm, exactly parallel to the MLP). `"auto"`: residual when
            the module's forward has an `input_tensor` parameter, else parallel.
        dispatch (`str`):
            How the routed experts are computed: `"gather"` (batched: the selected experts' weights are gathered
            per sample and applied with two batched matmuls), `"dense"` (all experts on all tokens, gates zero
            elsewhere) or `"loop"` (the reference's per-expert Python loop; a baseline, slow).
        target_modules (`Union[list[str], str]`):
            The modules to run the experts beside (see `attach_mode`). Defaults per model type: BERT/RoBERTa/ViT
            `*.layer.N.output`, CLIP / Llama / Mistral / Qwen2 / GPT-2 `mlp`, DistilBERT `ffn`.
        exclude_modules (`Union[list[str], str]`):
            Names (or regex) of modules not to adapt.
        modules_to_save (`list[str]`):
            Modules apart from the adapters to train and save (e.g. a classifier head; shared by all tasks).
        init_weights (`bool`):
            True: zero up-projections, the model is unchanged before training. False: random up-projections and
            router weights (tests).
        task_names (`list[str]`):
            The tasks of this adapter, in training order (see `ContinualConfigMixin`).
        routing_token (`str`):
            Token whose features route a sample and feed the task selector: `"first"` (CLS; encoders), `"mean"` or
            `"last"` (decoder LMs). In `generate`, the task stays the one picked on the prompt while the experts are
            routed again at each decoding step, from its new token (the prompt's tokens keep their cached route).
        ended_tasks (`list[str]`):
            Tasks finished with `end_task` (bookkeeping): their routers are frozen.
    """

    num_experts: int = field(default=22, metadata={"help": "Experts per adapted module (paper: 22)."})
    r: int = field(default=64, metadata={"help": "Bottleneck size of each expert (paper: 64)."})
    top_k: int = field(default=2, metadata={"help": "Experts selected per sample (paper: 2)."})
    freeze_top_k: int = field(
        default=2, metadata={"help": "Most activated experts frozen per module at the end of each task (paper: 2)."}
    )
    scaling: float = field(default=0.1, metadata={"help": "Output scale of the expert mixture (paper: 0.1)."})
    expert_dropout: float = field(default=0.1, metadata={"help": "Dropout inside each expert (paper: 0.1)."})
    noisy_gating: bool = field(default=True, metadata={"help": "Learned router noise while training."})
    noise_epsilon: float = field(default=1e-2, metadata={"help": "Minimum std of the router noise."})
    isolate_finished_tasks: bool = field(
        default=False,
        metadata={"help": "Restrict finished tasks' routers to experts frozen by their end (zero forgetting)."},
    )
    balance_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the load-balancing loss in get_regularization_loss() (0 = off)."}
    )
    attach_mode: Literal["auto", "parallel", "residual"] = field(
        default="auto",
        metadata={"help": "Where experts read/write: 'parallel', 'residual' or 'auto'.", "choices": list(ATTACH_MODES)},
    )
    dispatch: Literal["gather", "dense", "loop"] = field(
        default="gather",
        metadata={
            "help": "Expert computation: 'gather' (batched), 'dense' or 'loop'.",
            "choices": list(DISPATCH_MODES),
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules to run the experts beside (the block MLP, or an nn.Linear)."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex not to adapt."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. the classifier head."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: zero up-projections (identity at start). False: random (tests)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.MOECL
        normalize_module_names(self)
        check_positive_ints(self, "num_experts", "r", "top_k")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts}).")
        if not isinstance(self.freeze_top_k, int) or not 0 <= self.freeze_top_k <= self.num_experts:
            raise ValueError(f"freeze_top_k must be an integer in [0, num_experts], got {self.freeze_top_k!r}.")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout!r}.")
        if self.noise_epsilon < 0:
            raise ValueError(f"noise_epsilon must be >= 0, got {self.noise_epsilon!r}.")
        if self.balance_loss_weight < 0:
            raise ValueError(f"balance_loss_weight must be >= 0, got {self.balance_loss_weight!r}.")
        if self.attach_mode not in ATTACH_MODES:
            raise ValueError(f"attach_mode must be one of {ATTACH_MODES}, got {self.attach_mode!r}.")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}.")
        self._validate_continual_fields()
        self._validate_selector_fields()
