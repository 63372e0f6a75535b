import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, ConvNextConfig

from ascl_hf import AsclConfig, AsclModel
from conftest import run_without_ascl_hf, tiny_backbone_config


def images(n=4, size=32):
    return torch.randn(n, 3, size, size)


def test_feature_extractor_shapes(tiny_config):
    model = AsclModel(tiny_config).eval()
    output = model(images())
    assert output.pooler_output.shape == (4, 16)
    assert output.last_hidden_state.shape == (4, 16, 16, 16)  # small stem keeps 32 px → 16 px after stage 2
    assert output.loss is None


def test_imagenet_stem_downsamples_and_small_stem_does_not(tiny_config):
    imagenet = AsclModel(AsclConfig(backbone_config=tiny_backbone_config(), projection_hidden_size=8,
                                    projection_dim=4, queue_size=8)).eval()
    assert imagenet(images()).last_hidden_state.shape[-1] == 4  # 32 / 2 (conv) / 2 (pool) / 2 (stage 2)
    assert AsclModel(tiny_config).eval()(images()).last_hidden_state.shape[-1] == 16


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_training_step_updates_query_only_and_loss_is_finite(tiny_config, framework):
    tiny_config.framework = framework
    model = AsclModel(tiny_config).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    query_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    key_before = {n: p.detach().clone() for n, p in model.momentum_backbone.named_parameters()}
    x = images(8)
    output = model(x, x.flip(-1))
    assert torch.isfinite(output.loss) and 0 <= output.confidence <= 1
    output.loss.backward()
    assert all(p.grad is None for p in model.momentum_backbone.parameters())
    assert all(p.grad is None for p in model.momentum_projection.parameters())
    assert all(not p.requires_grad for p in model.momentum_backbone.parameters())
    optimizer.step()
    assert any(not torch.equal(query_before[n], p) for n, p in model.backbone.named_parameters())
    assert all(torch.equal(key_before[n], p) for n, p in model.momentum_backbone.named_parameters())


def test_momentum_update_is_an_exponential_moving_average(tiny_config):
    model = AsclModel(tiny_config)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
    query = [p.detach().clone() for p in model.backbone.parameters()]
    key = [p.detach().clone() for p in model.momentum_backbone.parameters()]
    model.update_momentum_encoder(0.75)
    for q, k, updated in zip(query, key, model.momentum_backbone.parameters()):
        torch.testing.assert_close(updated, 0.75 * k + 0.25 * q)
    model.update_momentum_encoder()  # config.momentum = 0.9
    model.update_momentum_encoder(0.0)
    for q, updated in zip(query, model.momentum_backbone.parameters()):
        torch.testing.assert_close(updated, q)


def test_training_forward_enqueues_the_keys(tiny_config):
    model = AsclModel(tiny_config).train()
    x = images(6)
    model(x, x)
    assert int(model.queue.pointer) == 6
    model.eval()
    expected_keys = model.encode_keys(x)
    torch.testing.assert_close(model.queue.keys[:6].norm(dim=1), torch.ones(6))
    model(x, x)  # eval mode computes a loss but leaves the queue alone
    assert int(model.queue.pointer) == 6
    assert expected_keys.shape == (6, 16)


def test_split_batch_norm_matches_plain_encoding_when_statistics_are_frozen(tiny_config):
    """Split-BN only regroups samples: with BatchNorm in eval mode it must give the same keys, in order."""
    model = AsclModel(tiny_config).train()
    for module in model.momentum_backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    x = images(7)
    shuffled = model.encode_keys(x)
    tiny_config.shuffle_batch_norm = False
    plain = model.encode_keys(x)
    torch.testing.assert_close(shuffled, plain, rtol=1e-5, atol=1e-6)


def test_convnext_backbone():
    config = AsclConfig(
        backbone_config=ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
        projection_hidden_size=16, projection_dim=8, queue_size=16,
    )
    model = AsclModel(config).train()
    x = images(4)
    output = model(x, x)
    assert output.pooler_output.shape == (4, 16) and torch.isfinite(output.loss)
    output.loss.backward()


def test_save_load_round_trip_gives_identical_features_and_drops_training_state(tiny_config, tmp_path, caplog):
    model = AsclModel(tiny_config).train()
    x = images(8)
    for _ in range(2):  # move BatchNorm statistics and the queue away from their initial values
        model(x, x.flip(-1))
    model.eval().save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any(name.startswith(("momentum_", "queue.")) for name in saved)
    assert any(name.startswith("projection.") for name in saved)

    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, AsclModel)
    torch.testing.assert_close(loaded(x).pooler_output, model(x).pooler_output)
    for query, key in zip(loaded.backbone.state_dict().values(), loaded.momentum_backbone.state_dict().values()):
        torch.testing.assert_close(query, key)  # the momentum encoder restarts as a copy of the query encoder
    momentum_parameters = [*loaded.momentum_backbone.parameters(), *loaded.momentum_projection.parameters()]
    assert not any(parameter.requires_grad for parameter in momentum_parameters)


def test_trust_remote_code_in_a_fresh_process_without_the_package(tiny_config, tmp_path):
    model = AsclModel(tiny_config).eval()
    model.save_pretrained(tmp_path / "saved")
    folder = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "saved", folder)
    x = images(3)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).pooler_output, tmp_path / "expected.pt")
    stdout = run_without_ascl_hf(f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "ascl_hf" not in sys.modules
        x = torch.load({str(tmp_path / "x.pt")!r})
        torch.testing.assert_close(model(x).pooler_output, torch.load({str(tmp_path / "expected.pt")!r}))
        print("remote-code-ok", type(model).__module__)
    """, tmp_path)
    assert "remote-code-ok transformers_modules" in stdout
