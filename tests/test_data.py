"""Tests for dataset loading, decoding and the pretraining DataLoader."""

import gzip
import io
import pathlib

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets.distributed import split_dataset_by_node

from ascl_hf.data import (
    ImageSource,
    UnreadableImageWarning,
    build_pretraining_dataloader,
    decode_to_rgb,
    load_fashion_mnist_dataset,
    load_image_dataset,
    load_labeled_split,
)


def write_image_folder(root):
    """Two class folders with every awkward case: modes, a tiny image, a corrupt and a truncated file."""
    cats, dogs = root / "cats", root / "dogs"
    cats.mkdir(parents=True)
    dogs.mkdir()
    PIL.Image.new("RGB", (40, 30), (200, 30, 30)).save(cats / "rgb.png")
    PIL.Image.new("L", (30, 40), 128).save(cats / "gray.png")
    PIL.Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(cats / "rgba.png")  # fully transparent → white
    PIL.Image.new("P", (20, 20), 3).save(cats / "palette.png")
    PIL.Image.new("CMYK", (25, 25), (0, 255, 255, 0)).save(dogs / "cmyk.jpg")
    PIL.Image.new("RGB", (5, 5), (0, 200, 0)).save(dogs / "tiny.png")
    (dogs / "corrupt.png").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="JPEG")
    (dogs / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return root


@pytest.fixture
def image_folder(tmp_path):
    return str(write_image_folder(tmp_path / "images"))


def collect(loader):
    return [batch for batch in loader]


def test_image_folder_yields_fixed_size_uint8_batches_and_skips_bad_files(image_folder, tmp_path):
    source = load_image_dataset(image_folder, cache_dir=str(tmp_path / "cache"))
    assert source.image_column == "image" and source.label_column == "label"
    assert source.class_names == ["cats", "dogs"]
    loader = build_pretraining_dataloader(source, image_size=16, batch_size=2, num_workers=0)
    with pytest.warns(UnreadableImageWarning) as record:
        batches = collect(loader)
    for batch in batches:
        assert batch["pixel_values"].dtype == torch.uint8
        assert batch["pixel_values"].shape[1:] == (3, 16, 16)
        assert batch["labels"].dtype == torch.long
    assert sum(len(batch["pixel_values"]) for batch in batches) == 6  # 8 files, 2 unreadable
    messages = " ".join(str(warning.message) for warning in record)
    assert "corrupt.png" in messages and "truncated.jpg" in messages
    assert "2 skipped so far" in messages
    assert [path for _, path, _ in loader.dataset.skipped if "corrupt" in path]


def test_every_mode_becomes_rgb(image_folder):
    folder = pathlib.Path(image_folder)
    expected = {
        "cats/rgb.png": (200, 30, 30), "cats/gray.png": (128, 128, 128), "cats/rgba.png": (255, 255, 255),
        "dogs/tiny.png": (0, 200, 0),
    }
    for name, colour in expected.items():
        pixels = decode_to_rgb(str(folder / name), 12)
        assert pixels.shape == (3, 12, 12) and pixels.dtype == torch.uint8
        assert pixels[:, 6, 6].tolist() == list(colour), name
    palette = decode_to_rgb(str(folder / "cats/palette.png"), 12)
    assert palette.shape == (3, 12, 12)
    cmyk = decode_to_rgb(str(folder / "dogs/cmyk.jpg"), 12)
    red, green, blue = cmyk[:, 6, 6].tolist()
    assert red > 200 and green < 60 and blue < 60  # CMYK (0, 255, 255, 0) is red


def test_resize_keeps_the_centre_square():
    image = PIL.Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (20, 0, 40, 20))  # red centre square, blue sides
    pixels = decode_to_rgb(image, 10)
    assert pixels.shape == (3, 10, 10)
    assert (pixels[0] > 200).all() and (pixels[2] < 60).all()


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(ValueError, match="No image files"):
        load_image_dataset(str(tmp_path / "empty"))


def test_empty_split_is_a_clear_error(monkeypatch):
    empty = datasets.Dataset.from_dict({"image": [], "label": []})
    monkeypatch.setattr("ascl_hf.data._load_raw", lambda *arguments, **keywords: empty)
    with pytest.raises(ValueError, match="no examples"):
        load_image_dataset("someone/empty")


def test_missing_image_column_lists_available_columns(monkeypatch):
    table = datasets.Dataset.from_dict({"text": ["a"], "score": [1]})
    monkeypatch.setattr("ascl_hf.data._load_raw", lambda *arguments, **keywords: table)
    with pytest.raises(ValueError, match=r"available columns: \['text', 'score'\]"):
        load_image_dataset("someone/text")
    with pytest.raises(ValueError, match="'photo' not found"):
        load_image_dataset("someone/text", image_column="photo")


