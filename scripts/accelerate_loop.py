"""Train a small classifier with a hand-written Accelerate loop and the LoT threshold.

Runs on one process or several:

    python scripts/accelerate_loop.py
    USE_LIBUV=0 accelerate launch --multi_gpu --num_processes 2 \
        --main_process_ip 127.0.0.1 --main_process_port 29555 scripts/accelerate_loop.py

The data are synthetic (a random teacher network labels Gaussian inputs), so
the example needs no download. It prints the per-layer learning rates the
controller chose and, with ``--output``, writes them as JSON.
"""

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from hf_lot import LoTConfig, LoTLoop


def build_data(num_examples: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_examples, 20, generator=generator)
    teacher = torch.randn(20, 4, generator=generator)
    labels = (inputs @ teacher).argmax(dim=1)
    return TensorDataset(inputs, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="Optimizer steps.")
    parser.add_argument("--batch_size", type=int, default=16, help="Examples per micro-batch and process.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--interval", type=int, default=10, help="Optimizer steps between controller updates.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="Write the final per-layer learning rates and scheduler counts here (JSON).")
    options = parser.parse_args()

    # Without CUDA, cpu=True lets `accelerate launch --multi_gpu` start a gloo process group on the CPU.
    accelerator = Accelerator(
        gradient_accumulation_steps=options.gradient_accumulation_steps, cpu=not torch.cuda.is_available()
    )
    set_seed(options.seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    loader = DataLoader(build_data(4096, options.seed), batch_size=options.batch_size, shuffle=True, drop_last=True)

    lot = LoTLoop(model, LoTConfig(interval=options.interval, window=5))
    optimizer = torch.optim.AdamW(lot.param_groups(lr=options.learning_rate))
    scheduler = lot.scheduler(optimizer)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    lot.begin_task(num_steps=options.steps)

    progress = tqdm(total=options.steps, disable=not accelerator.is_main_process, desc="optimizer steps")
    steps = 0
    while steps < options.steps:
        for inputs, labels in loader:
            with accelerator.accumulate(model):
                with lot.micro_batch(accelerator, num_items=len(labels)):
                    loss = nn.functional.cross_entropy(model(inputs), labels)
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    lot.end_step(
                        accelerator,
                        model,
                        optimizer,
                        loss_fn=lambda module: nn.functional.cross_entropy(module(inputs), labels),
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                progress.update(1)
                progress.set_postfix(loss=loss.item())
                if steps >= options.steps:
                    break
    progress.close()

    learning_rates = lot.controller.learning_rates(optimizer.optimizer)
    # The scheduler advanced once per optimizer step, although Accelerate called it once per process.
    result = {
        "learning_rates": learning_rates,
        "scheduler_last_epoch": scheduler.scheduler.last_epoch,
        "optimizer_steps": scheduler.scheduler.optimizer_steps,
        "num_processes": accelerator.num_processes,
        "measurements": len(lot.controller.history),
    }
    if accelerator.is_main_process:
        for name, value in learning_rates.items():
            print(f"{name:>4}  lr={value:.6g}")
        if options.output:
            with open(options.output, "w") as handle:
                json.dump(result, handle, indent=2)
    lot.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
