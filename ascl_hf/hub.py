"""Publishing: export a pretrained `AsclModel` as a Hub-ready feature-extractor folder, render its card, push it.

Two folder layouts come out of `export_model`:

- ASCL export (default): `config.json` (with `auto_map`), `model.safetensors` (backbone + projection head, + BYOL
  predictor; never the momentum encoder or the queue), the custom-code files, `preprocessor_config.json` and
  `README.md`. Loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.
- Plain backbone (`export_backbone=True`, ImageNet-style stem only): the backbone as a standard transformers
  checkpoint (e.g. `ResNetModel`), no custom code, + `preprocessor_config.json` and `README.md`. Loads with
  `AutoModel` and `AutoModelForImageClassification` without `trust_remote_code`.

Folders are written atomically: into a hidden sibling directory that is renamed into place once complete.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import BitImageProcessorPil
from transformers.image_utils import PILImageResampling

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
CUSTOM_CODE_FILES = ("configuration_ascl.py", "modeling_ascl.py", "loss.py", "queue.py", "distributed.py")
COMMON_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
TAGS = ["ascl", "self-supervised-learning", "contrastive-learning", "image-feature-extraction"]
# Keys a caller may pass in `card_data`; anything else is a typo we would rather report than silently drop.
CARD_FIELDS = {
    "model_id": "Hub id used in the card's usage snippets (default: the export folder's name)",
    "model_name": "title of the card and name in model-index (default: the model id's last part)",
    "datasets": "Hub ids of the pretraining datasets, for the card metadata",
    "pretraining_data": "free-text description of the pretraining images",
    "license": "license identifier (default: apache-2.0)",
    "epochs": "pretraining epochs",
    "steps": "optimizer steps",
    "batch_size": "global batch size",
    "learning_rate": "peak learning rate",
    "hardware": "accelerators used, e.g. '8× A100 80GB'",
    "training_time": "wall-clock pretraining time",
}
COMPUTE_LABELS = {
    "epochs": "Epochs",
    "steps": "Optimizer steps",
    "batch_size": "Batch size",
    "learning_rate": "Learning rate",
    "hardware": "Hardware",
    "training_time": "Training time",
}
METRIC_LABELS = {
    "knn_top1_accuracy": "kNN top-1 accuracy",
    "knn_top5_accuracy": "kNN top-5 accuracy",
    "linear_probe_top1_accuracy": "Linear probe top-1 accuracy",
    "linear_probe_top5_accuracy": "Linear probe top-5 accuracy",
}


class HubPushError(RuntimeError):
    """Raised when creating the repository or uploading fails; the message says how to retry."""


# ----------------------------------------------------------------------------- image processor


def build_image_processor(image_size: int, image_mean: list[float], image_std: list[float]) -> BitImageProcessorPil:
    """A standard transformers image processor that reproduces pretraining's input pipeline (`ascl_hf.data`):
    RGB, shorter side resized to `image_size` (bicubic), centre crop to image_size², rescale to [0, 1], normalise.

    Saved as `BitImageProcessor`, so `AutoImageProcessor` loads it anywhere (with or without torchvision, and
    without ascl-hf installed) and the `image-feature-extraction` pipeline finds it.
    """
    if len(image_mean) != 3 or len(image_std) != 3:
        raise ValueError(f"image_mean and image_std need one value per RGB channel; got {image_mean}, {image_std}.")
    return BitImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[float(value) for value in image_mean],
        image_std=[float(value) for value in image_std],
    )


# ----------------------------------------------------------------------------- model card


def results_to_eval_results(results: list[dict], model_name: str) -> list[EvalResult]:
    """Results records (see `ascl_hf.evaluation`) → `EvalResult`s for the card's `model-index` metadata.

    `metric_type` keeps the record's exact metric name (e.g. `knn_top1_accuracy`) so that kNN, linear-probe,
    top-1 and top-5 numbers on the same dataset stay distinguishable; the protocol goes into `metric_args`.
    """
    eval_results = []
    for record in results:
        missing = [key for key in ("dataset", "split", "metric", "value") if key not in record]
        if missing:
            raise ValueError(
                f"Result record {record} lacks {missing}; build records with ascl_hf.evaluation.make_record."
            )
        eval_results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image classification on frozen features",
                dataset_type=record["dataset"],
                dataset_name=record["dataset"],
                dataset_split=record["split"],
                metric_type=record["metric"],
                metric_name=METRIC_LABELS.get(record["metric"], record["metric"]),
                metric_value=float(record["value"]),
                metric_args=dict(record.get("protocol") or {}) or None,
            )
        )
    return eval_results


def _protocol_text(protocol: dict | None) -> str:
    return ", ".join(f"{key}={value}" for key, value in (protocol or {}).items()) or "—"


def _hyperparameters(config) -> list[tuple[str, object]]:
    rows = [("Framework", config.framework), ("Relation", config.relation)]
    rows.append(("Neighbours K (`num_neighbors`)", config.num_neighbors))
    rows.append(("Temperature τ (`temperature`)", config.temperature))
    rows.append(("Target temperature τ' (`target_temperature`)", config.target_temperature))
    if config.framework == "moco":
        rows.append(("Queue size (`queue_size`)", config.queue_size))
    rows.append(("Momentum m (`momentum`)", config.momentum))
    head = (config.backbone_hidden_size, config.projection_hidden_size, config.projection_dim)
    rows.append(("Projection head", "→".join(map(str, head))))
    if config.framework == "byol":
        predictor = (config.projection_dim, config.predictor_hidden_size, config.projection_dim)
        rows.append(("Predictor", "→".join(map(str, predictor))))
    return rows


def render_model_card(
    config,
    *,
    image_size: int,
    image_mean: list[float],
    image_std: list[float],
    card_data: dict | None = None,
    results: list[dict] | None = None,
    embedding_plot: str | None = None,
    plain_backbone: bool = False,
    default_model_id: str = "your-organisation/ascl-model",
) -> ModelCard:
    """Renders the model card of an ASCL checkpoint from `ascl_hf/templates/model_card.md`.

    Args:
        config: the model's `AsclConfig` (hyperparameters and backbone are read from it).
        card_data: optional facts only the caller knows; keys in `CARD_FIELDS`.
        results: measured results records (`{"dataset", "split", "metric", "value", "protocol"}`); they become the
            `model-index` metadata and the results table. Nothing else is ever reported.
        embedding_plot: file name, relative to the card, of an embedding map to show.
        plain_backbone: the card of a plain-transformers backbone export (no custom code).
    """
    card_data = dict(card_data or {})
    unknown = sorted(set(card_data) - set(CARD_FIELDS))
    if unknown:
        raise ValueError(f"Unknown card_data keys {unknown}; allowed keys: {sorted(CARD_FIELDS)}.")
    results = list(results or [])
    model_id = card_data.get("model_id") or default_model_id
    model_name = card_data.get("model_name") or model_id.split("/")[-1]
    datasets = card_data.get("datasets")
    datasets = [datasets] if isinstance(datasets, str) else datasets
    backbone_config = config.backbone_config
    metadata = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=card_data.get("license", "apache-2.0"),
        tags=[*TAGS, backbone_config.model_type],
        datasets=datasets or None,
        eval_results=results_to_eval_results(results, model_name) or None,
    )
    details = []
    for field in ("depths", "hidden_sizes", "layer_type"):
        if getattr(backbone_config, field, None) is not None:
            details.append(f"{field} {getattr(backbone_config, field)}")
    if config.small_image_stem:
        max_pool = "max-pool kept" if config.small_image_stem_max_pool else "no max-pool"
        stem = f"3×3 stride-1 convolution, {max_pool}"
    else:
        stem = "the backbone's standard stem"
    pretraining_data = card_data.get("pretraining_data") or (
        ", ".join(datasets) if datasets else "Not recorded for this checkpoint."
    )
    return ModelCard.from_template(
        metadata,
        template_path=str(TEMPLATE_PATH),
        model_id=model_id,
        model_name=model_name,
        plain_backbone=plain_backbone,
        has_predictor=config.framework == "byol",
        backbone_type=backbone_config.model_type,
        backbone_class=f"{type(backbone_config).__name__.removesuffix('Config')}Model",
        backbone_details=", ".join(details),
        stem=stem,
        small_image_stem=config.small_image_stem,
        hidden_size=config.backbone_hidden_size,
        image_size=image_size,
        image_mean=[round(float(value), 4) for value in image_mean],
        image_std=[round(float(value), 4) for value in image_std],
        license=metadata.license,
        hyperparameters=_hyperparameters(config),
        compute=[(label, card_data[key]) for key, label in COMPUTE_LABELS.items() if card_data.get(key) is not None],
        pretraining_data=pretraining_data,
        results=[
            {
                "dataset": record["dataset"],
                "split": record["split"],
                "metric_name": METRIC_LABELS.get(record["metric"], record["metric"]),
                "value": f"{float(record['value']):.4f}",
                "protocol": _protocol_text(record.get("protocol")),
            }
            for record in results
        ],
        embedding_plot=embedding_plot,
    )


# ----------------------------------------------------------------------------- export


@contextlib.contextmanager
def _atomic_directory(output_dir: Path) -> Iterator[Path]:
    """Yields a staging directory next to `output_dir`; on success it replaces `output_dir`, on failure vanishes.

    The staging directory is a sibling so that the final rename stays on one filesystem (and is atomic there).
    An existing `output_dir` is moved aside only once the new folder is complete, and restored if the swap fails.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        previous = None
        if output_dir.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.previous-", dir=output_dir.parent))
            os.replace(output_dir, previous / output_dir.name)
        try:
            os.replace(staging, output_dir)
        except BaseException:
            if previous is not None:
                os.replace(previous / output_dir.name, output_dir)
            raise
        finally:
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # no-op after a successful rename


