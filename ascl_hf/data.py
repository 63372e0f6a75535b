"""Pretraining data: any `datasets` image source → fixed-size uint8 batches.

Sources (`load_image_dataset(source, split)`):

- ``"digits"``: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes); no network needed.
- ``"fashion_mnist"``: Debian's ``dataset-fashion-mnist`` idx files (``apt-get install -y
  dataset-fashion-mnist``); no network needed once installed.
- a local directory: loaded with the ``imagefolder`` builder (class sub-folders become labels).
- anything else: a Hub dataset id for ``datasets.load_dataset``, optionally streamed.

Decoding happens here, in DataLoader workers: bytes → PIL → RGB → shorter side resized to
``image_size`` and centre-cropped → uint8 tensor ``(3, image_size, image_size)``. Augmentation does
not: it runs batched on the training device (`ascl_hf.augment`). An unreadable image is skipped and
reported with a warning instead of ending the epoch.
"""

import gzip
import io
import os
import warnings
from dataclasses import dataclass

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from datasets.distributed import split_dataset_by_node

FASHION_MNIST_DIRECTORY = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values", "picture", "photo", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")
IMAGE_FILE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Warn individually for the first few unreadable images, then only every this many, so a badly
# broken dataset reports its scale without flooding the log.
INDIVIDUAL_WARNINGS = 5
SUMMARY_WARNING_EVERY = 1000


class UnreadableImageWarning(UserWarning):
    """An image could not be decoded and its example was skipped."""


@dataclass
class ImageSource:
    """A `datasets` dataset ready for decoding, with the columns that matter.

    ``dataset`` keeps only the image and label columns, and its image column (when typed
    `datasets.Image`) is cast with ``decode=False`` so that decoding errors surface here, per example.
    """

    dataset: datasets.Dataset | datasets.IterableDataset
    image_column: str
    label_column: str | None
    class_names: list[str] | None

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, datasets.IterableDataset)


def load_image_dataset(
    source: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    cache_dir: str | None = None,
) -> ImageSource:
    """Load an image dataset from a built-in name, a local folder or the Hub.

    Args:
        source: ``"digits"``, ``"fashion_mnist"``, a local directory of images, or a Hub dataset id.
        split: split name; ``"digits"`` has ``"train"`` (1,437), ``"test"`` (360) and ``"all"``.
        image_column / label_column: detected when None (see `detect_image_column`).
        streaming: return an `datasets.IterableDataset` read lazily (Hub ids and folders).
        rank / world_size: with ``streaming``, keep only this process's share of the stream
            (`split_dataset_by_node`). Do not let `accelerate` shard the DataLoader again: iterate
            it directly and move batches to the device yourself.
    """
    dataset = _load_raw(source, split, streaming=streaming, cache_dir=cache_dir)
    if not isinstance(dataset, datasets.IterableDataset) and len(dataset) == 0:
        raise ValueError(f"The {split!r} split of {source!r} has no examples; choose a split or source with images.")
    if streaming and not isinstance(dataset, datasets.IterableDataset):
        # Built-in sources are in memory; stream them anyway so the streaming path is the same everywhere.
        dataset = dataset.to_iterable_dataset(num_shards=max(1, world_size or 1))
    columns = _column_names(dataset)
    image_column = image_column or detect_image_column(dataset.features, columns)
    if image_column not in columns:
        raise ValueError(f"Image column {image_column!r} not found; available columns: {columns}.")
    if label_column is None:
        label_column = detect_label_column(dataset.features, columns)
    elif label_column not in columns:
        raise ValueError(f"Label column {label_column!r} not found; available columns: {columns}.")
    dataset = dataset.select_columns([image_column] + ([label_column] if label_column else []))
    if dataset.features is not None and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    class_names = None
    if label_column and dataset.features is not None and isinstance(dataset.features[label_column], datasets.ClassLabel):
        class_names = list(dataset.features[label_column].names)
    if streaming and world_size is not None and world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank or 0, world_size=world_size)
    return ImageSource(dataset, image_column, label_column, class_names)


