"""Export folders, model card, push (mocked HfApi) and fine-tuning from an export. CPU only, no network."""

import contextlib
import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ResNetForImageClassification,
    ResNetModel,
)

from ascl_hf import AsclConfig, AsclModel, hub
from conftest import run_without_ascl_hf, tiny_backbone_config

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
CARD_MODEL_ID = "your-org/ascl-tiny"
RESULTS = [
    {"dataset": "digits", "split": "test", "metric": "knn_top1_accuracy", "value": 0.875,
     "protocol": {"name": "weighted_knn", "k": 200, "temperature": 0.1}},
    {"dataset": "digits", "split": "test", "metric": "linear_probe_top1_accuracy", "value": 0.9125,
     "protocol": {"name": "linear_probe_fast"}},
]
EXPORT_SETTINGS = {"image_size": 32, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.25, 0.2, 0.15]}


def load_script(name: str):
    """Imports scripts/<name>.py as a module, so that tests call its `main(argv)` in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPOSITORY_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@contextlib.contextmanager
def transformers_warnings():
    """Collects the warnings transformers logs (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def model() -> AsclModel:
    """A tiny ImageNet-stem model whose BatchNorm statistics have moved away from their initial values."""
    torch.manual_seed(0)
    config = AsclConfig(backbone_config=tiny_backbone_config(), projection_hidden_size=8, projection_dim=4,
                        queue_size=8)
    model = AsclModel(config).train()
    images = torch.randn(8, 3, 32, 32)
    for _ in range(2):
        model(images, images.flip(-1))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    plot = tmp_path_factory.mktemp("plot") / "embedding_map.png"
    Image.new("RGB", (8, 8), "white").save(plot)
    return hub.export_model(model, tmp_path_factory.mktemp("exports") / "ascl-tiny", **EXPORT_SETTINGS,
                            card_data={"model_id": CARD_MODEL_ID, "datasets": ["cifar10"], "epochs": 2},
                            results=RESULTS, embedding_plot=str(plot))


@pytest.fixture(scope="module")
def exported_backbone(model, tmp_path_factory) -> Path:
    return hub.export_model(model, tmp_path_factory.mktemp("exports") / "resnet-tiny", **EXPORT_SETTINGS,
                            card_data={"model_id": "your-org/resnet-tiny"}, export_backbone=True)


# ----------------------------------------------------------------------------- (a) loading everywhere


def test_export_folder_holds_exactly_what_a_user_needs(exported):
    names = {path.name for path in exported.iterdir()}
    assert names == {*hub.COMMON_FILES, *hub.CUSTOM_CODE_FILES, "embedding_map.png"}
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_ascl.AsclConfig", "AutoModel": "modeling_ascl.AsclModel"}
    assert hub.is_exported_folder(exported)


def test_export_loads_without_ascl_hf_through_auto_classes_and_pipeline(model, exported, images, tmp_path):
    torch.save(images, tmp_path / "images.pt")
    torch.save(model(images).pooler_output, tmp_path / "expected.pt")
    stdout = run_without_ascl_hf(f"""
        import numpy, torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel, pipeline
        folder = {str(exported)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            features = model(torch.load({str(tmp_path / "images.pt")!r})).pooler_output
        torch.testing.assert_close(features, torch.load({str(tmp_path / "expected.pt")!r}))
        processor = AutoImageProcessor.from_pretrained(folder)
        assert processor.size["shortest_edge"] == processor.crop_size["height"] == processor.crop_size["width"] == 32
        image = Image.new("RGB", (50, 40), "teal")
        extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
        assert numpy.array(extractor(image, pool=True)).shape == (1, 16)
        assert numpy.array(extractor(image)).shape == (1, 16, 4, 4)  # the last feature map
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = model(pixel_values).pooler_output
        torch.testing.assert_close(torch.tensor(extractor(image, pool=True)), expected)
        assert "ascl_hf" not in sys.modules
        print("export-ok", type(model).__module__)
    """, tmp_path)
    assert "export-ok transformers_modules" in stdout


# ----------------------------------------------------------------------------- (b) clean, small weights


def test_export_loads_without_key_warnings_and_carries_no_training_state(model, exported, exported_backbone):
    with transformers_warnings() as warnings:
        loaded, loading_info = AutoModel.from_pretrained(exported, output_loading_info=True)
    assert not any(loading_info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    key_warnings = [r.getMessage() for r in warnings if re.search(r"missing|unexpected|newly initiali", r.getMessage(),
                                                                  re.IGNORECASE)]
    assert key_warnings == []
    from safetensors.torch import load_file

    saved = load_file(exported / "model.safetensors")
    assert not any(name.startswith(("momentum_", "queue.")) for name in saved)
    assert any(name.startswith("projection.") for name in saved)
    bare_backbone_size = (exported_backbone / "model.safetensors").stat().st_size
    assert (exported / "model.safetensors").stat().st_size <= 1.25 * bare_backbone_size


# ----------------------------------------------------------------------------- (c) plain transformers backbone


def test_backbone_export_is_a_plain_resnet_that_classification_heads_load(model, exported_backbone, images):
    assert not list(exported_backbone.glob("*.py"))
    config = json.loads((exported_backbone / "config.json").read_text())
    assert config["model_type"] == "resnet" and "auto_map" not in config
    resnet = AutoModel.from_pretrained(exported_backbone).eval()
    assert type(resnet) is ResNetModel
    with torch.no_grad():
        torch.testing.assert_close(resnet(images).pooler_output.flatten(1), model(images).pooler_output)
    with transformers_warnings() as warnings:
        classifier = ResNetForImageClassification.from_pretrained(exported_backbone, num_labels=3).eval()
    assert classifier(images).logits.shape == (3, 3)
    torch.testing.assert_close(classifier.resnet(images).pooler_output, resnet(images).pooler_output)
    assert any("classifier" in record.getMessage() for record in warnings)  # the new head, nothing else
    auto_classifier = AutoModelForImageClassification.from_pretrained(exported_backbone, num_labels=3)
    assert type(auto_classifier) is ResNetForImageClassification
    assert type(AutoImageProcessor.from_pretrained(exported_backbone)).__name__.startswith("BitImageProcessor")


def test_backbone_export_refuses_the_small_image_stem(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="small_image_stem=True.*3×3"):
        hub.export_model(AsclModel(tiny_config), tmp_path / "plain", **EXPORT_SETTINGS, export_backbone=True)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- (d) push with a mocked HfApi


def uploaded_files(upload_call) -> set[str]:
    """The files `upload_folder` would send, given the folder and patterns it was called with."""
    folder = Path(upload_call.kwargs["folder_path"])
    paths = [str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()]
    return set(filter_repo_objects(paths, allow_patterns=upload_call.kwargs.get("allow_patterns"),
                                   ignore_patterns=upload_call.kwargs.get("ignore_patterns")))


@pytest.mark.parametrize("private, revision", [(False, None), (True, "v1.0")])
def test_push_creates_the_repository_and_uploads_the_folder_in_one_commit(exported, private, revision):
    with mock.patch("ascl_hf.hub.HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.return_value = "https://huggingface.co/org/ascl-tiny"
        url = hub.push_to_hub(exported, "org/ascl-tiny", private=private, revision=revision, token="hf_test")
    api_class.assert_called_once_with(token="hf_test")
    api.create_repo.assert_called_once_with("org/ascl-tiny", private=private, repo_type="model", exist_ok=True)
    if revision is None:
        api.create_branch.assert_not_called()
        assert url == "https://huggingface.co/org/ascl-tiny"
    else:
        api.create_branch.assert_called_once_with("org/ascl-tiny", branch=revision, repo_type="model", exist_ok=True)
        assert url == f"https://huggingface.co/org/ascl-tiny/tree/{revision}"
    api.upload_folder.assert_called_once()
    upload = api.upload_folder.call_args
    assert upload.kwargs["repo_id"] == "org/ascl-tiny" and upload.kwargs["revision"] == revision
    assert Path(upload.kwargs["folder_path"]) == exported
    assert uploaded_files(upload) == {*hub.COMMON_FILES, *hub.CUSTOM_CODE_FILES, "embedding_map.png"}


def test_failed_upload_keeps_the_folder_and_the_cli_exits_with_a_retry_command(exported, capsys):
    before = folder_digest(exported)
    push_script = load_script("push_to_hub")
    with mock.patch("ascl_hf.hub.HfApi") as api_class:
        api_class.return_value.upload_folder.side_effect = ConnectionError("network is unreachable")
        exit_code = push_script.main(["--model_dir", str(exported), "--hub_model_id", "org/ascl-tiny", "--private",
                                      "--revision", "dev"])
    assert exit_code == 1
    error = capsys.readouterr().err
    assert "network is unreachable" in error
    assert f"python scripts/push_to_hub.py --model_dir {exported} --hub_model_id org/ascl-tiny --private " \
           "--revision dev" in error
    assert folder_digest(exported) == before


def test_cli_exports_a_save_pretrained_folder_before_pushing(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "trained")
    push_script = load_script("push_to_hub")
    with mock.patch("ascl_hf.hub.HfApi") as api_class:
        api_class.return_value.create_repo.return_value = "https://huggingface.co/org/ascl-tiny"
        exit_code = push_script.main(["--model_dir", str(tmp_path / "trained"), "--hub_model_id", "org/ascl-tiny",
                                      "--image_size", "32"])
    assert exit_code == 0, capsys.readouterr().err
    upload = api_class.return_value.upload_folder.call_args
    assert Path(upload.kwargs["folder_path"]) == tmp_path / "trained-hub"
    assert hub.is_exported_folder(tmp_path / "trained-hub")
    assert 'model_id = "org/ascl-tiny"' in (tmp_path / "trained-hub" / "README.md").read_text()


# ----------------------------------------------------------------------------- (e) model card


def test_card_metadata_carries_exactly_the_measured_results(exported):
    metadata = metadata_load(exported / "README.md")
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert set(hub.TAGS) <= set(metadata["tags"]) and metadata["datasets"] == ["cifar10"]
    [entry] = metadata["model-index"]
    reported = {(result["dataset"]["type"], metric["type"]): metric["value"]
                for result in entry["results"] for metric in result["metrics"]}
    assert reported == {("digits", record["metric"]): record["value"] for record in RESULTS}
    card = ModelCard.load(exported / "README.md")
    assert {result.metric_value for result in card.data.eval_results} == {0.875, 0.9125}
    assert "| digits | test | kNN top-1 accuracy | 0.8750 |" in card.text
    assert "![t-SNE map of test-set features](embedding_map.png)" in card.text
    for expected in ("Adaptive Soft Contrastive Learning", "2207.11163", "| Queue size (`queue_size`) | 8 |",
                     "| Target temperature τ' (`target_temperature`) | 0.05 |", "| Epochs | 2 |", "## Limitations"):
        assert expected in card.text


def test_card_without_results_says_none_were_measured(model):
    card = hub.render_model_card(model.config, **EXPORT_SETTINGS)
    assert "No evaluation results were measured" in card.text
    assert "model-index" not in str(card.data.to_dict())
    with pytest.raises(ValueError, match="Unknown card_data keys"):
        hub.render_model_card(model.config, **EXPORT_SETTINGS, card_data={"epoch": 3})


@pytest.mark.parametrize("folder_fixture", ["exported", "exported_backbone"])
def test_card_usage_snippet_runs_against_the_folder(folder_fixture, request, capsys):
    folder = request.getfixturevalue(folder_fixture)
    card_text = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card_text, re.DOTALL).group(1)
    model_id = re.search(r'model_id = "([^"]+)"', snippet).group(1)
    assert model_id.startswith("your-org/")
    exec(compile(snippet.replace(model_id, str(folder)), "model_card_snippet", "exec"), {})
    assert "torch.Size([1, 16])" in capsys.readouterr().out


# ----------------------------------------------------------------------------- (f) atomic export


def test_failed_export_leaves_nothing_behind_and_keeps_the_previous_export(model, tmp_path):
    previous = hub.export_model(model, tmp_path / "export", **EXPORT_SETTINGS)
    previous_digest = folder_digest(previous)
    injected = RuntimeError("injected failure while rendering the card")
    with mock.patch("ascl_hf.hub.render_model_card", side_effect=injected):
        with pytest.raises(RuntimeError, match="injected"):
            hub.export_model(model, tmp_path / "export", **EXPORT_SETTINGS)
        with pytest.raises(RuntimeError, match="injected"):
            hub.export_model(model, tmp_path / "fresh", **EXPORT_SETTINGS)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]
    assert folder_digest(tmp_path / "export") == previous_digest
    hub.export_model(model, tmp_path / "export", **EXPORT_SETTINGS, results=RESULTS)  # a complete export replaces it
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]
    assert "kNN top-1 accuracy" in (tmp_path / "export" / "README.md").read_text()


