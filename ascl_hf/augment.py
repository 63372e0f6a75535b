"""Batched two-view augmentation on the training device, in plain torch.

Strong view (query): random resized crop, horizontal flip, colour jitter, grayscale, Gaussian blur;
weak view (key): random resized crop and flip (the paper's best setting: a weakly augmented teacher).

Why plain torch and not kornia: on the 2-core CPU this was built on, kornia's ColorJitter
(an HSV round trip per op) and per-sample blur made the strong view ~44 images/s at 224 px, slower
than per-image PIL. Here:

- crop + resize + flip is one antialiased uint8 resize per image on CPU (torch's fast path), one
  ``affine_grid``/``grid_sample`` over the batch on accelerators (the flip folded into the matrix);
- brightness, contrast, saturation and hue all act linearly on RGB (hue as a rotation of the
  chroma plane in YIQ space, a linear stand-in for the HSV hue shift), and they commute, so the
  whole jitter is one per-sample ``3×3`` matrix plus a grey offset, then a single clamp;
- blur is a separable grouped convolution with one kernel per sample.

Legend: n = batch size, s = output image size.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# RGB → YIQ; its inverse maps back. Hue shifts rotate the (I, Q) plane and keep luma (Y).
RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.596, -0.274, -0.322),
    (0.211, -0.523, 0.312),
)


@dataclass
class AugmentConfig:
    """The two-view recipe. Defaults are the paper's (MoCo v2 strong view, weak key view).

    ``blur_kernel_size`` None means ``2·ceil(3·max sigma) + 1`` (13 for σ ≤ 2): wider kernels only
    add weights below 1% of the peak.
    """

    image_size: int = 32
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    color_jitter_probability: float = 0.8
    grayscale_probability: float = 0.2
    blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    key_view: str = "weak"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be ≥ 1, got {self.image_size}.")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low ≤ high ≤ 1, got {self.crop_scale}.")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low ≤ high, got {self.crop_ratio}.")
        for name in ("flip_probability", "color_jitter_probability", "grayscale_probability", "blur_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1] (a factor range 1 ± value), got {getattr(self, name)}.")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}.")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low ≤ high, got {self.blur_sigma}.")
        if self.blur_kernel_size is not None and (self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0):
            raise ValueError(f"blur_kernel_size must be a positive odd number, got {self.blur_kernel_size}.")
        if self.key_view not in ("weak", "strong"):
            raise ValueError(f"key_view must be 'weak' or 'strong', got {self.key_view!r}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need three values each, std positive; got {self.mean}, {self.std}.")


class TwoViewAugment(torch.nn.Module):
    """uint8 images → (query view, key view), each normalised and ``image_size`` square.

    Runs on whatever device the input is on; random parameters are drawn on the CPU from
    ``generator`` (or the global RNG), so a seeded generator gives the same views on any device.
    ``mean``, ``std`` and ``image_size`` are what the exported image processor must use.
    """

    def __init__(self, config: AugmentConfig | None = None):
        super().__init__()
        self.config = config or AugmentConfig()
        self.image_size = self.config.image_size
        self.mean = list(self.config.mean)
        self.std = list(self.config.std)
        self.blur_kernel_size = self.config.blur_kernel_size or 2 * math.ceil(3 * self.config.blur_sigma[1]) + 1

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            images: ``(batch_size, 3, height, width)`` uint8 (or float in [0, 1]).
            generator: a CPU `torch.Generator` for reproducible views.

        Returns:
            query_view, key_view: ``(batch_size, 3, image_size, image_size)`` float32, normalised.
        """
        query_view = self.strong_view(images, generator)
        key_view = self.strong_view(images, generator) if self.config.key_view == "strong" else self.weak_view(images, generator)
        return query_view, key_view

    def weak_view(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random resized crop and flip: ``(n, 3, h, w)`` uint8 → normalised ``(n, 3, s, s)`` float."""
        return self._normalize(self._crop_and_flip(images, generator))

    def strong_view(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop, flip, colour jitter, grayscale, blur: ``(n, 3, h, w)`` uint8 → normalised ``(n, 3, s, s)`` float."""
        config = self.config
        views = self._crop_and_flip(images, generator)
        views = _color_jitter(views, config, generator)
        views = _random_grayscale(views, config.grayscale_probability, generator)
        views = _random_blur(views, config.blur_probability, config.blur_sigma, self.blur_kernel_size, generator)
        return self._normalize(views)

    def _crop_and_flip(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``(n, 3, h, w)`` → float ``(n, 3, s, s)`` in [0, 1]."""
        _check_shape(images)
        batch_size, _, height, width = images.shape
        boxes, flip = _crop_boxes(batch_size, height, width, self.config, generator)
        if images.device.type == "cpu":
            # torch's CPU resize has a fast uint8 path (antialiased, AVX2): a loop of per-crop resizes
            # beats one float grid_sample over the batch by ~3× at 224 px.
            return _to_unit_float(_resize_crops(images, boxes, flip, self.image_size))
        # On accelerators one grid_sample over the batch avoids a kernel launch per image.
        theta = _crop_affine(boxes, flip, height, width).to(images.device)
        grid = F.affine_grid(theta, [batch_size, 3, self.image_size, self.image_size], align_corners=False)
        return F.grid_sample(_to_unit_float(images), grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """In place: the views are fresh tensors, and skipping two temporaries matters at 224 px."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return images.sub_(mean).div_(std)


class EvalTransform(torch.nn.Module):
    """Deterministic transform for the kNN monitor and evaluation: uint8 → normalised float.

    ``(batch_size, 3, height, width)`` uint8 → ``(batch_size, 3, image_size, image_size)`` float32;
    the loader already centre-crops to a square, so this only resizes (antialiased) and normalises.
    """

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.image_size = image_size
        self.mean = list(mean)
        self.std = list(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_shape(images)
        images = _to_unit_float(images)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


def _check_shape(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected images of shape (batch_size, 3, height, width), got {tuple(images.shape)}.")


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()


def _uniform(low: float, high: float, size: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(size, generator=generator) * (high - low) + low


def _bernoulli(probability: float, size: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(size, generator=generator) < probability


def _crop_boxes(batch_size: int, height: int, width: int, config: AugmentConfig,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample integer crop boxes ``(n, 4)`` as (left, top, width, height) and flips ``(n,)``.

    torchvision's RandomResizedCrop rule, vectorised: ten tries per sample, the first that fits wins.
    """
    attempts = 10
    area = height * width * _uniform(*config.crop_scale, batch_size * attempts, generator).view(batch_size, attempts)
    log_ratio = _uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]), batch_size * attempts,
                         generator).view(batch_size, attempts)
    ratio = torch.exp(log_ratio)
    crop_width = torch.sqrt(area * ratio).round()  # (n, attempts)
    crop_height = torch.sqrt(area / ratio).round()
    valid = (crop_width > 0) & (crop_width <= width) & (crop_height > 0) & (crop_height <= height)
    first_valid = valid.float().argmax(dim=1, keepdim=True)  # (n, 1)
    crop_width = crop_width.gather(1, first_valid).squeeze(1)
    crop_height = crop_height.gather(1, first_valid).squeeze(1)
    # No valid try: torchvision's fallback, the largest centred crop with the ratio clamped.
    fallback = ~valid.any(dim=1)
    input_ratio = width / height
    if input_ratio < config.crop_ratio[0]:
        fallback_width, fallback_height = width, round(width / config.crop_ratio[0])
    elif input_ratio > config.crop_ratio[1]:
        fallback_width, fallback_height = round(height * config.crop_ratio[1]), height
    else:
        fallback_width, fallback_height = width, height
    crop_width = torch.where(fallback, float(fallback_width), crop_width)
    crop_height = torch.where(fallback, float(fallback_height), crop_height)
    left = torch.floor(torch.rand(batch_size, generator=generator) * (width - crop_width + 1))
    top = torch.floor(torch.rand(batch_size, generator=generator) * (height - crop_height + 1))
    left = torch.where(fallback, torch.floor((width - crop_width) / 2), left)
    top = torch.where(fallback, torch.floor((height - crop_height) / 2), top)
    flip = _bernoulli(config.flip_probability, batch_size, generator)
    return torch.stack([left, top, crop_width, crop_height], dim=1).long(), flip


def _resize_crops(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, resize it to ``(3, size, size)`` and flip it if chosen; input dtype kept."""
    views = torch.empty(images.shape[0], 3, size, size, dtype=images.dtype)
    for index, ((left, top, width, height), flipped) in enumerate(zip(boxes.tolist(), flip.tolist())):
        crop = images[index: index + 1, :, top: top + height, left: left + width]
        view = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        # Flipping one small uint8 view here is far cheaper than a flip over the float batch.
        views[index] = view.flip(-1) if flipped else view
    return views


def _crop_affine(boxes: torch.Tensor, flip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(n, 2, 3)`` matrices mapping output to input coordinates for ``affine_grid``."""
    left, top, crop_width, crop_height = boxes.float().unbind(dim=1)
    theta = torch.zeros(boxes.shape[0], 2, 3)
    # Normalised coordinates span [-1, 1] over the input; a crop is a scale plus a shift of its centre.
    theta[:, 0, 0] = crop_width / width * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + crop_width) / width - 1
    theta[:, 1, 1] = crop_height / height
    theta[:, 1, 2] = (2 * top + crop_height) / height - 1
    return theta


def _color_jitter(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast, saturation and hue as one per-sample affine map of RGB, then a clamp."""
    batch_size = images.shape[0]
    applied = _bernoulli(config.color_jitter_probability, batch_size, generator)
    brightness = _uniform(1 - config.brightness, 1 + config.brightness, batch_size, generator)
    contrast = _uniform(1 - config.contrast, 1 + config.contrast, batch_size, generator)
    saturation = _uniform(1 - config.saturation, 1 + config.saturation, batch_size, generator)
    hue_angle = _uniform(-config.hue, config.hue, batch_size, generator) * 2 * math.pi
    brightness, contrast, saturation = (torch.where(applied, factor, 1.0) for factor in (brightness, contrast, saturation))
    hue_angle = torch.where(applied, hue_angle, 0.0)

    to_yiq = torch.tensor(RGB_TO_YIQ)
    from_yiq = torch.linalg.inv(to_yiq)
    # In YIQ: saturation scales (I, Q), hue rotates them, brightness and contrast scale everything.
    chroma = torch.zeros(batch_size, 3, 3)
    chroma[:, 0, 0] = 1
    chroma[:, 1, 1] = saturation * torch.cos(hue_angle)
    chroma[:, 1, 2] = -saturation * torch.sin(hue_angle)
    chroma[:, 2, 1] = saturation * torch.sin(hue_angle)
    chroma[:, 2, 2] = saturation * torch.cos(hue_angle)
    matrix = (brightness * contrast).view(-1, 1, 1) * (from_yiq @ chroma @ to_yiq)  # (n, 3, 3)
    # Contrast blends with the image's mean luma; jitter does not change that mean's direction, only
    # its scale by brightness, so the offset is (1 - contrast) · brightness · mean luma on every channel.
    mean_luma = torch.einsum("c,nchw->n", torch.tensor(LUMA_WEIGHTS, device=images.device), images)
    mean_luma = mean_luma.cpu() / (images.shape[2] * images.shape[3])
    offset = ((1 - contrast) * brightness * mean_luma).view(-1, 1, 1)  # (n, 1, 1)
    height, width = images.shape[2:]
    flat = images.reshape(batch_size, 3, height * width)  # (n, 3, s·s)
    jittered = torch.baddbmm(offset.to(images.device).expand(batch_size, 3, 1), matrix.to(images.device), flat)
    return jittered.clamp_(0, 1).view(batch_size, 3, height, width)


def _random_grayscale(images: torch.Tensor, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """Replace the chosen samples by their luma on all three channels, in place."""
    applied = _bernoulli(probability, images.shape[0], generator).to(images.device)
    if applied.any():
        chosen = images[applied]
        luma = LUMA_WEIGHTS[0] * chosen[:, 0] + LUMA_WEIGHTS[1] * chosen[:, 1] + LUMA_WEIGHTS[2] * chosen[:, 2]
        images[applied] = luma.unsqueeze(1).expand(-1, 3, -1, -1)
    return images


def _random_blur(images: torch.Tensor, probability: float, sigma_range: tuple[float, float], kernel_size: int,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per sample, on the chosen subset only, in place (reflect padding)."""
    batch_size, channels, height, width = images.shape
    applied = _bernoulli(probability, batch_size, generator)
    sigma = _uniform(*sigma_range, batch_size, generator)[applied]
    if not applied.any():
        return images
    # Reflect padding needs the pad smaller than the image.
    radius = min(kernel_size // 2, min(height, width) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).to(images.device)  # (k, taps) for the k blurred samples
    kernels = kernels.repeat_interleave(channels, dim=0)  # (k·3, taps): one kernel per channel of each sample
    applied = applied.to(images.device)
    chosen = images[applied].reshape(1, -1, height, width)  # (1, k·3, h, w)
    groups = chosen.shape[1]
    chosen = F.conv2d(F.pad(chosen, (radius, radius, 0, 0), mode="reflect"), kernels.view(groups, 1, 1, -1), groups=groups)
    chosen = F.conv2d(F.pad(chosen, (0, 0, radius, radius), mode="reflect"), kernels.view(groups, 1, -1, 1), groups=groups)
    images[applied] = chosen.view(-1, channels, height, width)
    return images
