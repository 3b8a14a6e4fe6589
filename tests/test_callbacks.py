"""Tests of the console callbacks that hide per-layer LoT values from the terminal."""

import torch
from datasets import Dataset
from torch import nn
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from hf_lot import LoTTrainer, LoTTrainingArguments
from hf_lot.callbacks import LoTPrinterCallback, LoTProgressCallback, drop_layer_values


class TwoLayerClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.output = nn.Linear(8, 2)

    def forward(self, x, labels=None):
        logits = self.output(torch.tanh(self.hidden(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class LogRecorder(TrainerCallback):
    """Keep every dict that `Trainer.log` hands to the callbacks, as a logging integration receives it."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def build_trainer(tmp_path, disable_tqdm: bool, callbacks=None) -> LoTTrainer:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    dataset = Dataset.from_dict(
        {
            "x": torch.randn(32, 4, generator=generator).tolist(),
            "labels": torch.randint(0, 2, (32,), generator=generator).tolist(),
        }
    )
    args = LoTTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=2,
        lot_interval=1,
        lot_hvp_cold_iterations=3,
        lot_hvp_iterations=2,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        use_cpu=True,
        disable_tqdm=disable_tqdm,
    )
    return LoTTrainer(model=TwoLayerClassifier(), args=args, train_dataset=dataset, callbacks=callbacks)


def test_drop_layer_values_keeps_summary():
    logs = {"loss": 0.5, "lot/rho": 1.0, "lot/lr/hidden": 1e-3, "lot/alpha/output": 0.2}

    kept = drop_layer_values(logs)

    assert kept == {"loss": 0.5, "lot/rho": 1.0, "lot/layer_values": 2}
    assert "lot/lr/hidden" in logs


def test_drop_layer_values_without_lot_keys():
    logs = {"loss": 0.5, "epoch": 1.0}

    assert drop_layer_values(logs) == logs


def test_trainer_swaps_progress_callback(tmp_path):
    trainer = build_trainer(tmp_path, disable_tqdm=False)

    types = [type(callback) for callback in trainer.callback_handler.callbacks]

    assert LoTProgressCallback in types
    assert ProgressCallback not in types


def test_trainer_swaps_printer_callback(tmp_path):
    trainer = build_trainer(tmp_path, disable_tqdm=True)

    types = [type(callback) for callback in trainer.callback_handler.callbacks]

    assert LoTPrinterCallback in types
    assert PrinterCallback not in types


def test_console_hides_layer_values(tmp_path, capsys):
    recorder = LogRecorder()
    trainer = build_trainer(tmp_path, disable_tqdm=True, callbacks=[recorder])

    trainer.train()
    printed = capsys.readouterr().out

    assert any("lot/lr/hidden" in logs for logs in recorder.logs)
    assert "lot/rho" in printed
    assert "lot/layer_values" in printed
    assert "lot/lr/hidden" not in printed
