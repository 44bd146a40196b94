"""The reproduction's data sets: digits, CIFAR from synthetic official-format files, folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from adampx.experiments.data import DATASETS, DataError, DataSplits, load_dataset

# --------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


def test_digits_split_sizes_and_shapes(digits: DataSplits) -> None:
    assert (digits.name, digits.num_classes, digits.in_channels, digits.image_size) == (
        "digits",
        10,
        1,
        8,
    )
    assert (len(digits.train), len(digits.test)) == (1797 - 359, 359)
    image, label = digits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 10


def test_digits_normalized_with_train_statistics(digits: DataSplits) -> None:
    x_train = digits.train.tensors[0]  # type: ignore[attr-defined]
    x_test = digits.test.tensors[0]  # type: ignore[attr-defined]
    assert abs(float(x_train.mean())) < 1e-5
    assert abs(float(x_train.std(correction=0)) - 1) < 1e-5
    assert abs(float(x_test.mean())) < 0.1  # same statistics, different images


def test_digits_split_is_deterministic_by_seed(digits: DataSplits) -> None:
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    y0 = digits.test.tensors[1]  # type: ignore[attr-defined]
    assert torch.equal(y0, again.test.tensors[1])  # type: ignore[attr-defined]
    assert torch.equal(digits.test.tensors[0], again.test.tensors[0])  # type: ignore[attr-defined]
    assert not torch.equal(digits.test.tensors[0], other.test.tensors[0])  # type: ignore[attr-defined]
    assert len(other.test) == 359


def test_digits_rejects_data_dir_and_other_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ships with scikit-learn"):
        load_dataset("digits", tmp_path)
    with pytest.raises(DataError, match="8×8"):
        load_dataset("digits", image_size=16)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(DataError, match="unknown data set 'mnist'") as info:
        load_dataset("mnist")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(DataError, match="positive integer"):
        load_dataset("digits", image_size=0)


# --------------------------------------------------------------------------------------------
# CIFAR from tiny files in the official python format

N_PER_FILE = 2


def _batch(seed: int, label_key: bytes, num_classes: int, n: int = N_PER_FILE) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"synthetic",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [b"x.png"] * n,
    }


def _dump(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(parent: Path) -> Path:
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i in range(1, 6):
        _dump(root / f"data_batch_{i}", _batch(i, b"labels", 10))
    _dump(root / "test_batch", _batch(0, b"labels", 10))
    _dump(root / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return root


def _write_cifar100(parent: Path) -> Path:
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    _dump(root / "train", _batch(1, b"fine_labels", 100, n=4) | {b"coarse_labels": [0] * 4})
    _dump(root / "test", _batch(2, b"fine_labels", 100) | {b"coarse_labels": [0] * 2})
    _dump(root / "meta", {b"fine_label_names": [b"c"] * 100})
    return root


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_loads_from_either_folder(tmp_path: Path, point_at: str) -> None:
    root = _write_cifar10(tmp_path)
    splits = load_dataset("cifar10", tmp_path if point_at == "parent" else root)
    assert (splits.name, splits.num_classes, splits.in_channels, splits.image_size) == (
        "cifar10",
        10,
        3,
        32,
    )
    assert (len(splits.train), len(splits.test)) == (5 * N_PER_FILE, N_PER_FILE)
    image, label = splits.test[1]
    expected = _batch(0, b"labels", 10)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == expected[b"labels"][1]
    train_labels = [int(splits.train[i][1]) for i in range(len(splits.train))]
    assert train_labels == [v for i in range(1, 6) for v in _batch(i, b"labels", 10)[b"labels"]]


def _raw(batch: dict) -> torch.Tensor:
    return torch.from_numpy(batch[b"data"]).view(-1, 3, 32, 32).float() / 255


def test_cifar_normalization_uses_train_channel_statistics(tmp_path: Path) -> None:
    splits = load_dataset("cifar10", _write_cifar10(tmp_path))
    raw_train = torch.cat([_raw(_batch(i, b"labels", 10)) for i in range(1, 6)])
    mean = raw_train.mean(dim=(0, 2, 3)).view(3, 1, 1)
    std = raw_train.std(dim=(0, 2, 3), correction=0).view(3, 1, 1)
    train = splits.train.images  # type: ignore[attr-defined]
    assert torch.allclose(train, (raw_train - mean) / std, atol=1e-5)
    test = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    assert torch.allclose(test, (_raw(_batch(0, b"labels", 10)) - mean) / std, atol=1e-5)
    # The crop pads with black: raw 0, normalized.
    fill = splits.train.fill  # type: ignore[attr-defined]
    assert torch.allclose(fill, -mean / std, atol=1e-5)


def test_cifar_train_is_augmented_and_test_is_not(tmp_path: Path) -> None:
    splits = load_dataset("cifar10", _write_cifar10(tmp_path))
    torch.manual_seed(0)
    draws = [splits.train[3][0] for _ in range(8)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(splits.test[0][0], splits.test[0][0])
    # Seeding torch's global RNG reproduces the augmentation.
    torch.manual_seed(0)
    assert torch.equal(splits.train[3][0], draws[0])
    # Each draw is the image shifted by at most 4 pixels (padding = black) and maybe flipped.
    image = splits.train.images[3]  # type: ignore[attr-defined]
    fill = splits.train.fill  # type: ignore[attr-defined]
    padded = fill.expand(3, 40, 40).clone()
    padded[:, 4:36, 4:36] = image
    crops = [padded[:, t : t + 32, u : u + 32] for t in range(9) for u in range(9)]
    candidates = crops + [c.flip(-1) for c in crops]
    assert all(any(torch.equal(d, c) for c in candidates) for d in draws)


def test_cifar_batches_through_a_dataloader(tmp_path: Path) -> None:
    splits = load_dataset("cifar10", _write_cifar10(tmp_path))
    x, y = next(iter(DataLoader(splits.train, batch_size=4, shuffle=True)))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,) and y.dtype == torch.int64


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar100_loads_fine_labels(tmp_path: Path, point_at: str) -> None:
    root = _write_cifar100(tmp_path)
    splits = load_dataset("cifar100", tmp_path if point_at == "parent" else root)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (100, 3, 32)
    assert (len(splits.train), len(splits.test)) == (4, 2)
    labels = [int(splits.test[i][1]) for i in range(2)]
    assert labels == _batch(2, b"fine_labels", 100)[b"fine_labels"]
    assert splits.train[0][0].shape == (3, 32, 32)


def test_cifar_errors_name_the_path_and_the_download(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("cifar10", missing)
    assert str(missing) in str(info.value) and "cs.toronto.edu" in str(info.value)
    assert "cifar-10-python.tar.gz" in str(info.value)

    with pytest.raises(DataError, match="no cifar-100-python folder") as info:
        load_dataset("cifar100", tmp_path)
    assert "cifar-100-python.tar.gz" in str(info.value) and "cs.toronto.edu" in str(info.value)

    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="32×32"):
        load_dataset("cifar10", tmp_path, image_size=64)


def test_cifar_missing_batch_file(tmp_path: Path) -> None:
    root = _write_cifar10(tmp_path)
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3") as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert str(root) in message and "cs.toronto.edu" in message and str(tmp_path) in message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a pickle", "cannot unpickle"),
        ([1, 2, 3], "not a dict"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "no b'labels'"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "shape"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "integers"),
    ],
)
def test_cifar_malformed_batch(tmp_path: Path, content: object, reason: str) -> None:
    root = _write_cifar10(tmp_path)
    path = root / "test_batch"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _dump(path, content)
    with pytest.raises(DataError, match=reason) as info:
        load_dataset("cifar10", root)
    assert str(path) in str(info.value) and "cs.toronto.edu" in str(info.value)


def test_cifar100_with_cifar10_labels_is_malformed(tmp_path: Path) -> None:
    root = _write_cifar100(tmp_path)
    _dump(root / "train", _batch(1, b"labels", 10))
    with pytest.raises(DataError, match="fine_labels"):
        load_dataset("cifar100", root)


# --------------------------------------------------------------------------------------------
# image folder

RED = (255, 0, 0)


def _png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _write_tree(root: Path, test_name: str = "val") -> None:
    _png(root / "train" / "cat" / "a.png", (20, 12), RED)
    _png(root / "train" / "cat" / "b.PNG", (12, 12), RED)
    _png(root / "train" / "dog" / "c.png", (12, 30), (0, 0, 255))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _png(root / test_name / "dog" / "d.png", (16, 10), (0, 0, 255))
    _png(root / test_name / "cat" / "e.png", (10, 10), RED)


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_imagefolder_shapes_labels_and_normalization(tmp_path: Path, test_name: str) -> None:
    _write_tree(tmp_path, test_name)
    splits = load_dataset("imagefolder", tmp_path, image_size=8)
    assert (splits.name, splits.num_classes, splits.in_channels, splits.image_size) == (
        "imagefolder",
        2,
        3,
        8,
    )
    assert (len(splits.train), len(splits.test)) == (3, 2)
    assert splits.train.classes == ["cat", "dog"]  # type: ignore[attr-defined]
    assert [int(splits.train[i][1]) for i in range(3)] == [0, 0, 1]
    assert [int(splits.test[i][1]) for i in range(2)] == [0, 1]  # cat, dog: by class
    for dataset in (splits.train, splits.test):
        image, label = dataset[0]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert label.dtype == torch.int64
    # A solid red image normalizes to the ImageNet statistics of (1, 0, 0).
    red = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]).view(3, 1, 1)
    assert torch.allclose(splits.test[0][0], red.expand(3, 8, 8), atol=1e-5)


def test_imagefolder_default_size_and_augmentation(tmp_path: Path) -> None:
    from PIL import Image

    _write_tree(tmp_path)
    # Left-to-right gradient, wider than tall: horizontal crops and flips change it.
    gradient = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90)
    gradient = gradient.resize((64, 32)).convert("RGB")
    gradient.save(tmp_path / "train" / "cat" / "a.png")
    assert load_dataset("imagefolder", tmp_path).image_size == 224
    splits = load_dataset("imagefolder", tmp_path, image_size=16)
    torch.manual_seed(0)
    draws = [splits.train[0][0] for _ in range(6)]
    assert all(d.shape == (3, 16, 16) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert splits.test[1][0].shape == (3, 16, 16)
    assert torch.equal(splits.test[1][0], splits.test[1][0])


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("imagefolder")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "nowhere")
    with pytest.raises(DataError, match="no train folder"):
        load_dataset("imagefolder", tmp_path)

    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders") as info:
        load_dataset("imagefolder", tmp_path)
    assert str(tmp_path / "train") in str(info.value)

    _write_tree(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images") as info:
        load_dataset("imagefolder", tmp_path)
    assert str(tmp_path / "train" / "empty") in str(info.value)
    (tmp_path / "train" / "empty").rmdir()

    _png(tmp_path / "val" / "bird" / "f.png", (8, 8), RED)
    with pytest.raises(DataError, match="bird"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_needs_a_val_folder_and_decodable_images(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "cat" / "a.png", (8, 8), RED)
    with pytest.raises(DataError, match="no val"):
        load_dataset("imagefolder", tmp_path)
    _png(tmp_path / "val" / "cat" / "b.png", (8, 8), RED)
    (tmp_path / "val" / "cat" / "b.png").write_bytes(b"broken")
    splits = load_dataset("imagefolder", tmp_path, image_size=4)
    with pytest.raises(DataError, match="cannot decode"):
        splits.test[0]