def check_plain_backbone_exportable(config) -> None:
    """Raises ValueError when the backbone cannot be saved as a plain transformers checkpoint."""
    if config.small_image_stem:
        raise ValueError(
            "export_backbone=True needs the ImageNet-style stem, but this model uses small_image_stem=True: its 3×3 "
            "stride-1 stem convolution (and missing max-pool) cannot be expressed by a plain transformers "
            "ResNetModel config, which always builds a 7×7 stride-2 stem. Export it with export_backbone=False "
            "(loads with trust_remote_code=True) instead."
        )


def required_files(folder: str | Path) -> list[str]:
    """The files an export folder must hold: the common ones, plus the custom code when config.json has auto_map."""
    config_path = Path(folder) / "config.json"
    has_auto_map = config_path.exists() and "auto_map" in json.loads(config_path.read_text())
    return [*COMMON_FILES, *(CUSTOM_CODE_FILES if has_auto_map else ())]


def is_exported_folder(folder: str | Path) -> bool:
    """True when `folder` holds a complete export (weights, configs, card and, for ASCL exports, code)."""
    return all((Path(folder) / name).is_file() for name in required_files(folder))


def _check_export(folder: Path, plain_backbone: bool) -> None:
    config = json.loads((folder / "config.json").read_text())
    if plain_backbone == ("auto_map" in config):
        expected = "no auto_map (plain transformers)" if plain_backbone else "an auto_map for trust_remote_code"
        raise RuntimeError(
            f"The exported config.json should have {expected}. For ASCL exports, `import ascl_hf` (which calls "
            "register_for_auto_class) before loading the model you export."
        )
    missing = [name for name in required_files(folder) if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"The export is missing {missing}; it was not published.")


