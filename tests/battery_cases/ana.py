"""AnA cases for PEFT's own test battery (``python -m tests.peft_battery.runner tests/battery_cases/ana.py``).

Single-task cases are plain linear adapters and merge exactly, so PEFT's merge tests run and must pass for them.
Multi-task cases (``task_names`` with several entries: the adapter is built with every task, the last one
trainable) are per-token gated mixtures; AnA refuses to merge them by design, so exactly PEFT's merge tests of
those cases are declared as expected failures below.
"""

from peft_ext import AnAConfig


CASES = [
    ("Vanilla MLP 1 AnA", "MLP", AnAConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 2 AnA", "MLP", AnAConfig, {"target_modules": ["lin0", "lin1"], "r": 4}),
    ("Vanilla MLP 3 AnA no noise", "MLP", AnAConfig, {"target_modules": ["lin1"], "noisy_gating": False}),
    ("EmbConv1D AnA", "EmbConv1D", AnAConfig, {"target_modules": ["conv1d"]}),
    # several tasks, built at once from task_names (the last one trainable, earlier ones frozen)
    (
        "MLP AnA 3 tasks",
        "MLP",
        AnAConfig,
        {"target_modules": ["lin0"], "task_names": ["a", "b", "c"]},
    ),
    (
        "MLP AnA 3 tasks top-2 linear",
        "MLP",
        AnAConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "task_names": ["a", "b", "c"],
            "top_k": 2,
            "in_adapter_init": "linear",
        },
    ),
]

MULTI_ADAPTER_CASES = [
    (
        "AnA Same",
        "ana",
        AnAConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "AnA Different",
        "ana",
        AnAConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
    (
        "AnA 2 tasks",
        "ana",
        AnAConfig,
        {"target_modules": ["lin0"], "init_weights": False, "task_names": ["a", "b"]},
        {"target_modules": ["lin0"], "init_weights": False, "task_names": ["c", "d"]},
    ),
]

_MERGE_REFUSED = (
    "AnA refuses to merge a multi-task adapter: its output is a per-token gated mixture of experts that depends on "
    "the input (merge_and_unload raises ValueError by design)."
)

# PEFT tests that merge (directly, or as one step of a float16/bfloat16/disable/delete check) and therefore stop on
# the refusal for the multi-task cases. The single-task cases run the very same tests and pass.
_MERGING_TESTS = (
    "test_merge_layers",
    "test_merge_layers_fp16",
    "test_merge_layers_is_idempotent",
    "test_merge_layers_is_deterministic_in_train_mode",
    "test_safe_merge",
    "test_forward_float16",
    "test_forward_bfloat16",
    "test_forward_float16_no_autocast",
    "test_forward_bfloat16_no_autocast",
    "test_disable_adapters_with_merging",
    "test_delete_merged_adapter_raises_without_mutation",
    "test_delete_merged_adapter_only_rejects_the_merged_one",
)
_MULTI_TASK_CASES = ("MLP AnA 3 tasks", "MLP AnA 3 tasks top-2 linear")
_MULTI_ADAPTER_MERGING_TESTS = (
    "test_multiple_active_adapters_merge_and_unmerge",
    "test_merge_layers_multi",
    "test_sequential_merge_matches_batch_merge",
    "test_unmerge_after_sequential_merge_restores_base",
)


def _exact(test_id: str, case: str) -> str:
    """fnmatch pattern matching exactly ``test_id[case]`` (``[`` starts a character class in fnmatch)."""
    return f"{test_id}[[]{case}]"


EXPECTED_FAILURES: dict[str, str] = {
    **{
        _exact(f"TestPeftCustomModel::{test}", case): _MERGE_REFUSED
        for test in _MERGING_TESTS
        for case in _MULTI_TASK_CASES
    },
    **{
        _exact(f"TestMultipleActiveAdapters::{test}", "AnA 2 tasks"): _MERGE_REFUSED
        for test in _MULTI_ADAPTER_MERGING_TESTS
    },
}
