"""RegularizedTrainer: the regularizer is added, logged apart, invariant to gradient accumulation, found through
accelerate/DDP wrappers; a plain Trainer on a regularized model warns."""

import math
import os
import warnings

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

from peft_ext.trainers import RegularizedTrainer, regularization_loss_of


LAMBDA = 0.5


class RegModel(nn.Module):
    """Linear classifier whose regularizer is LAMBDA * ||W||^2 (depends on parameters only, not on the batch).

    Task loss: mean cross-entropy over the batch (Trainer then divides by the accumulation steps).
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.linear(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    def get_regularization_loss(self):
        return LAMBDA * self.linear.weight.pow(2).sum()


class ScaledRegModel(RegModel):
    """Same, but accepts ``num_items_in_batch`` (like HF LMs) and normalizes its loss over the accumulated batch:
    Trainer does *not* divide its loss by the accumulation steps."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.linear(x)
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        loss = loss / num_items_in_batch if num_items_in_batch is not None else loss / labels.numel()
        return {"loss": loss, "logits": logits}


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"x": torch.randn(n, 4, generator=g).tolist(), "labels": (torch.arange(n) % 3).tolist()})


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        max_grad_norm=0.0,  # no clipping: the update is exactly -lr * grad
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _expected_weight(model_cls, data):
    """One SGD step on the full 8-sample batch by hand: W - lr * grad(mean CE + LAMBDA ||W||^2)."""
    m = model_cls()
    x, y = torch.tensor(data["x"]), torch.tensor(data["labels"])
    loss = nn.functional.cross_entropy(m.linear(x), y) + m.get_regularization_loss()
    loss.backward()
    return (m.linear.weight - 0.1 * m.linear.weight.grad).detach()


@pytest.mark.parametrize("model_cls", [RegModel, ScaledRegModel], ids=["trainer-divides", "loss-pre-scaled"])
@pytest.mark.parametrize("batch, accum", [(8, 1), (4, 2), (2, 4)])
def test_regularizer_weight_invariant_to_gradient_accumulation(tmp_path, model_cls, batch, accum):
    data = _data()
    model = model_cls()
    trainer = RegularizedTrainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accum),
        train_dataset=data,
    )
    assert trainer.model_accepts_loss_kwargs == (model_cls is ScaledRegModel)
    trainer.train()
    # Same 8 samples in the one optimizer step whatever the split: the update must equal the hand-computed one.
    torch.testing.assert_close(model.linear.weight.detach(), _expected_weight(model_cls, data), rtol=1e-5, atol=1e-6)


def test_without_the_regularizer_the_update_differs(tmp_path):
    # Guards the test above: plain Trainer ignores the regularizer, so its update must NOT match the expected one.
    data = _data()
    model = RegModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=_args(tmp_path, per_device_train_batch_size=8), train_dataset=data).train()
    assert not torch.allclose(model.linear.weight.detach(), _expected_weight(RegModel, data), atol=1e-4)


def test_task_and_reg_losses_logged_separately(tmp_path):
    data = _data(16)
    model = RegModel()
    trainer = RegularizedTrainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=4, max_steps=4, logging_steps=2),
        train_dataset=data,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == 2
    for h in logs:
        assert h["reg_loss"] > 0 and h["task_loss"] > 0
        assert h["loss"] == pytest.approx(h["task_loss"] + h["reg_loss"], abs=1e-3)
    # The reg term of the first window is LAMBDA * ||W||^2 at (nearly) the start weights.
    start = RegModel().get_regularization_loss().item()
    assert logs[0]["reg_loss"] == pytest.approx(start, rel=0.2)


def test_model_without_regularizer_trains_as_plain_trainer(tmp_path):
    class Plain(RegModel):
        get_regularization_loss = None

    model = Plain()
    assert regularization_loss_of(model) is None
    trainer = RegularizedTrainer(model=model, args=_args(tmp_path, max_steps=2, logging_steps=1), train_dataset=_data())
    trainer.train()
    assert all("reg_loss" not in h for h in trainer.state.log_history)


def test_regularizer_found_through_a_ddp_wrapper(tmp_path):
    """With accelerate/DDP the model Trainer passes to compute_loss is wrapped; the reg term must still be added."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = RegModel()
        trainer = RegularizedTrainer(model=model, args=_args(tmp_path), train_dataset=_data())
        wrapped = nn.parallel.DistributedDataParallel(model)
        batch = {"x": torch.tensor(_data()["x"]), "labels": torch.tensor(_data()["labels"])}
        wrapped.train()
        with_reg = trainer.compute_loss(wrapped, dict(batch))
        plain = model(**batch)["loss"]
        assert with_reg.item() == pytest.approx(plain.item() + model.get_regularization_loss().item(), rel=1e-6)
    finally:
        if created:
            dist.destroy_process_group()


def test_regularizer_not_added_at_evaluation(tmp_path):
    model = RegModel().eval()
    trainer = RegularizedTrainer(model=model, args=_args(tmp_path), train_dataset=_data())
    batch = {"x": torch.tensor(_data()["x"]), "labels": torch.tensor(_data()["labels"])}
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(model(**batch)["loss"].item())


# -- real PEFT models with a regularizer: any head type ------------------------------------------------------------
def _tiny_peft(kind):
    from peft import get_peft_model

    from peft_ext import ReSoRAConfig

    torch.manual_seed(0)
    if kind == "seq-cls":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
        model, targets = BertForSequenceClassification(cfg), ["query", "value"]
        data = {"input_ids": torch.randint(5, 50, (8, 6)).tolist(), "labels": (torch.arange(8) % 3).tolist()}
    elif kind == "causal-lm":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
        model, targets = GPT2LMHeadModel(cfg), ["c_attn"]
        ids = torch.randint(0, 50, (8, 6)).tolist()
        data = {"input_ids": ids, "labels": ids}
    else:
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
        model, targets = ViTForImageClassification(cfg), ["q_proj", "v_proj", "query", "value"]  # 5.x or 4.x names
        data = {"pixel_values": torch.randn(8, 1, 8, 8).tolist(), "labels": (torch.arange(8) % 3).tolist()}
    peft_model = get_peft_model(
        model, ReSoRAConfig(r=4, lora_alpha=8, num_subspaces=2, reg_weight=1.0, target_modules=targets)
    )
    return peft_model, Dataset.from_dict(data)


@pytest.mark.parametrize("kind", ["seq-cls", "causal-lm", "image-cls"])
def test_any_task_head_gets_the_peft_regularizer(tmp_path, kind):
    model, data = _tiny_peft(kind)
    trainer = RegularizedTrainer(
        model=model,
        args=_args(
            tmp_path,
            optim="adamw_torch",
            learning_rate=1e-3,
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
        ),
        train_dataset=data,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the "regularizer not applied" warning must not fire here
        warnings.filterwarnings("ignore", category=UserWarning, message="(?!peft-ext)")
        trainer.train()
    logs = [h for h in trainer.state.log_history if "reg_loss" in h]
    assert len(logs) == 2
    assert all(math.isfinite(h["reg_loss"]) and h["reg_loss"] >= 0 for h in logs)
    assert all(math.isfinite(h["task_loss"]) for h in logs)


def test_plain_trainer_on_a_regularized_model_warns(tmp_path):
    model, data = _tiny_peft("seq-cls")
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, optim="adamw_torch", per_device_train_batch_size=4, max_steps=2),
        train_dataset=data,
    )
    with pytest.warns(UserWarning, match="regularizer is not applied"):
        trainer.train()