def test_columns_detected_by_name_when_not_typed(monkeypatch):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    table = datasets.Dataset.from_dict({"img": [buffer.getvalue()] * 4, "fine_label": [0, 1, 0, 1], "id": [0, 1, 2, 3]})
    monkeypatch.setattr("ascl_hf.data._load_raw", lambda *arguments, **keywords: table)
    source = load_image_dataset("someone/bytes")
    assert (source.image_column, source.label_column) == ("img", "fine_label")
    batch = next(iter(build_pretraining_dataloader(source, image_size=8, batch_size=4)))
    assert batch["pixel_values"][:, :, 0, 0].tolist() == [[1, 2, 3]] * 4
    assert sorted(batch["labels"].tolist()) == [0, 0, 1, 1]


def test_digits_source_with_workers():
    source = load_image_dataset("digits", "train")
    assert len(source.dataset) == 1437 and source.class_names == [str(digit) for digit in range(10)]
    loader = build_pretraining_dataloader(source, image_size=16, batch_size=256, num_workers=2, seed=1)
    batches = collect(loader)
    assert len(batches) == 1437 // 256  # drop_last
    assert all(batch["pixel_values"].shape == (256, 3, 16, 16) for batch in batches)
    first_again = next(iter(build_pretraining_dataloader(source, image_size=16, batch_size=256, seed=1)))
    assert torch.equal(first_again["labels"], batches[0]["labels"])  # the seed fixes the shuffle


def test_labeled_split_keeps_order_and_every_example():
    loader = load_labeled_split("digits", "test", image_size=8, batch_size=100)
    batches = collect(loader)
    labels = torch.cat([batch["labels"] for batch in batches])
    assert len(labels) == 360 and batches[-1]["pixel_values"].shape == (60, 3, 8, 8)
    assert torch.bincount(labels).min() >= 34  # a stratified fifth of a balanced set


def test_labeled_split_without_labels_is_an_error(tmp_path):
    (tmp_path / "flat").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no label column"):
        load_labeled_split(str(tmp_path / "flat"), "train", image_size=8, cache_dir=str(tmp_path / "cache"))


def test_streaming_path_runs_and_skips_bad_files(image_folder, tmp_path):
    source = load_image_dataset(image_folder, streaming=True, cache_dir=str(tmp_path / "cache"))
    assert source.streaming
    loader = build_pretraining_dataloader(source, image_size=16, batch_size=3, shuffle_buffer_size=4)
    loader.dataset.set_epoch(1)
    with pytest.warns(UnreadableImageWarning, match="corrupt.png"):
        batches = collect(loader)
    assert [len(batch["pixel_values"]) for batch in batches] == [3, 3]


def test_two_ranks_see_disjoint_shards_covering_all_examples():
    digits = load_image_dataset("digits", "test").dataset
    stream = digits.to_iterable_dataset(num_shards=4)
    seen = []
    for rank in (0, 1):
        source = ImageSource(split_dataset_by_node(stream, rank=rank, world_size=2), "image", "label", None)
        loader = build_pretraining_dataloader(source, image_size=8, batch_size=1, shuffle_buffer_size=1)
        seen.append({tuple(batch["pixel_values"].flatten().tolist()) + (int(batch["labels"]),) for batch in loader})
    everything = {tuple(decode_to_rgb(row["image"], 8).flatten().tolist()) + (row["label"],) for row in digits}
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == everything


def test_streaming_built_in_source_split_by_rank():
    counts = [
        sum(1 for _ in load_image_dataset("digits", "test", streaming=True, rank=rank, world_size=2).dataset)
        for rank in (0, 1)
    ]
    assert sum(counts) == 360 and min(counts) > 0


def test_fashion_mnist_reads_idx_files(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    header = bytes([0, 0, 8, 3]) + b"".join(size.to_bytes(4, "big") for size in (3, 28, 28))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    label_header = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_header + bytes([9, 0, 3])))
    dataset = load_fashion_mnist_dataset("test", directory=str(tmp_path))
    assert dataset["label"] == [9, 0, 3]
    assert np.array_equal(np.asarray(dataset[1]["image"]), images[1])
    assert dataset.features["label"].names[9] == "Ankle boot"


def test_fashion_mnist_missing_names_the_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist_dataset("train", directory=str(tmp_path))


def test_bad_files_do_not_stop_dataloader_workers(image_folder, tmp_path):
    source = load_image_dataset(image_folder, cache_dir=str(tmp_path / "cache"))
    loader = build_pretraining_dataloader(source, image_size=8, batch_size=8, num_workers=1)
    batches = collect(loader)  # the warnings are printed by the worker process
    assert [len(batch["pixel_values"]) for batch in batches] == [6]  # skipped samples are dropped


def test_string_label_columns_are_not_detected_as_class_labels():
    import datasets as hf_datasets

    from ascl_hf.data import detect_label_column

    strings = hf_datasets.Features({"image": hf_datasets.Image(), "label": hf_datasets.Value("string")})
    integers = hf_datasets.Features({"image": hf_datasets.Image(), "label": hf_datasets.Value("int64")})
    assert detect_label_column(strings, list(strings)) is None
    assert detect_label_column(integers, list(integers)) == "label"
