"""Real-data quality benchmark: ASCL vs MoCo v2 vs random init vs raw pixels on Fashion-MNIST.

Data that installs offline: Debian's ``dataset-fashion-mnist`` package (gzip idx files in
``/usr/share/datasets/fashion-mnist/``)::

    apt-get update && apt-get install -y dataset-fashion-mnist

Arms, all with the same backbone, recipe and budget, one pretraining run per (arm, seed):

- ``ascl``   — ``--relation ascl`` (soft neighbour targets, weak key view), the method.
- ``moco``   — ``--relation none`` (plain MoCo v2), the baseline; every other flag identical.
- ``random`` — the same backbone, untrained (``AsclModel(config)`` under the seed).
- ``pixels`` — raw 32×32 grey pixels (no model; deterministic), a floor.

Each trained arm is a subprocess ``python scripts/pretrain.py --flag value ...`` — exactly what a user
runs — and the exported folder (``.../final``) is loaded back with ``AsclModel.from_pretrained``.
Evaluation (on the frozen backbone's pooled features, L2-normalised):

- weighted kNN top-1 (k 200, temperature 0.1), memory bank = the labelled pretraining images;
- fast linear probe top-1 (`train_linear_probe_fast`: full-batch L-BFGS logistic regression).

Both on the test split (the first ``--test_subset`` images on CPU; all 10,000 with --full). Images are
28 px, resized to 32 px by the data module. Results and findings: benchmarks/fashion_mnist.md.

CPU budget (the default): ``--train_subset`` images of the train split (class-balanced, chosen by
``--data_seed``, identical for every arm and seed), written once as PNGs into a temporary image folder
(``train/<class index>/<n>.png``) that is passed as ``--dataset`` — PretrainingArguments has no subset
flag, and an imagefolder is the ordinary route a user takes with their own images. The narrow
ResNet-18 (1/4 width, 3×3 stride-1 stem) trains for ``--epochs`` epochs.

``--full`` is the small-image paper protocol for a GPU: the whole 60,000-image train split
(``--dataset fashion_mnist``, no image folder), full-width ResNet-18, batch 256, queue 4096, 200 epochs,
5 warm-up epochs; the kNN bank is then the full train split. Cost scales with
images × epochs × backbone FLOPs: full-width ResNet-18 is ~16× the narrow one's FLOPs, so --full is
~60000·200·16 / (train_subset·epochs) times the CPU run's pretraining work.

    python benchmarks/fashion_mnist.py      # 12 epochs, 3 seeds: 15.8 min measured on a quiet 2-core CPU
"""

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from ascl_hf.augment import EvalTransform  # noqa: E402
from ascl_hf.data import load_fashion_mnist_dataset, load_labeled_split  # noqa: E402
from ascl_hf.evaluation import (  # noqa: E402
    extract_features,
    knn_classify,
    linear_probe_classify,
    train_linear_probe_fast,
)
from ascl_hf.modeling_ascl import AsclModel  # noqa: E402

NUM_CLASSES = 10
IMAGE_SIZE = 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # for feature extraction (pretraining: Accelerate's choice)
TRAINED_ARMS = {"ascl": "ascl", "moco": "none"}  # arm -> --relation


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_subset", type=int, default=5000,
                        help="Class-balanced train images used for pretraining and as the kNN/probe train set.")
    parser.add_argument("--test_subset", type=int, default=5000,
                        help="Evaluate on the first N test images (0: all 10,000; ignored with --full).")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--full", action="store_true",
                        help="GPU protocol: all 60k images, ResNet-18, batch 256, queue 4096, 200 epochs.")
    parser.add_argument("--arms", nargs="+", default=["ascl", "moco", "random", "pixels"],
                        choices=["ascl", "moco", "random", "pixels"])
    parser.add_argument("--output", default="benchmarks/results/fashion_mnist.json")
    parser.add_argument("--work_dir", default=None, help="Where runs are written (default: a temp dir, removed).")
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per pretraining run.")
    parser.add_argument("--parallel", type=int, default=2,
                        help="Pretraining runs (each then evaluated) at once; 2 fills a 2-core CPU.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run and for evaluation. 1 per run: on a busy small CPU, several "
                             "intra-op threads per process spin against each other (measured 3-9x slower steps).")
    parser.add_argument("--knn_k", type=int, default=200)
    parser.add_argument("--knn_temperature", type=float, default=0.1)
    parser.add_argument("pretrain_flags", nargs=argparse.REMAINDER,
                        help="After `--`: extra scripts/pretrain.py flags for both trained arms, e.g. "
                             "-- --queue_size 2048 --num_neighbors 5.")
    args = parser.parse_args(argv)
    if args.pretrain_flags and args.pretrain_flags[0] == "--":
        args.pretrain_flags = args.pretrain_flags[1:]
    return args


