import pytest

from ascl_hf import AsclConfig


def test_defaults_are_the_paper_imagenet_setting():
    config = AsclConfig()
    assert config.backbone_config.model_type == "resnet"
    assert config.backbone_config.hidden_sizes[-1] == 2048 and list(config.backbone_config.depths) == [3, 4, 6, 3]
    assert (config.projection_hidden_size, config.projection_dim) == (2048, 128)
    assert (config.queue_size, config.momentum, config.temperature, config.target_temperature) == (
        65536, 0.999, 0.1, 0.05)
    assert (config.num_neighbors, config.relation, config.framework) == (1, "ascl", "moco")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("relation", "soft", "one of ascl, ahcl, hard, none"),
        ("framework", "simclr", "one of moco, byol"),
        ("temperature", -0.1, "> 0"),
        ("target_temperature", 0.0, "> 0"),
        ("queue_size", 0, ">= 1"),
        ("momentum", 1.5, r"\[0, 1\]"),
        ("num_neighbors", 0, ">= 1"),
        ("projection_dim", -3, ">= 1"),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=rf"AsclConfig\.{field}=.*{message}"):
        AsclConfig(**{field: value})


def test_more_neighbours_than_queue_rows_is_rejected():
    with pytest.raises(ValueError, match=r"num_neighbors.*queue_size \(4\)"):
        AsclConfig(queue_size=4, num_neighbors=5)


def test_small_stem_requires_a_resnet():
    with pytest.raises(ValueError, match="small_image_stem"):
        AsclConfig(backbone_config={"model_type": "convnext"}, small_image_stem=True)


def test_round_trip(tmp_path):
    config = AsclConfig(queue_size=4096, relation="ahcl", num_neighbors=5, framework="byol")
    config.save_pretrained(tmp_path)
    loaded = AsclConfig.from_pretrained(tmp_path)
    assert (loaded.queue_size, loaded.relation, loaded.num_neighbors, loaded.framework) == (4096, "ahcl", 5, "byol")
    assert loaded.backbone_config.to_dict() == config.backbone_config.to_dict()