def detect_image_column(features: datasets.Features | None, columns: list[str]) -> str:
    """The first column typed `datasets.Image`, else the first with a conventional image name."""
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMN_NAMES:
        if name in columns:
            return name
    raise ValueError(
        f"No image column found; available columns: {columns}. Pass image_column=<name> to choose one."
    )


def detect_label_column(features: datasets.Features | None, columns: list[str]) -> str | None:
    """The first `datasets.ClassLabel` column, else one with a conventional label name holding integers, else None.

    A conventional name with non-integer values (e.g. strings) is not taken: labels are only needed for the kNN
    monitor and evaluation, and a string column would fail there (pass a ClassLabel column explicitly instead).
    """
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in LABEL_COLUMN_NAMES:
        feature = (features or {}).get(name)
        is_integer = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        if name in columns and (features is None or is_integer):
            return name
    return None


def load_digits_dataset(split: str = "train") -> datasets.Dataset:
    """scikit-learn's digits as a `datasets.Dataset` with ``image`` (8×8 L) and ``label`` columns.

    ``"test"`` is a fixed stratified fifth (360 images), ``"train"`` the rest, ``"all"`` everything.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are counts of 0..16 on a 4×4 grid per pixel; stretch them to the full byte range.
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    indices = np.arange(len(pixels))
    # The file cycles through the classes, so a plain slice would be unbalanced; stratify instead.
    train, test = train_test_split(indices, test_size=360, stratify=digits.target, random_state=0)
    chosen = {"train": np.sort(train), "test": np.sort(test), "all": indices}
    if split not in chosen:
        raise ValueError(f"Unknown digits split {split!r}; choose one of {sorted(chosen)}.")
    return _dataset_from_arrays(pixels[chosen[split]], digits.target[chosen[split]], [str(d) for d in range(10)])


def load_fashion_mnist_dataset(split: str = "train", directory: str = FASHION_MNIST_DIRECTORY) -> datasets.Dataset:
    """Fashion-MNIST from the gzip idx files of Debian's ``dataset-fashion-mnist`` package."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"Unknown fashion_mnist split {split!r}; choose 'train' or 'test'.")
    image_path = os.path.join(directory, f"{prefixes[split]}-images-idx3-ubyte.gz")
    label_path = os.path.join(directory, f"{prefixes[split]}-labels-idx1-ubyte.gz")
    for path in (image_path, label_path):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} is missing. Install it with `apt-get install -y dataset-fashion-mnist`,"
                " or use source='digits', which needs nothing."
            )
    return _dataset_from_arrays(_read_idx(image_path), _read_idx(label_path), FASHION_MNIST_CLASS_NAMES)


