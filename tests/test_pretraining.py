"""The pretraining loop end to end on tiny settings: exact resume, NaN stop, export that loads."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from transformers import AutoModel

import ascl_hf.modeling_ascl
from ascl_hf.checkpointing import list_checkpoints
from ascl_hf.pretraining import NonFiniteLossError, run_pretraining
from ascl_hf.pretraining_arguments import PretrainingArguments, parse_pretraining_arguments

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_arguments(output_dir, **overrides) -> PretrainingArguments:
    values = dict(
        dataset="digits", image_size=16, backbone="resnet18-narrow", projection_hidden_size=32, projection_dim=16,
        queue_size=100, per_device_batch_size=32, max_steps=6, warmup_epochs=0.1, num_workers=0,
        knn_train_split="none", report_to="none", logging_steps=1, output_dir=str(output_dir),
    )
    values.update(overrides)
    return PretrainingArguments(**values)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each run builds its own Accelerator; the singleton state must not leak between runs in one process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def checkpoint_tensors(checkpoint):
    return load_file(checkpoint / "model.safetensors")


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Run 6 steps saving at step 3; a second run resumed from that checkpoint ends in the same state."""
    run_pretraining(tiny_arguments(tmp_path / "full", checkpointing_steps=3, keep_checkpoints=5))
    full_checkpoints = list_checkpoints(tmp_path / "full")
    assert [path.name for path in full_checkpoints] == ["step_00000003", "step_00000006"]

    exported = run_pretraining(
        tiny_arguments(tmp_path / "resumed", resume_from_checkpoint=str(full_checkpoints[0]))
    )
    expected = checkpoint_tensors(full_checkpoints[-1])
    resumed = checkpoint_tensors(list_checkpoints(tmp_path / "resumed")[-1])
    assert expected.keys() == resumed.keys()
    assert any(name.startswith("queue.") for name in expected) and any(
        name.startswith("momentum_backbone.") for name in expected
    )
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # The resumed run really started at step 4 (a run from scratch with the same seed would also match).
    full_log = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in resumed_log] == [4, 5, 6]
    for before, after in zip(full_log[3:], resumed_log):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)

    model = AutoModel.from_pretrained(exported).eval()
    assert model(torch.randn(2, 3, 16, 16)).pooler_output.shape == (2, 128)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_loss = ascl_hf.modeling_ascl.moco_soft_loss
    calls = {"count": 0}

    def loss_that_breaks_at_step_3(*args, **kwargs):
        calls["count"] += 1
        result = real_loss(*args, **kwargs)
        if calls["count"] == 3:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(ascl_hf.modeling_ascl, "moco_soft_loss", loss_that_breaks_at_step_3)
    with pytest.raises(NonFiniteLossError, match=r"at step 3; stopping. last good checkpoint: .*step_00000002"):
        run_pretraining(tiny_arguments(tmp_path, checkpointing_steps=2))
    checkpoints = list_checkpoints(tmp_path)
    assert [path.name for path in checkpoints] == ["step_00000002"]
    state = checkpoint_tensors(checkpoints[0])
    assert all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point())
    assert not (tmp_path / "final").exists()


def test_yaml_presets_parse_and_flags_override_them(tmp_path):
    arguments = parse_pretraining_arguments(["--config", str(CONFIGS / "cifar10_resnet18.yaml"), "--epochs", "3"])
    assert (arguments.backbone, arguments.queue_size, arguments.epochs) == ("resnet18", 4096, 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue_sise: 5\n")
    with pytest.raises(ValueError, match="unknown keys \\['queue_sise'\\]"):
        parse_pretraining_arguments(["--config", str(bad)])


def test_streaming_dataset_trains_and_exports(tmp_path):
    exported = run_pretraining(tiny_arguments(tmp_path, streaming=True, max_steps=3, warmup_steps=1))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert (exported / "model.safetensors").is_file()


def test_plain_backbone_export_matches_the_ascl_features(tmp_path):
    from transformers import ResNetModel

    exported = run_pretraining(tiny_arguments(tmp_path, small_image_stem=False, export_backbone=True, max_steps=2))
    ascl = AutoModel.from_pretrained(exported).eval()
    plain = ResNetModel.from_pretrained(tmp_path / "final-backbone").eval()
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(images).pooler_output.flatten(1), ascl(images).pooler_output)


def test_plain_backbone_export_rejects_the_small_stem(tmp_path):
    with pytest.raises(ValueError, match="--export_backbone needs the ImageNet-style stem"):
        tiny_arguments(tmp_path, export_backbone=True)
