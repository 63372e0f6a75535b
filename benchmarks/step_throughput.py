"""Pretraining step throughput: the full ASCL step against relation "none" and against the backbone lower bound.

All arms run in one process on the same backbone layout, the same batch of pre-made normalised float views
(augmentation is benchmarked in `augment_throughput.py`) and the same optimiser, interleaved round-robin
(the starting arm rotates each round) after a warm-up; each arm's figure is the median over rounds.

Arms (per queue size):

- ``ascl``: what the training loop does per batch: ``model(query_view, key_view)`` on an `AsclModel` in train
  mode (query branch, split-BN key branch, loss, enqueue), ``loss.backward()``, SGD step (momentum 0.9, weight
  decay), ``zero_grad(set_to_none=True)``, ``update_momentum_encoder()``.
- ``none``: the same step with ``config.relation = "none"`` (same model object, toggled between blocks).
- ``none, cross-entropy loss`` (reference, ``--no-reference_arm`` drops it): the ``none`` step with the model's
  `moco_soft_loss` swapped (in this process only) for the textbook MoCo v2 loss, ``cross_entropy(logits, 0)``,
  which skips the soft-target work that relation "none" still does (key–queue similarities, softmax, entropy,
  target matrix). It shows what a plain MoCo implementation would pay.
- ``bound``: the unavoidable work: the same backbone forward + backward on the query batch, a no-grad forward
  of a second backbone on the key batch (one pass, no split), SGD step on the backbone.

Ratios are medians of per-round ratios (paired within a round, so drifting load from other processes on a
shared machine cancels), against the ``ascl`` arm. Targets: ASCL costs <= 3 % more than relation "none";
the full ASCL step reaches >= 0.85 of the bound's images/s.

    python benchmarks/step_throughput.py                      # 2-core CPU defaults: resnet18-narrow, 32 px
    python benchmarks/step_throughput.py --device cuda --backbone resnet50 --no-small_image_stem \
        --image_size 224 --batch_size 256 --queue_size 65536 --projection_hidden_size 2048 \
        --mixed_precision bf16 --channels_last
"""

import argparse
import contextlib
import copy
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from transformers import ResNetConfig

from ascl_hf import modeling_ascl
from ascl_hf.configuration_ascl import AsclConfig
from ascl_hf.loss import SoftLossOutput, moco_soft_loss
from ascl_hf.modeling_ascl import AsclModel, pooled_features
from ascl_hf.pretraining_arguments import BACKBONES

COST_TARGET = 0.03  # ASCL may cost at most 3 % more time per image than relation "none"
BOUND_TARGET = 0.85  # the full step must reach this fraction of the lower bound's images/s


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18-narrow", choices=sorted(BACKBONES))
    parser.add_argument("--small_image_stem", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--queue_size", type=int, nargs="+", default=[4096, 65536],
                        help="One interleaved measurement per queue size (default: the paper's 4096 and 65536).")
    parser.add_argument("--projection_hidden_size", type=int, default=512)
    parser.add_argument("--projection_dim", type=int, default=128)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--learning_rate", type=float, default=0.03)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps per arm before measuring.")
    parser.add_argument("--steps_per_block", type=int, default=1, help="Timed steps per arm per round.")
    parser.add_argument("--repeats", type=int, default=12, help="Rounds over all arms.")
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no",
                        help="Autocast dtype for the forward passes (meant for cuda).")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--reference_arm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def plain_moco_loss(query, key, queue, *, relation, num_neighbors, temperature, target_temperature):
    """Textbook MoCo v2 objective, for the reference arm only: cross-entropy with the positive at index 0."""
    del relation, num_neighbors, target_temperature
    query, key, queue = query.float(), key.float(), queue.float()
    logits = torch.cat([(query * key).sum(dim=1, keepdim=True), query @ queue.T], dim=1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
    zero = loss.new_zeros(())
    return SoftLossOutput(loss, zero, zero)


class Arm:
    """One measured variant: `step()` runs one training step on the fixed batch."""

    def __init__(self, name: str, step, device: torch.device):
        self.name, self.step, self.device = name, step, device
        self.images_per_second: list[float] = []

    def timed(self, steps: int, batch_size: int) -> float:
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return steps * batch_size / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_arms(args, queue_size: int, query_view, key_view, device) -> list[Arm]:
    autocast = (
        torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision])
        if args.mixed_precision != "no"
        else contextlib.nullcontext()
    )
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)
    config = AsclConfig(
        backbone_config=ResNetConfig(**BACKBONES[args.backbone]),
        small_image_stem=args.small_image_stem,
        projection_hidden_size=args.projection_hidden_size,
        projection_dim=args.projection_dim,
        queue_size=queue_size,
        momentum=args.momentum,
        relation="ascl",
    )
    model = AsclModel(config).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay,
    )

    def full_step(relation: str, loss_function=None):
        def step():
            model.config.relation = relation
            patch = (
                mock.patch.object(modeling_ascl, "moco_soft_loss", loss_function)
                if loss_function is not None
                else contextlib.nullcontext()
            )
            with patch, autocast:
                output = model(query_view, key_view)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_momentum_encoder()

        return step

    # Lower bound: a fresh backbone of the same layout (+ small stem), its no-grad twin, SGD on the backbone only.
    bound_backbone = copy.deepcopy(model.backbone).train()
    bound_key_backbone = copy.deepcopy(model.backbone).requires_grad_(False).train()
    bound_optimizer = torch.optim.SGD(
        bound_backbone.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay
    )

    def bound_step():
        with autocast:
            pooled = pooled_features(bound_backbone(query_view))
            with torch.no_grad():
                bound_key_backbone(key_view)
        pooled.float().square().mean().backward()
        bound_optimizer.step()
        bound_optimizer.zero_grad(set_to_none=True)

    arms = [Arm("ascl", full_step("ascl"), device), Arm("none", full_step("none"), device)]
    if args.reference_arm:
        arms.append(Arm("none, cross-entropy loss (reference)", full_step("none", plain_moco_loss), device))
    arms.append(Arm("bound: backbone fwd+bwd (query) + fwd (key) + SGD", bound_step, device))
    return arms