def decode_to_rgb(value, image_size: int) -> torch.Tensor:
    """Decode one image value to a uint8 tensor ``(3, image_size, image_size)``.

    ``value`` is what a dataset row holds: a ``{"bytes", "path"}`` dict (an undecoded
    `datasets.Image`), raw bytes, a file path, a PIL image or an ``(height, width[, channels])`` array.
    The shorter side is resized to ``image_size`` (upsampling small images) and the centre cropped.
    Raises whatever PIL raises on unreadable data; `DecodedImages` turns that into a skip.
    """
    image = _open(value)
    if image.format == "JPEG":
        # JPEG can decode straight to a reduced scale (never below the requested size): far less work
        # for large photos.
        image.draft("RGB", (image_size, image_size))
    image.load()  # Decode now, inside the caller's try, so truncated files fail here.
    image = PIL.ImageOps.exif_transpose(image)
    image = to_rgb(image)
    image = PIL.ImageOps.fit(image, (image_size, image_size), method=PIL.Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode → RGB; transparent pixels are composited on white, as a viewer shows them."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL's own conversion clips high-bit-depth images to 255; rescale their range instead.
        array = np.asarray(image, dtype=np.float64)
        low, high = array.min(), array.max()
        array = (array - low) * (255 / (high - low)) if high > low else np.zeros_like(array)
        image = PIL.Image.fromarray(array.astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class DecodedImages(torch.utils.data.Dataset):
    """Map-style view of an `ImageSource`: item → ``{"pixel_values": (3, size, size) uint8[, "labels"]}``.

    An unreadable image yields None (dropped by `ImageBatchCollator`) and a `UnreadableImageWarning`
    naming it; ``skipped`` lists ``(index, path, error)`` for this process (each DataLoader worker
    keeps its own copy).
    """

    def __init__(self, source: ImageSource, image_size: int):
        if source.streaming:
            raise ValueError("DecodedImages needs a map-style dataset; use StreamedImages for streaming sources.")
        self.source = source
        self.image_size = image_size
        self.skipped: list[tuple[int, str | None, str]] = []

    def __len__(self) -> int:
        return len(self.source.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        return _decode_row(self, index, self.source.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor] | None]:
        # One Arrow read per batch instead of one per example.
        columns = self.source.dataset[indices]
        rows = [{name: values[position] for name, values in columns.items()} for position in range(len(indices))]
        return [_decode_row(self, index, row) for index, row in zip(indices, rows)]


class StreamedImages(torch.utils.data.IterableDataset):
    """Iterable view of a streaming `ImageSource`, yielding the same dicts as `DecodedImages`.

    In DataLoader workers the underlying `datasets.IterableDataset` hands each worker its own shards.
    Call ``set_epoch(epoch)`` before each epoch to reshuffle the stream.
    """

    def __init__(self, source: ImageSource, image_size: int):
        self.source = source
        self.image_size = image_size
        self.skipped: list[tuple[int, str | None, str]] = []

    def set_epoch(self, epoch: int) -> None:
        self.source.dataset.set_epoch(epoch)

    def __iter__(self):
        num_examples = 0
        for index, row in enumerate(self.source.dataset):
            num_examples += 1
            sample = _decode_row(self, index, row)
            if sample is not None:
                yield sample
        if num_examples == 0 and torch.utils.data.get_worker_info() is None:
            # In a worker, an empty share only means more workers than shards; in the main process
            # nothing came at all.
            raise ValueError("The streamed dataset yielded no examples; check the source, split and rank/world_size.")


class ImageBatchCollator:
    """Stack decoded samples into ``{"pixel_values": (batch_size, 3, size, size) uint8[, "labels": (batch_size,) long]}``.

    Skipped samples (None) are dropped, so a batch can be shorter than the DataLoader's batch size.
    """

    def __init__(self, image_size: int, with_labels: bool):
        self.image_size = image_size
        self.with_labels = with_labels

    def __call__(self, samples: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            batch = {"pixel_values": torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)}
            if self.with_labels:
                batch["labels"] = torch.empty(0, dtype=torch.long)
            return batch
        batch = {"pixel_values": torch.stack([sample["pixel_values"] for sample in samples])}
        if self.with_labels:
            batch["labels"] = torch.stack([sample["labels"] for sample in samples])
        return batch


def build_pretraining_dataloader(
    source: ImageSource,
    *,
    image_size: int,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer_size: int = 10_000,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> torch.utils.data.DataLoader:
    """A shuffling, last-batch-dropping DataLoader of uint8 batches for pretraining.

    Batches: ``{"pixel_values": (batch_size, 3, image_size, image_size) uint8}`` plus
    ``"labels": (batch_size,) long`` when the source has a label column. Map-style sources are
    shuffled by a generator seeded with ``seed``; streaming sources through a ``shuffle_buffer_size``
    buffer (call ``loader.dataset.set_epoch(epoch)`` each epoch).
    """
    if source.streaming:
        shuffled = ImageSource(
            source.dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size),
            source.image_column, source.label_column, source.class_names,
        )
        return _dataloader(StreamedImages(shuffled, image_size), source, image_size, batch_size, num_workers,
                           shuffle=False, drop_last=True, seed=seed, pin_memory=pin_memory,
                           prefetch_factor=prefetch_factor)
    return _dataloader(DecodedImages(source, image_size), source, image_size, batch_size, num_workers,
                       shuffle=True, drop_last=True, seed=seed, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor)


def load_labeled_split(
    source: str,
    split: str,
    *,
    image_size: int,
    batch_size: int = 256,
    num_workers: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
) -> torch.utils.data.DataLoader:
    """An ordered DataLoader over a labelled split, for the kNN monitor and evaluation.

    Same decoding as pretraining (resize, centre crop; no augmentation), every example kept:
    ``{"pixel_values": (batch_size, 3, image_size, image_size) uint8, "labels": (batch_size,) long}``.
    ``loader.dataset.source.class_names`` holds the class names when the label column is a ClassLabel.
    """
    image_source = load_image_dataset(source, split, image_column=image_column, label_column=label_column,
                                      cache_dir=cache_dir)
    if image_source.label_column is None:
        raise ValueError(
            f"The {split!r} split of {source!r} has no label column; pass label_column=<name>, or use a labelled split."
        )
    return _dataloader(DecodedImages(image_source, image_size), image_source, image_size, batch_size, num_workers,
                       shuffle=False, drop_last=False, seed=0, pin_memory=None, prefetch_factor=2)


def _dataloader(dataset, source, image_size, batch_size, num_workers, *, shuffle, drop_last, seed, pin_memory,
                prefetch_factor) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        num_workers=num_workers,
        collate_fn=ImageBatchCollator(image_size, with_labels=source.label_column is not None),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def _decode_row(owner: DecodedImages | StreamedImages, index: int, row: dict) -> dict[str, torch.Tensor] | None:
    value = row[owner.source.image_column]
    try:
        pixel_values = decode_to_rgb(value, owner.image_size)
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError, EOFError) as error:
        # SyntaxError and EOFError are what some PIL plugins raise on malformed headers.
        _report_skip(owner, index, value, error)
        return None
    sample = {"pixel_values": pixel_values}
    if owner.source.label_column is not None:
        sample["labels"] = torch.tensor(int(row[owner.source.label_column]), dtype=torch.long)
    return sample


def _report_skip(owner, index: int, value, error: Exception) -> None:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    owner.skipped.append((index, path, f"{type(error).__name__}: {error}"))
    count = len(owner.skipped)
    if count <= INDIVIDUAL_WARNINGS or count % SUMMARY_WARNING_EVERY == 0:
        first = ", ".join(f"#{i} {p or ''}".strip() for i, p, _ in owner.skipped[:INDIVIDUAL_WARNINGS])
        warnings.warn(
            f"Skipped unreadable image #{index} {path or ''} ({type(error).__name__}: {error}); "
            f"{count} skipped so far in this process (first: {first}). Remove or re-encode these files.",
            UnreadableImageWarning,
            stacklevel=2,
        )


def _open(value) -> PIL.Image.Image:
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return PIL.Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return PIL.Image.open(value["path"])
        raise ValueError("Image entry has neither bytes nor path.")
    if isinstance(value, bytes):
        return PIL.Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return PIL.Image.open(value)
    if isinstance(value, np.ndarray | list):
        return PIL.Image.fromarray(np.asarray(value, dtype=np.uint8))
    raise TypeError(f"Cannot decode an image from a {type(value).__name__}; expected bytes, a path or a PIL image.")


def _load_raw(source: str, split: str, *, streaming: bool, cache_dir: str | None):
    if source == "digits":
        return load_digits_dataset(split)
    if source == "fashion_mnist":
        return load_fashion_mnist_dataset(split)
    if os.path.isdir(source):
        if not _has_image_files(source):
            raise ValueError(f"No image files under {source!r}; expected files ending in {sorted(IMAGE_FILE_EXTENSIONS)}.")
        return datasets.load_dataset("imagefolder", data_dir=source, split=split, streaming=streaming,
                                     cache_dir=cache_dir)
    return datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)


def _has_image_files(directory: str) -> bool:
    return any(
        os.path.splitext(name)[1].lower() in IMAGE_FILE_EXTENSIONS
        for _, _, names in os.walk(directory) for name in names
    )


def _column_names(dataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    # Some streamed datasets only know their columns once read.
    return list(next(iter(dataset.take(1)), {}).keys())


def _dataset_from_arrays(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    return datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(image) for image in images], "label": labels.tolist()},
        features=features,
    )


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as file:
        data = file.read()
    # idx header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then big-endian sizes.
    num_dimensions = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * axis: 8 + 4 * axis], "big") for axis in range(num_dimensions))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dimensions).reshape(shape)
