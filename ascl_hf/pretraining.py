"""The ASCL pretraining loop on Accelerate. Reads top to bottom: arguments → accelerator → data → model →
optimiser and schedule → resume → loop → export. `scripts/pretrain.py` is its command-line entry point.
"""

import itertools
import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .augment import AugmentConfig, EvalTransform, TwoViewAugment
from .checkpointing import TrainingProgress, resolve_checkpoint, save_checkpoint
from .configuration_ascl import AsclConfig
from .data import build_pretraining_dataloader, load_image_dataset, load_labeled_split
from .distributed import broadcast_from_main
from .evaluation import extract_features, knn_classify, make_record
from .hub import export_model, push_to_hub
from .modeling_ascl import AsclModel
from .plots import plot_knn_curve
from .pretraining_arguments import PretrainingArguments
from .schedules import momentum_at, warmup_cosine_schedule

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before the bad update reaches the weights."""


class NonFiniteLossWatch:
    """Remembers the first step whose loss was NaN or infinite, without a host-device sync every step.

    `check` (at logging steps, before every checkpoint and before the export) raises, so weights updated after a bad
    step are never saved and the last checkpoint stays the last good one.
    """

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss so far was finite

    def observe(self, loss: torch.Tensor, step: int) -> None:
        is_bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(is_bad & (self.first_bad_step == 0), step, self.first_bad_step)

    def check(self, accelerator: Accelerator, last_checkpoint: Path | None) -> None:
        steps = accelerator.gather(self.first_bad_step.reshape(1))  # every process's first bad step
        bad_steps = steps[steps > 0]
        if bad_steps.numel():
            where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"Loss is NaN or infinite at step {int(bad_steps.min())}; stopping. {where}. Lower "
                "--base_learning_rate, set --max_grad_norm, or use bf16 instead of fp16."
            )


def augmentation_seed(seed: int, process_index: int, step: int) -> int:
    """A distinct seed per (run seed, process, step): the views of any step are reproducible on resume without
    saving generator state, and processes never draw the same crops."""
    return (((seed & 0x7FFF) << 48) | ((process_index & 0xFFFF) << 32) | (step & 0xFFFFFFFF)) & (2**63 - 1)


def build_model_config(args: PretrainingArguments) -> AsclConfig:
    return AsclConfig(
        backbone_config=args.backbone_config(),
        small_image_stem=args.small_image_stem,
        small_image_stem_max_pool=args.small_image_stem_max_pool,
        projection_hidden_size=args.projection_hidden_size,
        projection_dim=args.projection_dim,
        predictor_hidden_size=args.predictor_hidden_size,
        framework=args.framework,
        relation=args.relation,
        queue_size=args.queue_size,
        momentum=args.momentum,
        temperature=args.temperature,
        target_temperature=args.target_temperature,
        num_neighbors=args.num_neighbors,
        shuffle_batch_norm=args.shuffle_batch_norm,
    )


def freeze_batch_norm(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def knn_accuracy(model: AsclModel, train_loader, test_loader, transform: EvalTransform, device, *, k, temperature):
    """Weighted kNN top-1 accuracy (%) of the backbone's pooled features, test split against train split."""

    def normalised(loader):
        for batch in loader:
            yield transform(batch["pixel_values"].to(device)), batch["labels"]

    train_features, train_labels = extract_features(model, normalised(train_loader), show_progress=False)
    test_features, test_labels = extract_features(model, normalised(test_loader), show_progress=False)
    num_classes = int(torch.cat([train_labels, test_labels]).max()) + 1
    ranked = knn_classify(train_features, train_labels, test_features, num_classes=num_classes, k=k,
                          temperature=temperature, top=1)
    return 100.0 * (ranked[:, 0] == test_labels).float().mean().item()