def measure(args, queue_size: int, device: torch.device) -> list[Arm]:
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    query_view, key_view = (
        torch.randn(shape, generator=generator).to(device).contiguous(memory_format=memory_format) for _ in range(2)
    )
    arms = build_arms(args, queue_size, query_view, key_view, device)
    for arm in arms:
        for _ in range(args.warmup_steps):
            arm.step()
    synchronize(device)
    for round_index in range(args.repeats):
        start = round_index % len(arms)
        for arm in arms[start:] + arms[:start]:
            arm.images_per_second.append(arm.timed(args.steps_per_block, args.batch_size))
    return arms


def loss_only_milliseconds(args, queue_size: int, device: torch.device, rounds: int = 20) -> dict[str, float]:
    """Median ms of `moco_soft_loss` forward + backward alone, per relation, interleaved.

    ASCL and relation "none" differ only inside the loss, and this difference is small and deterministic, so
    timing it alone gives an estimate of ASCL's extra cost that a busy machine's noise cannot swamp.
    """
    generator = torch.Generator().manual_seed(args.seed)
    unit = lambda rows: F.normalize(torch.randn(rows, args.projection_dim, generator=generator), dim=1).to(device)
    raw_query = unit(args.batch_size).requires_grad_(True)
    key, queue = unit(args.batch_size), unit(queue_size)
    times = {"ascl": [], "none": []}

    def run(relation):
        output = moco_soft_loss(F.normalize(raw_query, dim=1), key, queue, relation=relation, num_neighbors=1,
                                temperature=0.1, target_temperature=0.05)
        output.loss.backward()
        raw_query.grad = None

    for relation in times:
        for _ in range(3):
            run(relation)
    for round_index in range(rounds):
        order = list(times) if round_index % 2 == 0 else list(reversed(times))
        for relation in order:
            synchronize(device)
            started = time.perf_counter()
            run(relation)
            synchronize(device)
            times[relation].append(1e3 * (time.perf_counter() - started))
    return {relation: statistics.median(values) for relation, values in times.items()}


def paired_ratio(arm: Arm, reference: Arm) -> float:
    return statistics.median(a / r for a, r in zip(arm.images_per_second, reference.images_per_second))


def report(args, queue_size: int, arms: list[Arm], loss_ms: dict[str, float]) -> dict:
    ascl, none, *_, bound = arms
    print(f"\n### queue {queue_size}\n")
    print("| arm | images/s (median) | ratio to ascl (median of paired rounds) |")
    print("|---|---:|---:|")
    for arm in arms:
        print(f"| {arm.name} | {statistics.median(arm.images_per_second):.1f} | {paired_ratio(arm, ascl):.3f} |")
    # Time per image is 1 / throughput: ASCL's extra cost over "none" is none/ascl - 1.
    cost = paired_ratio(none, ascl) - 1.0
    bound_fraction = paired_ratio(ascl, bound)
    spread = max(abs(paired_ratio(none, ascl) - r) for r in (
        none.images_per_second[i] / ascl.images_per_second[i] for i in range(len(ascl.images_per_second))
    ))
    print()
    print(f"- ASCL vs relation none: ASCL costs {100 * cost:+.1f} % per image (target <= {100 * COST_TARGET:.0f} %): "
          f"{'PASS' if cost <= COST_TARGET else 'BELOW'}  (largest single-round deviation {100 * spread:.1f} %)")
    step_ms = 1e3 * args.batch_size / statistics.median(ascl.images_per_second)
    loss_cost = (loss_ms["ascl"] - loss_ms["none"]) / (step_ms - (loss_ms["ascl"] - loss_ms["none"]))
    print(f"- loss alone (forward + backward, interleaved): ascl {loss_ms['ascl']:.2f} ms, none {loss_ms['none']:.2f} ms "
          f"per step; the difference is {100 * loss_cost:+.2f} % of the {step_ms:.0f} ms 'none' step "
          f"(load-robust estimate of ASCL's extra cost): {'PASS' if loss_cost <= COST_TARGET else 'BELOW'}")
    print(f"- full ASCL step / lower bound: {bound_fraction:.3f} of the bound's images/s "
          f"(target >= {BOUND_TARGET}): {'PASS' if bound_fraction >= BOUND_TARGET else 'BELOW'}")
    return {"queue_size": queue_size, "cost": cost, "loss_cost": loss_cost, "bound_fraction": bound_fraction}


def main(argv=None) -> None:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"## ASCL step throughput: {args.backbone}, small stem {args.small_image_stem}, {args.image_size} px, "
          f"batch {args.batch_size}, projection {args.projection_hidden_size}->{args.projection_dim}, "
          f"mixed precision {args.mixed_precision}, channels_last {args.channels_last} on {where}")
    print(f"(torch {torch.__version__}; warm-up {args.warmup_steps} steps per arm, then {args.repeats} rounds "
          f"of {args.steps_per_block} timed steps per arm, interleaved)")
    for queue_size in args.queue_size:
        arms = measure(args, queue_size, device)
        report(args, queue_size, arms, loss_only_milliseconds(args, queue_size, device))


if __name__ == "__main__":
    main()
