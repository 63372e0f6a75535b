"""Tests for the batched two-view augmentation."""

import pytest
import torch
import torch.nn.functional as F

from ascl_hf.augment import AugmentConfig, EvalTransform, TwoViewAugment, _crop_affine, _crop_boxes, _resize_crops


def colourful_images(batch_size=16, size=32, seed=0):
    """Smooth saturated colour images ``(batch_size, 3, size, size)`` uint8."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, 4, 4, generator=generator)
    return (F.interpolate(coarse, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)


def unnormalize(views, augment):
    mean = torch.tensor(augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(augment.std).view(1, 3, 1, 1)
    return views * std + mean


def saturation(images):
    """Per-image mean of (max channel − min channel): 0 for grey images."""
    return (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2))


def test_shapes_dtype_and_exposed_processor_values():
    augment = TwoViewAugment(AugmentConfig(image_size=24))
    query_view, key_view = augment(colourful_images(size=40))
    assert query_view.shape == key_view.shape == (16, 3, 24, 24)
    assert query_view.dtype == key_view.dtype == torch.float32
    assert augment.image_size == 24
    assert augment.mean == [0.485, 0.456, 0.406] and augment.std == [0.229, 0.224, 0.225]


def test_weak_view_with_full_crop_and_no_flip_equals_input():
    images = colourful_images()
    augment = TwoViewAugment(AugmentConfig(image_size=32, crop_scale=(1.0, 1.0), flip_probability=0.0))
    key_view = unnormalize(augment.weak_view(images), augment)
    torch.testing.assert_close(key_view, images.float() / 255, atol=1e-5, rtol=0)


def test_flip_probability_one_mirrors_the_weak_view():
    images = colourful_images()
    augment = TwoViewAugment(AugmentConfig(image_size=32, crop_scale=(1.0, 1.0), flip_probability=1.0))
    key_view = unnormalize(augment.weak_view(images), augment)
    torch.testing.assert_close(key_view, images.float().flip(-1) / 255, atol=1e-5, rtol=0)


def test_weak_view_keeps_colour_statistics_strong_view_changes_them():
    images = colourful_images(batch_size=64)
    augment = TwoViewAugment(AugmentConfig(image_size=32, crop_scale=(1.0, 1.0)))
    generator = torch.Generator().manual_seed(0)
    query_view, key_view = (unnormalize(view, augment) for view in augment(images, generator))
    inputs = images.float() / 255
    # Crop and flip only move pixels: each image's mean colour stays put.
    torch.testing.assert_close(key_view.mean(dim=(2, 3)), inputs.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    saturation_change = (saturation(query_view) - saturation(inputs)).abs()
    assert (saturation_change > 0.05).sum() >= 16  # jitter (p 0.8) and grayscale (p 0.2) hit many samples
    assert (saturation(query_view) < 1e-6).sum() >= 3  # some samples went grey
    assert query_view.min() >= 0 and query_view.max() <= 1 + 1e-6


def test_same_generator_seed_same_views_different_seed_different_views():
    images = colourful_images()
    augment = TwoViewAugment()
    first = augment(images, torch.Generator().manual_seed(7))
    again = augment(images, torch.Generator().manual_seed(7))
    other = augment(images, torch.Generator().manual_seed(8))
    for view, repeated, different in zip(first, again, other):
        torch.testing.assert_close(view, repeated, atol=0, rtol=0)
        assert not torch.allclose(view, different)


def test_views_differ_from_each_other_and_per_sample():
    images = colourful_images()[:1].repeat(8, 1, 1, 1)
    query_view, key_view = TwoViewAugment()(images, torch.Generator().manual_seed(0))
    assert not torch.allclose(query_view, key_view)
    # One image repeated: per-sample randomness gives different views of it.
    assert not torch.allclose(query_view[0], query_view[1])
    assert not torch.allclose(key_view[0], key_view[1])


def test_strong_key_view_option():
    images = colourful_images(batch_size=64)
    augment = TwoViewAugment(AugmentConfig(key_view="strong", crop_scale=(1.0, 1.0), flip_probability=0.0))
    _, key_view = augment(images, torch.Generator().manual_seed(0))
    assert (saturation(unnormalize(key_view, augment)) < 1e-6).sum() >= 3


def test_blur_smooths_the_image():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    images[:, :, ::2] = 255  # stripes: maximal vertical gradient
    config = AugmentConfig(crop_scale=(1.0, 1.0), flip_probability=0.0, color_jitter_probability=0.0,
                           grayscale_probability=0.0, blur_probability=1.0, blur_sigma=(1.5, 2.0))
    augment = TwoViewAugment(config)
    strong = unnormalize(augment.strong_view(images), augment)
    weak = unnormalize(augment.weak_view(images), augment)
    assert strong.diff(dim=2).abs().mean() < 0.2 * weak.diff(dim=2).abs().mean()
    torch.testing.assert_close(strong.mean(), weak.mean(), atol=0.02, rtol=0)


def test_cpu_resize_path_matches_the_grid_sample_path():
    images = colourful_images(size=32)
    config = AugmentConfig(image_size=48)  # upsampling: no antialiasing difference between the paths
    boxes, flip = _crop_boxes(16, 32, 32, config, torch.Generator().manual_seed(0))
    resized = _resize_crops(images.float() / 255, boxes, flip, 48)
    grid = F.affine_grid(_crop_affine(boxes, flip, 32, 32), [16, 3, 48, 48], align_corners=False)
    sampled = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (resized - sampled).abs().mean() < 0.01


def test_float_input_in_unit_range_is_accepted():
    images = colourful_images()
    generator_seed = 3
    from_uint8 = TwoViewAugment()(images, torch.Generator().manual_seed(generator_seed))
    from_float = TwoViewAugment()(images.float() / 255, torch.Generator().manual_seed(generator_seed))
    for a, b in zip(from_uint8, from_float):
        assert (a - b).abs().mean() < 0.02


def test_eval_transform_resizes_and_normalises():
    images = torch.full((2, 3, 40, 40), 255, dtype=torch.uint8)
    transform = EvalTransform(image_size=32)
    output = transform(images)
    assert output.shape == (2, 3, 32, 32)
    expected = (1 - torch.tensor(transform.mean)) / torch.tensor(transform.std)
    torch.testing.assert_close(output[0, :, 5, 5], expected)


@pytest.mark.parametrize("field, value", [
    ("crop_scale", (0.0, 1.0)), ("flip_probability", 1.5), ("hue", 0.6), ("blur_kernel_size", 4),
    ("key_view", "medium"), ("std", (0.1, 0.0, 0.1)),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


def test_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size, 3, height, width"):
        TwoViewAugment()(torch.zeros(2, 32, 32, dtype=torch.uint8))