def run_pretraining(args: PretrainingArguments) -> Path | None:
    """Train, checkpoint, export. Returns the exported model folder (on the main process)."""
    # --- accelerator
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dynamo_backend="inductor" if args.torch_compile else None,
        # The seedable sampler makes each epoch's order a function of (seed, epoch): exact resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Buffers (BatchNorm statistics, the queue) need no broadcast: the queue is kept equal by gathering.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    set_seed(args.seed)  # same seed on every process: identical initial weights and queue
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "pretraining_arguments.json").write_text(json.dumps(vars(args), indent=2))

    # --- data
    source = load_image_dataset(
        args.dataset, args.dataset_split, image_column=args.image_column, label_column=args.label_column,
        streaming=args.streaming, rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    train_loader = build_pretraining_dataloader(
        source, image_size=args.image_size, batch_size=args.per_device_batch_size, num_workers=args.num_workers,
        seed=args.seed, pin_memory=args.pin_memory and torch.cuda.is_available(),
        prefetch_factor=args.prefetch_factor,
    )
    augment = TwoViewAugment(AugmentConfig(
        image_size=args.image_size, crop_scale=(args.crop_scale_min, 1.0), key_view=args.key_view,
    ))
    augment_generator = torch.Generator()  # reseeded every step with `augmentation_seed`
    knn_loaders = None
    if args.knn_train_split != "none" and args.knn_every_epochs > 0 and accelerator.is_main_process:
        knn_source = args.knn_dataset or args.dataset
        try:
            knn_loaders = tuple(
                load_labeled_split(knn_source, split, image_size=args.image_size, batch_size=256,
                                   label_column=args.label_column, image_column=args.image_column)
                for split in (args.knn_train_split, args.knn_test_split)
            )
        except (ValueError, FileNotFoundError) as error:
            logger.warning("kNN monitor disabled: %s", error)

    # --- model
    model = AsclModel(build_model_config(args))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # --- optimiser and schedule
    global_batch_size = args.per_device_batch_size * accelerator.num_processes
    learning_rate = args.base_learning_rate * global_batch_size / 256
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    fused = {"fused": True} if args.fused_optimizer else {}
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=learning_rate, momentum=args.sgd_momentum,
                                    weight_decay=args.weight_decay, **fused)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=args.weight_decay, **fused)

    if source.streaming:  # the stream is sharded by `split_dataset_by_node`; accelerate must not shard it again
        model, optimizer = accelerator.prepare(model, optimizer)
        if not args.max_steps or args.warmup_steps is None:
            raise ValueError("--streaming has no length: pass --max_steps and --warmup_steps.")
        steps_per_epoch = args.max_steps  # an "epoch" is one pass over the stream, however long it is
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{args.dataset!r} yields no full batch of {args.per_device_batch_size} per process: "
            "lower --per_device_batch_size."
        )
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps, total_steps)
    # Not `prepare`d: its steps are already optimiser steps, and Accelerate's wrapper would step it once per
    # process. Registered instead, so checkpoints still hold it.
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:  # DDP without buffer broadcast leaves the queue and BN statistics per rank
        for tensor in unwrapped.state_dict().values():
            broadcast_from_main(tensor)

    # --- resume
    last_checkpoint = None
    if args.resume_from_checkpoint:
        last_checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        accelerator.load_state(str(last_checkpoint))
        accelerator.print(f"Resumed from {last_checkpoint} at step {progress.global_step}.")
    if args.report_to != "none":
        accelerator.init_trackers("ascl", config={k: v for k, v in vars(args).items() if v is not None})

    # --- loop
    knn_history = []
    bar = tqdm(total=total_steps, initial=progress.global_step, disable=not accelerator.is_local_main_process,
               desc="pretraining", dynamic_ncols=True)
    watch = NonFiniteLossWatch(accelerator.device)

    def checkpoint(previous: Path | None) -> Path:
        watch.check(accelerator, previous)
        return save_checkpoint(accelerator, output_dir, progress.global_step, args.keep_checkpoints)

    started = time.perf_counter()
    while progress.global_step < total_steps:
        model.train()
        if args.freeze_batch_norm_statistics:
            freeze_batch_norm(model)
        if source.streaming:
            train_loader.dataset.set_epoch(progress.epoch)
            # A stream cannot seek: a resumed epoch reads (and drops) the batches it had already trained on.
            epoch_loader = itertools.islice(train_loader, progress.step_in_epoch, None)
        else:
            train_loader.set_epoch(progress.epoch)
            # Only a resumed epoch needs a skipping copy: a new DataLoader would also restart the worker processes.
            epoch_loader = (
                accelerator.skip_first_batches(train_loader, progress.step_in_epoch)
                if progress.step_in_epoch
                else train_loader
            )
        batches = iter(epoch_loader)
        step_started = time.perf_counter()
        epoch_ended = False
        while progress.global_step < total_steps and not epoch_ended:
            batch = next(batches, None)
            if source.streaming and accelerator.num_processes > 1:
                # Shards can end at different steps; every process must stop together, or the others would
                # wait forever in the step's collectives.
                has_batch = torch.tensor(float(batch is not None), device=accelerator.device)
                batch = batch if accelerator.reduce(has_batch, reduction="min").item() else None
            if batch is None:  # a stream ran out (map-style loaders end on the step count below)
                epoch_ended = True
                break
            if batch["pixel_values"].shape[0] == 0:
                raise ValueError(
                    f"Every image of the batch at step {progress.global_step + 1} was unreadable (see the warnings "
                    "above): check the dataset, or raise --per_device_batch_size."
                )
            data_wait = time.perf_counter() - step_started
            images = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            augment_generator.manual_seed(augmentation_seed(args.seed, accelerator.process_index, progress.global_step))
            query_view, key_view = augment(images, augment_generator)
            if args.channels_last:
                query_view = query_view.contiguous(memory_format=torch.channels_last)
                key_view = key_view.contiguous(memory_format=torch.channels_last)
            output = model(query_view, key_view)
            watch.observe(output.loss, progress.global_step + 1)
            accelerator.backward(output.loss)
            if args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            unwrapped.update_momentum_encoder(
                momentum_at(progress.global_step, total_steps, args.momentum, args.momentum_schedule)
            )
            progress.global_step += 1
            progress.step_in_epoch += 1
            step_time = time.perf_counter() - step_started
            step_started = time.perf_counter()
            bar.update(1)
            if progress.global_step % args.logging_steps == 0 or progress.global_step == total_steps:
                watch.check(accelerator, last_checkpoint)
                metrics = {
                    "loss": output.loss.item(),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "max_neighbor_weight": output.max_neighbor_weight.item(),
                    "images_per_second": global_batch_size / step_time,
                    "data_wait_fraction": data_wait / step_time,
                    "epoch": progress.epoch,
                }
                if output.confidence is not None:  # relation "none" computes no neighbour distribution
                    metrics["confidence"] = output.confidence.item()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['learning_rate']:.3g}",
                                c=f"{metrics.get('confidence', float('nan')):.2f}", img_s=f"{metrics['images_per_second']:.0f}")
                accelerator.log(metrics, step=progress.global_step)
                if accelerator.is_main_process:
                    with open(output_dir / "train_log.jsonl", "a") as log:
                        log.write(json.dumps({"step": progress.global_step, **metrics}) + "\n")
            if args.checkpointing_steps and progress.global_step % args.checkpointing_steps == 0:
                last_checkpoint = checkpoint(last_checkpoint)
            epoch_ended = progress.step_in_epoch == steps_per_epoch
        if epoch_ended:
            progress.epoch += 1
            progress.step_in_epoch = 0
            if knn_loaders and (progress.epoch % args.knn_every_epochs == 0 or progress.global_step == total_steps):
                accuracy = knn_accuracy(unwrapped, *knn_loaders, EvalTransform(args.image_size), accelerator.device,
                                        k=args.knn_k, temperature=args.knn_temperature)
                knn_history.append({"epoch": progress.epoch, "step": progress.global_step, "knn_top1": accuracy})
                accelerator.log({"knn_top1": accuracy}, step=progress.global_step)
                bar.write(f"epoch {progress.epoch}: kNN top-1 {accuracy:.2f}%")
                with open(output_dir / "knn_log.jsonl", "a") as log:
                    log.write(json.dumps(knn_history[-1]) + "\n")
            accelerator.wait_for_everyone()
            last_checkpoint = checkpoint(last_checkpoint)
    bar.close()
    if progress.step_in_epoch:  # stopped mid-epoch by --max_steps
        checkpoint(last_checkpoint)

    # --- export (main process), then close the trackers and the process group
    exported = None
    if accelerator.is_main_process:
        card_facts = {
            "model_id": args.hub_model_id or str(output_dir / "final"),
            "pretraining_data": f"`{args.dataset}` ({args.dataset_split} split), {args.image_size} px",
            "epochs": round(total_steps / steps_per_epoch, 2),
            "steps": total_steps,
            "batch_size": global_batch_size,
            "learning_rate": learning_rate,
            "hardware": f"{accelerator.num_processes} x {device_name(accelerator.device)}",
            "training_time": f"{(time.perf_counter() - started) / 60:.1f} min"
            + (" (since the resume)" if args.resume_from_checkpoint else ""),
        }
        if "/" in args.dataset and not Path(args.dataset).exists():
            card_facts["datasets"] = [args.dataset]
        exported = export_pretrained(unwrapped, args, augment, knn_history, card_facts)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also destroys the process group: no collective may follow
    return exported


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({os.cpu_count()} cores)"


