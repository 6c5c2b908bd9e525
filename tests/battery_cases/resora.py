"""PEFT battery cases for ReSoRA (see tests/peft_battery; table formats in tests/peft_battery/cases.py)."""

from peft_ext import ReSoRAConfig


CASES = [
    ("Vanilla MLP 1 ReSoRA", "MLP", ReSoRAConfig, {"target_modules": ["lin0"], "r": 4, "num_subspaces": 2}),
    ("Vanilla MLP 2 ReSoRA", "MLP", ReSoRAConfig, {"target_modules": ["lin0", "lin1"], "r": 4, "num_subspaces": 4}),
    (
        "Vanilla MLP 3 ReSoRA dropout",
        "MLP",
        ReSoRAConfig,
        {"target_modules": ["lin1"], "r": 6, "num_subspaces": 3, "lora_dropout": 0.1},
    ),
    ("Vanilla MLP 6 ReSoRA weight reg", "MLP", ReSoRAConfig, {"target_modules": ["lin0"], "regularizer": "weight"}),
    (
        "Vanilla MLP 7 ReSoRA modules_to_save",
        "MLP",
        ReSoRAConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    ),
    ("Embedding + transformers Conv1D ReSoRA", "EmbConv1D", ReSoRAConfig, {"target_modules": ["conv1d"]}),
    ("Conv2d model, lin0 ReSoRA", "Conv2d", ReSoRAConfig, {"target_modules": ["lin0"]}),
]

MULTI_ADAPTER_CASES = [
    (
        "ReSoRA same",
        "resora",
        ReSoRAConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "ReSoRA different",
        "resora",
        ReSoRAConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
]

EXPECTED_FAILURES: dict[str, str] = {}