def recipe(args) -> dict:
    """The scripts/pretrain.py flags shared by both trained arms (arm and seed added per run)."""
    if args.full:
        return dict(backbone="resnet18", per_device_batch_size=256, queue_size=4096, epochs=200,
                    warmup_epochs=5, base_learning_rate=0.06, momentum=0.99, weight_decay=5e-4,
                    projection_hidden_size=2048, projection_dim=128, temperature=0.1, target_temperature=0.05,
                    num_neighbors=1, key_view="weak", crop_scale_min=0.2)
    return dict(backbone="resnet18-narrow", per_device_batch_size=128, queue_size=1024, epochs=args.epochs,
                warmup_epochs=1, base_learning_rate=0.06, momentum=0.99, weight_decay=5e-4,
                projection_hidden_size=512, projection_dim=128, temperature=0.1, target_temperature=0.05,
                num_neighbors=1, key_view="weak", crop_scale_min=0.2)


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices, as equal per class as possible, drawn with `seed`; sorted."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)]
    chosen = [indices[: size // NUM_CLASSES + (c < size % NUM_CLASSES)] for c, indices in enumerate(per_class)]
    return np.sort(np.concatenate(chosen))


def write_image_folder(root: Path, size: int, seed: int) -> Path:
    """The class-balanced train subset as PNGs in `root/train/<label>/<index>.png`; returns `root`."""
    train = load_fashion_mnist_dataset("train")
    labels = np.asarray(train["label"])
    indices = balanced_subset(labels, size, seed)
    for c in range(NUM_CLASSES):
        (root / "train" / str(c)).mkdir(parents=True, exist_ok=True)
    for index, row in zip(indices.tolist(), train.select(indices.tolist())):
        row["image"].save(root / "train" / str(row["label"]) / f"{index:05d}.png")
    return root


def load_uint8(source: str, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole labelled split as uint8 (n, 3, 32, 32) and labels (n,), decoded once by the data module."""
    loader = load_labeled_split(source, split, image_size=IMAGE_SIZE, batch_size=512)
    images, labels = [], []
    for batch in loader:
        images.append(batch["pixel_values"])
        labels.append(batch["labels"])
    images, labels = torch.cat(images), torch.cat(labels)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def model_features(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512):
    transform = EvalTransform(IMAGE_SIZE)
    batches = ((transform(images[i: i + batch_size]), labels[i: i + batch_size])
               for i in range(0, len(images), batch_size))
    return extract_features(model, batches, show_progress=False)


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Raw grey pixels (the three channels are equal), centred per image then L2-normalised: (n, 1024)."""
    flat = images[:, 0].reshape(len(images), -1).float() / 255
    flat = flat - flat.mean(1, keepdim=True)
    return torch.nn.functional.normalize(flat, dim=1)


def evaluate(train_features, train_labels, test_features, test_labels, args) -> dict:
    ranked = knn_classify(train_features, train_labels, test_features, num_classes=NUM_CLASSES, k=args.knn_k,
                          temperature=args.knn_temperature, top=1)
    knn = 100.0 * (ranked[:, 0] == test_labels).float().mean().item()
    probe = train_linear_probe_fast(train_features, train_labels, num_classes=NUM_CLASSES)
    ranked = linear_probe_classify(probe, test_features, top=1)
    linear = 100.0 * (ranked[:, 0] == test_labels).float().mean().item()
    return {"knn_top1": knn, "linear_fast_top1": linear}


def pretrain(dataset: str, arm: str, seed: int, run_dir: Path, args) -> tuple[Path, float | None]:
    """Runs scripts/pretrain.py for one (arm, seed); returns the exported folder and its wall seconds.

    With --work_dir, a run whose exported folder already exists is reused (seconds read back from
    `benchmark_pretrain.json`), so a benchmark interrupted during evaluation resumes without retraining.
    """
    timing_file = run_dir / "benchmark_pretrain.json"
    if args.work_dir and (run_dir / "final" / "config.json").exists():
        seconds = json.loads(timing_file.read_text())["seconds"] if timing_file.exists() else None
        print(f"reusing {run_dir / 'final'}", flush=True)
        return run_dir / "final", seconds
    flags = {**recipe(args), "dataset": dataset, "dataset_split": "train", "relation": TRAINED_ARMS[arm],
             "seed": seed, "output_dir": str(run_dir), "report_to": "none", "knn_train_split": "none",
             "num_workers": args.num_workers, "logging_steps": 10, "keep_checkpoints": 1}
    command = [sys.executable, str(REPOSITORY / "scripts" / "pretrain.py")]
    for key, value in flags.items():
        command += [f"--{key}", str(value)]
    command += args.pretrain_flags
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    environment = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore",
                   "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        result = subprocess.run(command, cwd=REPOSITORY, env=environment, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {result.returncode}); see {run_dir.parent / run_dir.name}.log")
    seconds = time.perf_counter() - started
    timing_file.write_text(json.dumps({"seconds": seconds, "command": command[1:]}) + "\n")
    return run_dir / "final", seconds


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="fashion_mnist_bench_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    timings = {}

    # --- data
    t = time.perf_counter()
    if args.full:
        dataset = "fashion_mnist"
        train_images, train_labels = load_uint8("fashion_mnist", "train")
    else:
        dataset = str(write_image_folder(work_dir / "images", args.train_subset, args.data_seed))
        train_images, train_labels = load_uint8(dataset, "train")
    test_images, test_labels = load_uint8("fashion_mnist", "test", None if args.full else args.test_subset or None)
    timings["data_s"] = time.perf_counter() - t
    print(f"data: {len(train_images)} train / {len(test_images)} test images "
          f"({timings['data_s']:.0f} s)", flush=True)

    results = {arm: [] for arm in args.arms}
    if "pixels" in args.arms:
        metrics = evaluate(pixel_features(train_images), train_labels, pixel_features(test_images), test_labels,
                           args)
        results["pixels"] = [metrics]  # deterministic: one value
        print(f"pixels: {metrics}", flush=True)
    def trained_run(arm: str, seed: int) -> dict:
        folder, seconds = pretrain(dataset, arm, seed, work_dir / f"{arm}_seed{seed}", args)
        model = AsclModel.from_pretrained(folder).to(DEVICE).eval()
        train_features, _ = model_features(model, train_images, train_labels)
        test_features, _ = model_features(model, test_images, test_labels)
        metrics = {**evaluate(train_features, train_labels, test_features, test_labels, args),
                   "seed": seed, "pretrain_s": seconds}
        log = [json.loads(line) for line in (folder.parent / "train_log.jsonl").read_text().splitlines()]
        # Since e915b0c relation "none" logs no confidence (plain InfoNCE computes no neighbour distribution).
        metrics.update(final_loss=log[-1]["loss"], final_confidence=log[-1].get("confidence"),
                       final_max_neighbor_weight=log[-1].get("max_neighbor_weight"),
                       median_images_per_second=statistics.median(r["images_per_second"] for r in log),
                       train_log=log)
        print(f"{arm} seed {seed}: kNN {metrics['knn_top1']:.2f}  linear {metrics['linear_fast_top1']:.2f}  "
              f"({seconds or 0:.0f} s pretraining, {time.perf_counter() - started:.0f} s elapsed)", flush=True)
        return metrics

    # Pretraining runs in subprocesses; their evaluation in pool threads (torch ops release the GIL).
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms if arm in TRAINED_ARMS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {job: pool.submit(trained_run, *job) for job in jobs}
        if "random" in args.arms:  # meanwhile, in this thread
            from ascl_hf.pretraining import build_model_config
            from ascl_hf.pretraining_arguments import PretrainingArguments

            config = build_model_config(PretrainingArguments(**recipe(args)))
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = AsclModel(config).to(DEVICE).eval()
                train_features, _ = model_features(model, train_images, train_labels)
                test_features, _ = model_features(model, test_images, test_labels)
                metrics = {**evaluate(train_features, train_labels, test_features, test_labels, args), "seed": seed}
                results["random"].append(metrics)
                print(f"random seed {seed}: kNN {metrics['knn_top1']:.2f}  linear {metrics['linear_fast_top1']:.2f}",
                      flush=True)
        for (arm, seed), future in futures.items():
            results[arm].append(future.result())
    timings["pretrain_s"] = {f"{arm}_seed{seed}": results[arm][i]["pretrain_s"]
                             for arm in TRAINED_ARMS if arm in args.arms for i, seed in enumerate(args.seeds)}

    # --- summary
    summary = {arm: {metric: summarise([r[metric] for r in runs]) for metric in ("knn_top1", "linear_fast_top1")}
               for arm, runs in results.items() if runs}
    differences = {}
    if results.get("ascl") and results.get("moco"):
        for metric in ("knn_top1", "linear_fast_top1"):
            paired = [a[metric] - m[metric] for a, m in zip(results["ascl"], results["moco"])]
            differences[metric] = summarise(paired)
    timings["total_s"] = time.perf_counter() - started
    report = {
        "benchmark": "fashion_mnist", "full": args.full, "seeds": args.seeds,
        "train_images": len(train_images), "test_images": len(test_images),
        "recipe": recipe(args), "extra_pretrain_flags": args.pretrain_flags,
        "evaluation": {"knn_k": args.knn_k, "knn_temperature": args.knn_temperature,
                       "knn_bank": "the pretraining images (labelled)", "linear_probe": "train_linear_probe_fast",
                       "test_split": "fashion_mnist test"},
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else argv,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "timings": timings, "runs": results, "summary": summary, "ascl_minus_moco": differences,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(summary, differences, len(args.seeds))
    print(f"wall time {timings['total_s'] / 60:.1f} min; results in {output}")
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)


def print_table(summary: dict, differences: dict, num_seeds: int) -> None:
    names = {"ascl": "ASCL (relation ascl)", "moco": "MoCo v2 (relation none)", "random": "random init",
             "pixels": "raw pixels"}
    print("\n| arm | kNN top-1 (%) | linear probe (fast) top-1 (%) |\n|---|---|---|")
    for arm, metrics in summary.items():
        cells = [f"{m['mean']:.2f} ± {m['std']:.2f}" if len(m["values"]) > 1 else f"{m['mean']:.2f}"
                 for m in (metrics["knn_top1"], metrics["linear_fast_top1"])]
        print(f"| {names[arm]} | {cells[0]} | {cells[1]} |")
    if differences:
        cells = [f"{d['mean']:+.2f} ± {d['std']:.2f}" for d in (differences["knn_top1"], differences["linear_fast_top1"])]
        print(f"| ASCL − MoCo (paired by seed) | {cells[0]} | {cells[1]} |")
    print(f"(mean ± sample std over {num_seeds} seeds; raw pixels are deterministic)")


if __name__ == "__main__":
    main()
