"""The tuners (PEFT methods) of peft-ext, one subpackage each in PEFT's layout: config.py, layer.py, model.py."""

from peft import LoraConfig, LoraModel

from ..registry import register_method


def describe_lora(config: LoraConfig) -> str:
    """``config``'s main settings in words (the preset catalogue, model cards)."""
    return f"r={config.r}, alpha {config.lora_alpha:g}"


# PEFT's own method: described for peft-ext's tools (its registration with PEFT is left as it is).
register_method(
    "lora",
    config_cls=LoraConfig,
    model_cls=LoraModel,
    display_name="LoRA",
    summary="low-rank adapters, PEFT's own LoRA (arXiv 2106.09685)",
    describe=describe_lora,
)
