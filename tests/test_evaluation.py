"""Tests of ascl_hf.evaluation, ascl_hf.plots, the shipped metric modules and scripts/evaluate.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy
import pytest
import torch
from PIL import Image
from torch.nn import functional
from transformers import ResNetConfig, ResNetModel, ViTImageProcessor

from ascl_hf import evaluation, plots

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A randomly initialised 2-stage ResNet with a standard preprocessor_config.json."""
    folder = tmp_path_factory.mktemp("tiny_resnet")
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def separable_features(num_classes: int = 4, per_class: int = 50, dimension: int = 16, seed: int = 0):
    """Gaussian clusters around orthogonal directions, L2-normalised: (n, d) features, (n,) labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(dimension)[:num_classes] * 3.0  # (c, d)
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # (n,)
    features = centres[labels] + 0.3 * torch.randn(len(labels), dimension, generator=generator)
    return functional.normalize(features, dim=1), labels


def reference_knn_scores(bank, bank_labels, queries, num_classes, k, temperature):
    """Straightforward per-query loop, for comparison with the vectorised, chunked version."""
    bank, queries = functional.normalize(bank, dim=1), functional.normalize(queries, dim=1)
    scores = torch.zeros(len(queries), num_classes)
    for row, query in enumerate(queries):
        similarities = bank @ query
        for index in similarities.argsort(descending=True)[:k]:
            scores[row, bank_labels[index]] += math.exp(similarities[index].item() / temperature)
    return scores


# ----------------------------------------------------------------------------- kNN


def test_knn_classifies_clusters():
    features, labels = separable_features()
    ranked = evaluation.knn_classify(features[::2], labels[::2], features[1::2], num_classes=4, k=10)
    assert ranked.shape == (100, 4)
    assert torch.equal(ranked[:, 0], labels[1::2])


def test_knn_weighting_beats_majority_vote():
    # One class-0 neighbour at similarity 1, two class-1 neighbours at similarity 0.5.
    bank = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])
    bank_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    scores = evaluation.knn_predict(bank, bank_labels, query, num_classes=2, k=3, temperature=0.1)
    # Weights exp(1/0.1) against 2 exp(0.5/0.1): class 0 wins by a factor e^5 / 2.
    assert scores[0, 1].item() > 0
    assert scores[0, 0].item() / scores[0, 1].item() == pytest.approx(math.exp(5) / 2, rel=1e-4)
    # A huge temperature makes the weights equal, which is the unweighted majority vote: class 1.
    flat = evaluation.knn_classify(bank, bank_labels, query, num_classes=2, k=3, temperature=1e4, top=1)
    assert flat.item() == 1


@pytest.mark.parametrize("num_train,num_test,k", [(30, 7, 5), (50, 33, 200), (8, 3, 1)])
def test_knn_matches_reference_and_clamps_k(num_train, num_test, k):
    generator = torch.Generator().manual_seed(num_train)
    bank = torch.randn(num_train, 6, generator=generator)
    bank_labels = torch.randint(0, 3, (num_train,), generator=generator)
    queries = torch.randn(num_test, 6, generator=generator)
    scores = evaluation.knn_predict(bank, bank_labels, queries, num_classes=3, k=k, temperature=0.5, chunk_size=4)
    expected = reference_knn_scores(bank, bank_labels, queries, 3, min(k, num_train), 0.5)
    # Scores are rescaled per row for numerical safety, so compare the per-row vote shares.
    torch.testing.assert_close(scores / scores.sum(1, keepdim=True), expected / expected.sum(1, keepdim=True))


def test_knn_small_temperature_does_not_overflow():
    features, labels = separable_features()
    ranked = evaluation.knn_classify(features, labels, features, num_classes=4, k=20, temperature=0.001, top=1)
    assert torch.equal(ranked[:, 0], labels)


# ----------------------------------------------------------------------------- linear probe


def test_fast_linear_probe_separates_synthetic_features():
    features, labels = separable_features(seed=1)
    probe = evaluation.train_linear_probe_fast(features, labels, num_classes=4)
    test_features, test_labels = separable_features(seed=2)
    ranked = evaluation.linear_probe_classify(probe, test_features)
    assert (ranked[:, 0] == test_labels).float().mean() >= 0.99
    assert probe.protocol["name"] == "linear_probe_fast"


def test_paper_linear_probe_separates_synthetic_features_in_few_epochs():
    features, labels = separable_features(seed=1)
    probe = evaluation.train_linear_probe_paper(
        features, labels, num_classes=4, epochs=5, batch_size=32, milestones=(3, 4)
    )
    test_features, test_labels = separable_features(seed=2)
    ranked = evaluation.linear_probe_classify(probe, test_features, top=2)
    assert ranked.shape == (200, 2)
    assert (ranked[:, 0] == test_labels).float().mean() >= 0.99


def test_linear_probe_rejects_labels_outside_classes():
    features, labels = separable_features()
    with pytest.raises(ValueError, match="num_classes"):
        evaluation.train_linear_probe_fast(features, labels, num_classes=3)


# ----------------------------------------------------------------------------- metrics


def test_shipped_metrics_load_offline_without_network(tmp_path):
    # A fresh process with an empty HF cache, offline mode, and sockets that refuse to connect.
    program = (
        "import socket\n"
        "def refuse(*arguments, **keywords): raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "from ascl_hf import evaluation\n"
        "import torch\n"
        "ranked = torch.tensor([[0, 1], [2, 1], [1, 0], [2, 0]])\n"
        "print(evaluation.ranked_accuracies(ranked, torch.tensor([0, 1, 0, 1]), k=2))\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    completed = subprocess.run(
        [sys.executable, "-c", program], env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "{'top1_accuracy': 0.25, 'top2_accuracy': 0.75}"


def test_accuracy_module_matches_hand_count():
    metric = evaluation.load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 0]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[0, 1], references=[0, 0], normalize=False) == {"accuracy": 1}


def test_unknown_metric_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="available"):
        evaluation.load_metric("f1")


# ----------------------------------------------------------------------------- results file


def test_results_round_trip(tmp_path):
    records = [
        evaluation.make_record("digits", "test", "knn_top1_accuracy", 0.9, {"name": "weighted_knn", "k": 200}),
        evaluation.make_record("digits", "test", "linear_probe_top5_accuracy", 1.0, {"name": "linear_probe_fast"}),
    ]
    path = evaluation.save_results(tmp_path / "nested" / "results.json", records, model="some/model")
    assert evaluation.load_results(path) == {"model": "some/model", "records": records}


def test_results_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluation.make_record("digits", "test", "knn_accuracy", 0.5, {})
    with pytest.raises(ValueError, match="fraction"):
        evaluation.make_record("digits", "test", "knn_top1_accuracy", 95.0, {})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": "m", "records": [{"metric": "knn_top1_accuracy"}]}))
    with pytest.raises(ValueError, match="lacks"):
        evaluation.load_results(path)


# ----------------------------------------------------------------------------- feature extraction


def test_extract_features_from_dataset_and_loader(tiny_model_folder):
    model = ResNetModel.from_pretrained(tiny_model_folder)
    model.train()
    processor = ViTImageProcessor.from_pretrained(tiny_model_folder)
    generator = numpy.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (12, 12), dtype=numpy.uint8)) for _ in range(10)]
    dataset = datasets.Dataset.from_dict({"picture": images, "target": list(range(10))})
    features, labels = evaluation.extract_features(
        model, dataset, processor, image_column="picture", label_column="target", batch_size=4, show_progress=False
    )
    assert features.shape == (10, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(10))
    assert torch.equal(labels, torch.arange(10))
    assert model.training, "extract_features must restore the model's training mode"
    # The same images, preprocessed beforehand and given as (pixel_values, labels) batches.
    pixel_values = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixel_values, labels), batch_size=3)
    loader_features, _ = evaluation.extract_features(model, loader, show_progress=False)
    torch.testing.assert_close(loader_features, features)


def test_extract_features_names_missing_column(tiny_model_folder):
    model = ResNetModel.from_pretrained(tiny_model_folder)
    dataset = datasets.Dataset.from_dict({"img": [Image.new("L", (4, 4))], "label": [0]})
    with pytest.raises(KeyError, match="image_column"):
        evaluation.extract_features(model, dataset, ViTImageProcessor(), show_progress=False)


# ----------------------------------------------------------------------------- plots and script


def test_read_knn_history_skips_loss_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 10, "loss": 2.0}\n{"step": 10, "knn_top1": 0.4}\n\n{"step": 20, "knn_top1": 0.6}\n')
    assert plots.read_knn_history(log) == ([(10.0, 0.4), (20.0, 0.6)], "step")


def test_evaluate_script_end_to_end(tiny_model_folder, tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"epoch": epoch, "knn_top1": 0.2 * epoch}) + "\n" for epoch in range(1, 4)))
    output_directory = tmp_path / "evaluation"
    command = [
        sys.executable, str(REPOSITORY / "scripts" / "evaluate.py"), "--model", str(tiny_model_folder),
        "--dataset", "digits", "--max_train_samples", "200", "--max_test_samples", "60", "--knn_k", "20",
        "--batch_size", "50", "--output_dir", str(output_directory), "--log_file", str(log),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    assert "knn_top1_accuracy" in completed.stdout
    results = evaluation.load_results(output_directory / "results.json")
    assert results["model"] == str(tiny_model_folder)
    assert [record["metric"] for record in results["records"]] == list(evaluation.METRIC_NAMES)
    knn_protocol = results["records"][0]["protocol"]
    assert knn_protocol["k"] == 20 and knn_protocol["train_size"] == 200
    # Ten classes on a random backbone: well above chance (0.1) but not trivially perfect.
    assert 0.1 < results["records"][0]["value"] <= 1.0
    for figure in ("embedding_map.png", "knn_curve.png"):
        assert (output_directory / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_script_on_an_ascl_export_through_its_own_code(tiny_config, tmp_path):
    """scripts/evaluate.py on an exported AsclModel folder with --trust_remote_code, as for a Hub export.

    The script imports ascl_hf, whose explicit AutoModel registration transformers prefers over the folder's copy
    of the same code; loading without the package is covered in test_modeling.py and test_hub.py.
    """
    from ascl_hf import AsclModel
    from ascl_hf.hub import export_model

    folder = export_model(AsclModel(tiny_config).eval(), tmp_path / "export", image_size=32,
                          image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    command = [
        sys.executable, str(REPOSITORY / "scripts" / "evaluate.py"), "--model", str(folder), "--trust_remote_code",
        "--dataset", "digits", "--max_train_samples", "200", "--max_test_samples", "60", "--knn_k", "20",
        "--linear_probe", "none", "--output_dir", str(tmp_path / "evaluation"),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = evaluation.load_results(tmp_path / "evaluation" / "results.json")["records"]
    assert [record["metric"] for record in records] == ["knn_top1_accuracy", "knn_top5_accuracy"]
    assert 0.1 < records[0]["value"] <= 1.0
