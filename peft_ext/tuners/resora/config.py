"""Configuration of ReSoRA (Regularized Subspace redundancy of LoRA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..config_checks import check_layer_selection, check_positive_ints, normalize_module_names


REGULARIZERS = ("feature", "feature_a", "feature_b", "weight", "none")


@dataclass
class ReSoRAConfig(PeftConfig):
    """Configuration of a [`ReSoRAModel`]: LoRA whose rank-``r`` factors are split into ``num_subspaces`` equivalent
    subspaces, trained with a de-redundancy regularizer across them.

    The adapter computes ``W x + (lora_alpha / r) * B A x = W x + (lora_alpha / r) * sum_g B_g A_g x`` where ``A_g``
    are the ``r / num_subspaces`` rows of ``A`` and ``B_g`` the matching columns of ``B``. It merges exactly like LoRA.

    Args:
        r (`int`):
            Total rank of the update (sum of the subspaces' ranks). Must be divisible by `num_subspaces`.
        lora_alpha (`int`):
            Scaling numerator: the update is multiplied by `lora_alpha / r`.
        num_subspaces (`int`):
            Number `G` of equivalent subspaces (rank groups) the factors are split into. `1` is plain LoRA with only
            the within-subspace decorrelation term.
        lora_dropout (`float`):
            Dropout on the adapter's input.
        reg_weight (`float`):
            Weight of the de-redundancy loss returned by `get_regularization_loss()` (mean over adapted modules).
            Default 0.1: the terms lie in [0, 1] and 0.1 keeps them a small fraction of a typical task loss.
        regularizer (`str`):
            `"feature"` (default): A-side decorrelation of the subspace features `z_g = A_g x` (standardized
            cross-correlation, off-diagonal entries pushed to 0, Barlow-Twins style) plus B-side squared cosine
            similarity between the subspace outputs `B_g z_g`. `"feature_a"` / `"feature_b"`: one side only.
            `"weight"`: ablation that ignores features and penalizes overlap of the subspaces' weights (squared
            cosine between rows of `A_g` and `A_h`, and between columns of `B_g` and `B_h`). `"none"`: no loss.
        reg_eps (`float`):
            Epsilon of the statistics (standardization, cosine denominators), computed in float32.
        target_modules (`Union[list[str], str]`):
            Names (or regex) of the `nn.Linear` / `Conv1D` modules to adapt, or `"all-linear"`.
        exclude_modules (`Union[list[str], str]`):
            Names (or regex) of modules not to adapt.
        fan_in_fan_out (`bool`):
            True when the target stores its weight as (fan_in, fan_out), like GPT-2's `Conv1D` (set automatically).
        bias (`str`):
            `"none"`, `"all"` or `"resora_only"`: which biases are trained.
        modules_to_save (`list[str]`):
            Modules apart from the adapters to train and save (e.g. a classifier head).
        init_weights (`bool`):
            True: `B = 0`, the model is unchanged before training. False: random `B` (for tests).
        layers_to_transform (`Union[list[int], int]`):
            Indices of the layers to adapt (needs a layer pattern the model matches).
        layers_pattern (`Union[list[str], str]`):
            Name of the layer list, used with `layers_to_transform`.
    """

    r: int = field(default=8, metadata={"help": "Total rank of the update; divisible by num_subspaces."})
    lora_alpha: int = field(default=8, metadata={"help": "Scaling numerator: update scaled by lora_alpha / r."})
    num_subspaces: int = field(default=2, metadata={"help": "Number of equivalent subspaces (rank groups)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    reg_weight: float = field(
        default=0.1, metadata={"help": "Weight of the de-redundancy loss (mean over adapted modules)."}
    )
    regularizer: Literal["feature", "feature_a", "feature_b", "weight", "none"] = field(
        default="feature",
        metadata={"help": "De-redundancy variant.", "choices": list(REGULARIZERS)},
    )
    reg_eps: float = field(default=1e-5, metadata={"help": "Epsilon of the float32 statistics."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or regex to adapt (nn.Linear, Conv1D), or 'all-linear'."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex not to adapt."}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True for layers storing weight as (fan_in, fan_out), e.g. GPT-2 Conv1D."}
    )
    bias: str = field(default="none", metadata={"help": "Bias to train: 'none', 'all' or 'resora_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. the classifier head."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: B = 0 (identity at start). False: random B (testing)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Layer list name used with layers_to_transform."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.RESORA
        normalize_module_names(self)
        check_positive_ints(self, "r", "num_subspaces")
        if self.r % self.num_subspaces != 0:
            raise ValueError(f"r ({self.r}) must be divisible by num_subspaces ({self.num_subspaces}).")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight!r}.")
        if self.reg_eps <= 0:
            raise ValueError(f"reg_eps must be > 0, got {self.reg_eps!r}.")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}.")
        if self.bias not in ("none", "all", "resora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'resora_only', got {self.bias!r}.")
        check_layer_selection(self)