# ----------------------------------------------------------------------------- fine-tuning from an export


def test_finetune_script_trains_a_head_on_an_export(exported, capsys):
    accuracy = load_script("finetune").main(["--model", str(exported), "--epochs", "1", "--batch_size", "128"])
    assert 0.0 <= accuracy <= 1.0
    assert "epoch 1: train loss" in capsys.readouterr().out


def test_exported_image_processor_reproduces_the_pretraining_input_pipeline():
    """A non-square photo through the exported processor ≈ through ascl_hf.data + the kNN monitor's transform."""
    import numpy
    from PIL import Image

    from ascl_hf.augment import EvalTransform
    from ascl_hf.data import decode_to_rgb
    from ascl_hf.hub import build_image_processor

    pixels = numpy.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=numpy.uint8)
    image = Image.fromarray(pixels).resize((200, 120), Image.Resampling.BICUBIC)  # smooth blobs, 5:3
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    processed = build_image_processor(32, mean, std)(images=image, return_tensors="pt")["pixel_values"]
    trained_on = EvalTransform(32, mean, std)(decode_to_rgb(image, 32)[None])
    assert processed.shape == trained_on.shape == (1, 3, 32, 32)
    # Same crop and scale (resize-then-crop vs crop-then-resize moves the grid by under a pixel); squashing the
    # whole 5:3 image into the square instead, as a plain height×width resize would, is ~7x further off.
    assert (processed - trained_on).abs().mean() < 0.2