def export_model(
    model,
    output_dir: str | Path,
    *,
    image_size: int,
    image_mean: list[float],
    image_std: list[float],
    card_data: dict | None = None,
    results: list[dict] | None = None,
    embedding_plot: str | Path | None = None,
    export_backbone: bool = False,
) -> Path:
    """Writes a complete, Hub-ready feature-extractor folder for `model` (an `AsclModel`) and returns its path.

    Args:
        model: the pretrained `AsclModel`; momentum encoder and queue are never written.
        output_dir: the folder to create; an existing one is replaced only once the new export is complete.
        image_size / image_mean / image_std: the pretraining input size and normalisation (per RGB channel), written
            as `preprocessor_config.json`.
        card_data: facts for the model card (keys in `CARD_FIELDS`), e.g. `{"model_id": "org/name", "epochs": 200}`.
        results: measured results records (see `ascl_hf.evaluation.save_results`).
        embedding_plot: a PNG to copy into the folder and show on the card.
        export_backbone: write the backbone alone as a plain transformers checkpoint (ImageNet-style stem only).
    """
    if export_backbone:
        check_plain_backbone_exportable(model.config)
    output_dir = Path(output_dir)
    if embedding_plot is not None and not Path(embedding_plot).is_file():
        raise FileNotFoundError(f"Embedding plot {embedding_plot} does not exist; pass an existing image or None.")
    with _atomic_directory(output_dir) as staging:
        if export_backbone:
            model.backbone.save_pretrained(staging)
        else:
            model.save_pretrained(staging)
        build_image_processor(image_size, image_mean, image_std).save_pretrained(staging)
        plot_name = None
        if embedding_plot is not None:
            plot_name = Path(embedding_plot).name
            shutil.copyfile(embedding_plot, staging / plot_name)
        card = render_model_card(
            model.config,
            image_size=image_size,
            image_mean=image_mean,
            image_std=image_std,
            card_data=card_data,
            results=results,
            embedding_plot=plot_name,
            plain_backbone=export_backbone,
            default_model_id=output_dir.name,
        )
        card.save(staging / "README.md")
        _check_export(staging, plain_backbone=export_backbone)
    return output_dir


