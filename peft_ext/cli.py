"""The ``peft-ext`` console script.

    peft-ext continual [--model PATH_OR_HUB_ID] [--method {lora,resora,ana,moecl}] [--tasks TASKS.json]
                       [--output-dir DIR] [--epochs N] [--batch-size N] [--lr LR] [--seed N] [--max-length N]
                       [--method-config JSON_OR_PRESET]
                       [any TrainingArguments option, e.g. --gradient_accumulation_steps 2]

With no ``--tasks`` and no ``--model`` it trains the embedded default task sequence on the embedded default model,
offline, and prints a summary table. Bad input ends with one line on stderr and exit status 2; a failure while
running ends with one line and exit status 1. In both cases no ``metrics.json`` is written.
"""

from __future__ import annotations

import sys
from typing import NoReturn, Optional, Sequence


USAGE = (
    "usage: peft-ext continual [--model M] [--method {lora,resora,ana,moecl}] [--tasks TASKS.json] "
    "[--output-dir DIR] ..."
)


def _fail(message: str, status: int) -> NoReturn:
    print(f"peft-ext: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(status)


def _parser():
    from transformers import HfArgumentParser

    from peft_ext.trainers import ContinualTrainingArguments

    class _OneLineErrors(HfArgumentParser):
        def error(self, message: str) -> NoReturn:  # argparse prints usage + message; keep it to one line
            _fail(f"{message} (see peft-ext continual --help)", 2)

    return _OneLineErrors(ContinualTrainingArguments, prog="peft-ext continual")


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
    from peft_ext.trainers.strategies import default_method_config, load_method_config

    try:
        (args,) = _parser().parse_args_into_dataclasses(args=list(argv), look_for_args_file=False)
    except ValueError as err:  # TrainingArguments' own validation
        _fail(err, 2)

    try:
        from transformers import AutoConfig, AutoTokenizer

        import peft_ext  # noqa: F401  (registers the methods with PEFT)

        tasks = load_task_stream(args.tasks) if args.tasks else default_task_stream()
        model = args.model or default_model_path()
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
            model_type = AutoConfig.from_pretrained(model).model_type
        except (OSError, ValueError) as err:
            raise TaskStreamError(f"Cannot load model {model!r}: {str(err).splitlines()[0]}") from None
        # The shipped preset of this model family (e.g. moecl-bert), if any, under the user's --method-config keys.
        method_config = {**default_method_config(args.method, model_type), **load_method_config(args.method_config)}
        schedule = ContinualSchedule(tasks, args, model=model, tokenizer=tokenizer, method_config=method_config)
    except (TaskStreamError, ContinualRunError, FileNotFoundError, ValueError, ImportError) as err:
        _fail(err, 2)

    try:
        result = schedule.run()
    except (ContinualRunError, ValueError, NotImplementedError, OSError) as err:
        _fail(f"{type(err).__name__}: {err}", 1)
    if schedule.state.is_main_process:
        print(format_summary(result))
        print(f"wrote {schedule.output_dir / 'metrics.json'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            USAGE + "\n\ncommands:\n  continual   train a PEFT method on a task stream (see peft-ext continual --help)"
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
