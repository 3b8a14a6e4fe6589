"""Train a tiny MLP with LoTTrainer and write the controller history as JSON.

Run by tests/test_distributed.py once under two processes (torchrun, gloo on
loopback) and once as a single process over the same global batches. The
model's forward takes ``x`` and ``labels`` and returns a mean cross-entropy.
"""

import argparse
import json
import os

import torch
from datasets import Dataset
from torch import nn

from hf_lot import LoTTrainer, LoTTrainingArguments
from hf_lot.collectives import all_reduce


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.output = nn.Linear(16, 3)

    def forward(self, x, labels=None):
        logits = self.output(torch.tanh(self.hidden(x)))
        loss = nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gradient_accumulation_steps", type=int, required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--output", required=True)
    options = parser.parse_args()

    torch.manual_seed(0)
    features = torch.randn(512, 6)
    labels = (features[:, 0] > 0).long() + (features[:, 1] > 0.5).long()
    dataset = Dataset.from_dict({"x": features.tolist(), "labels": labels.tolist()})
    model = TinyClassifier()

    args = LoTTrainingArguments(
        output_dir=os.path.join(os.path.dirname(options.output), "trainer"),
        per_device_train_batch_size=options.per_device_train_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        max_steps=12,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_steps=100,
        dataloader_drop_last=True,
        # One fixed sequential order, so one process and two see the same global batches.
        train_sampling_strategy="sequential",
        lot_interval=4,
        lot_window=3,
        lot_hvp_cold_iterations=50,
        lot_hvp_iterations=50,
        lot_hvp_tolerance=1e-8,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = LoTTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()

    controller = trainer.lot_controller
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "history": controller.history,
        "factors": controller.factors,
        "learning_rates": controller.learning_rates(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer),
        "reductions": {
            reduction: all_reduce(torch.tensor([rank + 1.0, -float(rank)]), reduction).tolist()
            for reduction in ("sum", "mean", "max", "min")
        },
    }
    with open(f"{options.output}.rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    trainer.accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