def export_pretrained(
    model: AsclModel, args: PretrainingArguments, augment: TwoViewAugment, knn_history: list[dict], card_facts: dict
) -> Path:
    """Write `output_dir/final` (weights, config, image processor, card with the last kNN accuracy); push if asked."""
    results = []
    if knn_history:
        results.append(make_record(
            args.knn_dataset or args.dataset, args.knn_test_split, "knn_top1_accuracy",
            knn_history[-1]["knn_top1"] / 100.0,
            {"name": "weighted_knn", "k": args.knn_k, "temperature": args.knn_temperature,
             "train_split": args.knn_train_split, "when": f"online monitor, epoch {knn_history[-1]['epoch']}"},
        ))
        plot_knn_curve([(entry["epoch"], entry["knn_top1"]) for entry in knn_history],
                       Path(args.output_dir) / "knn_curve.png")
    folder = export_model(model, Path(args.output_dir) / "final", image_size=args.image_size,
                          image_mean=augment.mean, image_std=augment.std, card_data=card_facts, results=results)
    if args.export_backbone:
        export_model(model, Path(args.output_dir) / "final-backbone", image_size=args.image_size,
                     image_mean=augment.mean, image_std=augment.std, card_data=card_facts, results=results,
                     export_backbone=True)
    if args.push_to_hub:
        print(f"Pushed to {push_to_hub(folder, args.hub_model_id, private=args.hub_private)}")
    return folder