# ----------------------------------------------------------------------------- push


def retry_command(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """The `scripts/push_to_hub.py` command that uploads `folder` again (the token is left out on purpose)."""
    command = f"python scripts/push_to_hub.py --model_dir {folder} --hub_model_id {repo_id}"
    if private:
        command += " --private"
    if revision:
        command += f" --revision {revision}"
    return command


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload ASCL feature extractor",
) -> str:
    """Uploads an exported folder to the Hub model repository `repo_id` in one commit; returns the repository URL.

    Creates the repository if needed (`private` only applies to a new one) and the branch `revision` if missing.
    `token=None` uses huggingface_hub's usual sources (HF_TOKEN, `hf auth login`). The local folder is only read:
    after a failure it is intact and `HubPushError` says how to retry.
    """
    folder = Path(folder)
    if not is_exported_folder(folder):
        missing = [name for name in required_files(folder) if not (folder / name).is_file()]
        raise FileNotFoundError(
            f"{folder} is not a complete export (missing {missing}); create it with ascl_hf.hub.export_model or "
            f"`python scripts/push_to_hub.py --model_dir <model folder> --hub_model_id {repo_id}`."
        )
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=["__pycache__/*", "*.pyc", ".*"],
        )
    except Exception as error:  # network, authentication or server errors alike: the advice is the same
        raise HubPushError(
            f"Uploading {folder} to https://huggingface.co/{repo_id} failed ({type(error).__name__}: {error}). "
            f"The local folder is intact. Check your token (`hf auth login` or --token) and network, then retry "
            f"with: {retry_command(folder, repo_id, private=private, revision=revision)}"
        ) from error
    return str(repo_url) if revision is None else f"{repo_url}/tree/{revision}"


__all__ = [
    "HubPushError",
    "build_image_processor",
    "check_plain_backbone_exportable",
    "export_model",
    "is_exported_folder",
    "push_to_hub",
    "render_model_card",
    "results_to_eval_results",
    "retry_command",
]
