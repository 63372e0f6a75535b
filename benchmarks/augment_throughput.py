"""Two-view augmentation throughput: batched `TwoViewAugment` against a per-image PIL pipeline.

Both sides start from the same uint8 images ``(num_images, 3, size, size)`` and produce the same
thing: two normalised float views per image, collated into ``(batch_size, 3, size, size)`` tensors,
with the same recipe (strong query view, weak key view). The PIL side is what most SSL code does in
DataLoader workers: RandomResizedCrop, flip, ImageEnhance jitter with an HSV hue shift, grayscale,
ImageFilter.GaussianBlur, then to-tensor and normalise, one image at a time.

    python benchmarks/augment_throughput.py --sizes 32 96 224 --num-images 512 --batch-size 256 --repeats 3
"""

import argparse
import math
import random
import time

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageFilter
import PIL.ImageOps
import torch

from ascl_hf.augment import AugmentConfig, TwoViewAugment


class PilTwoViewAugment:
    """The same recipe, one PIL image at a time: ``(3, h, w)`` uint8 → two ``(3, s, s)`` float views."""

    def __init__(self, config: AugmentConfig, seed: int):
        self.config = config
        self.random = random.Random(seed)
        self.mean = torch.tensor(config.mean).view(3, 1, 1)
        self.std = torch.tensor(config.std).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picture = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
        return self.to_tensor(self.strong(picture)), self.to_tensor(self.weak(picture))

    def weak(self, picture: PIL.Image.Image) -> PIL.Image.Image:
        picture = self.random_resized_crop(picture)
        return PIL.ImageOps.mirror(picture) if self.random.random() < self.config.flip_probability else picture

    def strong(self, picture: PIL.Image.Image) -> PIL.Image.Image:
        config = self.config
        picture = self.weak(picture)
        if self.random.random() < config.color_jitter_probability:
            picture = self.color_jitter(picture)
        if self.random.random() < config.grayscale_probability:
            picture = picture.convert("L").convert("RGB")
        if self.random.random() < config.blur_probability:
            picture = picture.filter(PIL.ImageFilter.GaussianBlur(radius=self.random.uniform(*config.blur_sigma)))
        return picture

    def random_resized_crop(self, picture: PIL.Image.Image) -> PIL.Image.Image:
        width, height = picture.size
        size = self.config.image_size
        for _ in range(10):
            area = width * height * self.random.uniform(*self.config.crop_scale)
            ratio = math.exp(self.random.uniform(*(math.log(r) for r in self.config.crop_ratio)))
            crop_width, crop_height = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                left = self.random.randint(0, width - crop_width)
                top = self.random.randint(0, height - crop_height)
                box = (left, top, left + crop_width, top + crop_height)
                return picture.resize((size, size), PIL.Image.Resampling.BILINEAR, box=box)
        return picture.resize((size, size), PIL.Image.Resampling.BILINEAR)

    def color_jitter(self, picture: PIL.Image.Image) -> PIL.Image.Image:
        config = self.config
        operations = [
            lambda p: PIL.ImageEnhance.Brightness(p).enhance(self.random.uniform(1 - config.brightness, 1 + config.brightness)),
            lambda p: PIL.ImageEnhance.Contrast(p).enhance(self.random.uniform(1 - config.contrast, 1 + config.contrast)),
            lambda p: PIL.ImageEnhance.Color(p).enhance(self.random.uniform(1 - config.saturation, 1 + config.saturation)),
            lambda p: self.shift_hue(p, self.random.uniform(-config.hue, config.hue)),
        ]
        self.random.shuffle(operations)
        for operation in operations:
            picture = operation(picture)
        return picture

    @staticmethod
    def shift_hue(picture: PIL.Image.Image, shift: float) -> PIL.Image.Image:
        # torchvision's PIL hue adjustment: rotate the H channel in HSV.
        hue, saturation, value = picture.convert("HSV").split()
        hue_array = np.array(hue, dtype=np.uint8)
        hue_array += np.uint8(int(shift * 255) % 256)
        hue = PIL.Image.fromarray(hue_array)
        return PIL.Image.merge("HSV", (hue, saturation, value)).convert("RGB")

    def to_tensor(self, picture: PIL.Image.Image) -> torch.Tensor:
        tensor = torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (tensor - self.mean) / self.std


def synthetic_images(num_images: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour images ``(num_images, 3, size, size)`` uint8 (upsampled 8×8 noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_images, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def time_batched(images: torch.Tensor, augment: TwoViewAugment, batch_size: int, generator: torch.Generator) -> float:
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        augment(images[first: first + batch_size], generator)
    return len(images) / (time.perf_counter() - start)


def time_per_image(images: torch.Tensor, augment: PilTwoViewAugment, batch_size: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        views = [augment(image) for image in images[first: first + batch_size]]
        torch.stack([query for query, _ in views]), torch.stack([key for _, key in views])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes per side; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    print(f"{arguments.num_images} images, batch {arguments.batch_size}, {torch.get_num_threads()} torch threads, "
          "two views per image (strong query + weak key)\n")
    print("| image size | batched TwoViewAugment (images/s) | per-image PIL (images/s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for size in arguments.sizes:
        images = synthetic_images(arguments.num_images, size, arguments.seed)
        config = AugmentConfig(image_size=size)
        batched_augment, per_image_augment = TwoViewAugment(config), PilTwoViewAugment(config, arguments.seed)
        generator = torch.Generator().manual_seed(arguments.seed)
        batched_augment(images[: arguments.batch_size], generator)  # warm-up: first-call allocations
        batched, per_image = 0.0, 0.0
        # Interleaved passes, best of each: a shared machine's load spikes then hit both sides alike
        # and are filtered out, as timeit does.
        for _ in range(arguments.repeats):
            batched = max(batched, time_batched(images, batched_augment, arguments.batch_size, generator))
            per_image = max(per_image, time_per_image(images, per_image_augment, arguments.batch_size))
        print(f"| {size} | {batched:,.0f} | {per_image:,.0f} | {batched / per_image:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
