"""Run under `torchrun --nproc_per_node P` (gloo, CPU) by test_distributed.py, or directly for P = 1.

Trains a tiny AsclModel for a few steps on fixed images, each process taking its slice of a global batch, and
saves per step the loss averaged over processes and the queue, for the test to compare.
"""

import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from ascl_hf import AsclConfig, AsclModel
from conftest import tiny_backbone_config

GLOBAL_BATCH, STEPS = 8, 4


def main(output_path: str) -> None:
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    torch.manual_seed(0)
    config = AsclConfig(backbone_config=tiny_backbone_config(), small_image_stem=True, projection_hidden_size=32,
                        projection_dim=16, queue_size=20, momentum=0.9)
    model = AsclModel(config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    images = torch.randn(STEPS, 2, GLOBAL_BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    record = {"losses": [], "queues": [], "pointers": []}
    for step in range(STEPS):
        # Equal shares, except in the last step, where rank 0 brings 5 images and rank 1 only 3 (as when a
        # corrupt image was skipped): shuffle-BN and the queue must cope with unequal batches.
        shares = [GLOBAL_BATCH] if accelerator.num_processes == 1 else [4, 4] if step < STEPS - 1 else [5, 3]
        start = sum(shares[: accelerator.process_index])
        rows = slice(start, start + shares[accelerator.process_index])
        model.train()
        for module in model.modules():  # frozen BatchNorm statistics: results cannot depend on the batch split
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        output = model(images[step, 0, rows], images[step, 1, rows])
        accelerator.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad()
        unwrapped.update_momentum_encoder()
        record["losses"].append(accelerator.reduce(output.loss.detach(), reduction="mean").item())
        record["queues"].append(unwrapped.queue.keys.clone())
        record["pointers"].append(int(unwrapped.queue.pointer))
    torch.save(record, f"{output_path}.rank{accelerator.process_index}")


if __name__ == "__main__":
    main(sys.argv[1])
