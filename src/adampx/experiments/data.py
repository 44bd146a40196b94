"""The data sets of the reproduction, read from local files only (nothing is ever downloaded).

``load_dataset(name, data_dir)`` returns a :class:`DataSplits` with a train and a test
``Dataset`` whose items are ``(image, label)``: a normalized float32 image ``[C, H, W]`` and a
0-d int64 label.

* ``digits``: scikit-learn's 1,797 handwritten 8×8 digits (shipped inside scikit-learn), split
  80/20 by the seed, normalized with the train split's mean and std; no augmentation.
* ``cifar10`` / ``cifar100``: the official *python* version of CIFAR, read from ``data_dir``;
  per-channel normalization with the train split's statistics; the train split is augmented
  with a random 32×32 crop of the image padded by 4 black pixels and a random horizontal flip.
* ``imagefolder``: an ImageNet-style tree ``data_dir/{train,val}/<class>/<image>``, decoded
  lazily with Pillow, resized so the shorter side is ``image_size`` and cropped to a square
  (random crop and flip for train, center crop for test), normalized with the ImageNet
  statistics.

Every bad input raises :class:`DataError` with a message that says what is wrong and how to
fix it. The training augmentation draws from torch's global RNG, so seeding torch (or the
``DataLoader`` workers) makes it reproducible.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DATASETS", "DataError", "DataSplits", "load_dataset"]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGEFOLDER_SIZE = 224

Sample = tuple[torch.Tensor, torch.Tensor]


class DataError(ValueError):
    """A data set is missing, malformed, or asked for with bad arguments."""


@dataclass
class DataSplits:
    """The train and test splits of one data set and what a model needs to know about them.

    Args:
        name: The data set's name (one of :data:`DATASETS`).
        train: The training split; items are ``(image [C, H, W] float32, label int64)``.
        test: The test split, same item format, never augmented.
        num_classes: Number of classes; labels lie in ``[0, num_classes)``.
        in_channels: Number of image channels ``C``.
        image_size: Side ``H == W`` of the (square) images.
    """

    name: str
    train: Dataset[tuple[torch.Tensor, ...]]
    test: Dataset[tuple[torch.Tensor, ...]]
    num_classes: int
    in_channels: int
    image_size: int


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    image_size: int | None = None,
) -> DataSplits:
    """Load a data set's train and test splits from local files.

    Args:
        name: One of :data:`DATASETS` (case-insensitive).
        data_dir: Where the files are: for ``cifar10``/``cifar100`` the folder holding the
            extracted ``cifar-10-batches-py``/``cifar-100-python`` folder, or that folder
            itself; for ``imagefolder`` the folder holding ``train`` and ``val`` (or
            ``test``). Must be ``None`` for ``digits``.
        seed: Seed of the train/test split (``digits`` only; the others come pre-split).
        image_size: Side of the square images. ``imagefolder``: defaults to 224. ``digits``
            and ``cifar*`` have a fixed size (8 and 32); ``None`` or that size is accepted.

    Returns:
        The :class:`DataSplits`.

    Raises:
        DataError: For an unknown name, a missing or malformed data set, a missing optional
            dependency, or arguments that do not fit the data set.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if key == "digits":
        return _load_digits(data_dir, seed, image_size)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, data_dir, image_size)
    return _load_imagefolder(data_dir, image_size)


# --------------------------------------------------------------------------------------------
# digits


def _load_digits(data_dir: str | Path | None, seed: int, image_size: int | None) -> DataSplits:
    """scikit-learn's digits, split 80/20 by ``seed`` (test = first fifth of a permutation).

    Args:
        data_dir: Must be ``None``: the data ships with scikit-learn.
        seed: Seed of the permutation that splits train from test.
        image_size: ``None`` or 8.

    Returns:
        The splits, as ``TensorDataset``s of normalized ``[N, 1, 8, 8]`` images.
    """
    if data_dir is not None:
        raise DataError(
            "the digits data set ships with scikit-learn and takes no data directory; "
            f"drop --data-dir (got {str(data_dir)!r})"
        )
    _check_fixed_size("digits", image_size, 8)
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise DataError(
            "the digits data set needs scikit-learn, which ships it: pip install 'adampx[demo]'"
        ) from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = len(labels) // 5
    test_idx, train_idx = order[:n_test], order[n_test:]
    train_images, test_images = images[train_idx], images[test_idx]
    std, mean = torch.std_mean(train_images, correction=0)
    return DataSplits(
        name="digits",
        train=TensorDataset((train_images - mean) / std, labels[train_idx]),
        test=TensorDataset((test_images - mean) / std, labels[test_idx]),
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


def _check_fixed_size(name: str, image_size: int | None, size: int) -> None:
    """Reject an ``image_size`` other than a data set's fixed one.

    Args:
        name: The data set, for the message.
        image_size: What the caller asked for (``None`` = the native size).
        size: The data set's native image size.
    """
    if image_size is not None and image_size != size:
        raise DataError(
            f"{name} images are {size}×{size}; image_size must be None or {size}, got {image_size}"
        )


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100

# name -> (folder, archive, train files, test file, meta file, label key, classes)
_CIFAR: dict[str, tuple[str, str, tuple[str, ...], str, str, bytes, int]] = {
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        "test",
        "meta",
        b"fine_labels",
        100,
    ),
}


def _load_cifar(name: str, data_dir: str | Path | None, image_size: int | None) -> DataSplits:
    """CIFAR-10 or CIFAR-100 from the official python-format files in ``data_dir``.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: The folder holding the extracted folder, or the extracted folder itself.
        image_size: ``None`` or 32.

    Returns:
        The splits: an augmenting train set and a ``TensorDataset`` test set of normalized
        ``[N, 3, 32, 32]`` images.
    """
    folder, archive, train_files, test_file, meta_file, label_key, num_classes = _CIFAR[name]
    _check_fixed_size(name, image_size, 32)
    if data_dir is None:
        raise DataError(
            f"{name} needs --data-dir: download {archive} from {CIFAR_URL} and extract it "
            "into a folder, then pass that folder"
        )
    root, parent = _find_cifar_root(Path(data_dir), folder, archive, train_files[0])
    fix = f"download {archive} from {CIFAR_URL} and extract it into {parent}"
    missing = [f for f in (*train_files, test_file, meta_file) if not (root / f).is_file()]
    if missing:
        raise DataError(f"{root} lacks {', '.join(missing)}: {fix}")
    parts = [_read_cifar_batch(root / f, label_key, num_classes, fix) for f in train_files]
    train_images = torch.cat([images for images, _ in parts]).float().div_(255.0)
    train_labels = torch.cat([labels for _, labels in parts])
    test_u8, test_labels = _read_cifar_batch(root / test_file, label_key, num_classes, fix)
    std, mean = torch.std_mean(train_images, dim=(0, 2, 3), correction=0)
    std, mean = std.view(3, 1, 1), mean.view(3, 1, 1)
    train_images.sub_(mean).div_(std)
    test_images = (test_u8.float().div_(255.0) - mean) / std
    return DataSplits(
        name=name,
        # Pad with black (raw 0), as the usual pipeline pads before normalizing.
        train=RandomCropFlip(train_images, train_labels, padding=4, fill=(-mean / std).view(3)),
        test=TensorDataset(test_images, test_labels),
        num_classes=num_classes,
        in_channels=3,
        image_size=32,
    )


def _find_cifar_root(
    data_dir: Path, folder: str, archive: str, first_file: str
) -> tuple[Path, Path]:
    """Find the extracted CIFAR folder: ``data_dir/folder`` or ``data_dir`` itself.

    Args:
        data_dir: What the caller passed.
        folder: The folder the archive extracts to.
        archive: The archive's file name, for the messages.
        first_file: A file that only the extracted folder holds (to recognize it).

    Returns:
        ``(root, parent)``: the extracted folder and the folder it lies in.
    """
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist: download {archive} from {CIFAR_URL} "
            f"and extract it into {data_dir}"
        )
    if (data_dir / folder).is_dir():
        return data_dir / folder, data_dir
    if data_dir.name == folder or (data_dir / first_file).is_file():
        return data_dir, data_dir.parent
    raise DataError(
        f"no {folder} folder in {data_dir}: download {archive} from {CIFAR_URL} and extract "
        f"it into {data_dir}"
    )


def _read_cifar_batch(
    path: Path, label_key: bytes, num_classes: int, fix: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one pickled CIFAR batch and check its format.

    Args:
        path: The batch file.
        label_key: ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).
        num_classes: Labels must lie in ``[0, num_classes)``.
        fix: How to get good files, appended to every error message.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with scikit-learn and most torch setups
        raise DataError("reading CIFAR needs numpy: pip install numpy") from None

    def bad(reason: str) -> DataError:
        return DataError(f"{path} is not a CIFAR python batch ({reason}): {fix}")

    try:
        with path.open("rb") as f:
            batch: Any = pickle.load(f, encoding="bytes")
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise bad(f"cannot unpickle it: {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict):
        raise bad(f"holds a {type(batch).__name__}, not a dict")
    for key in (b"data", label_key):
        if key not in batch:
            raise bad(f"no {key!r} entry")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise bad(f"{b'data'!r} is not a uint8 array")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] == 0:
        raise bad(f"{b'data'!r} has shape {data.shape}, expected [N, 3072]")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise bad(f"{label_key!r} is not a list of integers") from exc
    if labels.shape != (data.shape[0],):
        raise bad(f"{label_key!r} has shape {labels.shape}, expected ({data.shape[0]},)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise bad(f"{label_key!r} lies outside [0, {num_classes})")
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels)


class RandomCropFlip(Dataset[Sample]):
    """In-memory images with a random padded crop and a random horizontal flip per sample.

    The randomness comes from torch's global RNG (seeded per ``DataLoader`` worker).

    Args:
        images: ``[N, C, H, W]`` float images (already normalized).
        labels: ``[N]`` int64 labels.
        padding: Pixels added on each side before cropping back to ``H × W``.
        fill: ``[C]`` value of the padding pixels (the normalized value of black).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, padding: int, fill: torch.Tensor
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.padding = padding
        self.fill = fill.to(images.dtype).view(-1, 1, 1)

    def __len__(self) -> int:
        """Number of samples.

        Returns:
            ``N``.
        """
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        """One augmented sample.

        Args:
            index: Sample index.

        Returns:
            ``(image [C, H, W], label)``.
        """
        image = self.images[index]
        c, h, w = image.shape
        p = self.padding
        padded = self.fill.expand(c, h + 2 * p, w + 2 * p).clone()
        padded[:, p : p + h, p : p + w] = image
        top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
        crop = padded[:, top : top + h, left : left + w]
        if bool(torch.rand(()) < 0.5):
            crop = crop.flip(-1)
        return crop.contiguous(), self.labels[index]


# --------------------------------------------------------------------------------------------
# image folder (ImageNet layout)


def _load_imagefolder(data_dir: str | Path | None, image_size: int | None) -> DataSplits:
    """An ImageNet-style tree ``data_dir/{train,val|test}/<class>/<image>``.

    Args:
        data_dir: The folder holding ``train`` and ``val`` (or ``test``).
        image_size: Side of the square crops (default 224).

    Returns:
        The splits, as lazily decoding :class:`ImageFolder` datasets.
    """
    size = DEFAULT_IMAGEFOLDER_SIZE if image_size is None else image_size
    if data_dir is None:
        raise DataError(
            "imagefolder needs --data-dir: a folder holding train/<class>/<images> and "
            "val/<class>/<images>"
        )
    try:
        import PIL.Image  # noqa: F401
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise DataError(
            "imagefolder needs Pillow to decode images: pip install 'adampx[demo]'"
        ) from None
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train folder: expected {train_dir}/<class>/<images>")
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if test_dir is None:
        raise DataError(
            f"{root} has no val (or test) folder: expected {root / 'val'}/<class>/<images>"
        )
    classes = _class_folders(train_dir)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in _class_folders(test_dir) if c not in index]
    if unknown:
        raise DataError(
            f"{test_dir} has classes that {train_dir} lacks: {', '.join(unknown)}; "
            "the test classes must be a subset of the train classes"
        )
    return DataSplits(
        name="imagefolder",
        train=ImageFolder(_samples(train_dir, index), classes, size, train=True),
        test=ImageFolder(_samples(test_dir, index), classes, size, train=False),
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
    )


def _class_folders(split_dir: Path) -> list[str]:
    """The sorted class folder names of one split (hidden folders skipped).

    Args:
        split_dir: ``data_dir/train`` or ``data_dir/val``.

    Returns:
        The class names.
    """
    classes = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not classes:
        raise DataError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<images>")
    return classes


def _samples(split_dir: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    """Every image file of one split with its class index.

    Args:
        split_dir: ``data_dir/train`` or ``data_dir/val``.
        index: Class name -> label (from the train split).

    Returns:
        ``(path, label)`` pairs, sorted by class then path.
    """
    samples: list[tuple[Path, int]] = []
    for name in _class_folders(split_dir):
        files = sorted(
            p
            for p in (split_dir / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(
                f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        samples.extend((p, index[name]) for p in files)
    return samples


class ImageFolder(Dataset[Sample]):
    """Images decoded from disk on access, resized, cropped to a square and normalized.

    The shorter side is resized to ``image_size``; the train split then takes a random
    ``image_size`` square and flips it horizontally half of the time (torch's global RNG),
    the test split takes the center square. Normalization uses the ImageNet mean and std.

    Args:
        samples: ``(path, label)`` pairs.
        classes: Class names; ``classes[label]`` names a label.
        image_size: Side of the square output.
        train: Whether to augment (random crop and flip) instead of center cropping.
    """

    def __init__(
        self, samples: list[tuple[Path, int]], classes: list[str], image_size: int, train: bool
    ) -> None:
        self.samples = samples
        self.classes = classes
        self.image_size = image_size
        self.train = train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        """Number of images.

        Returns:
            The number of ``(path, label)`` samples.
        """
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        """Decode, resize, crop, (flip,) and normalize one image.

        Args:
            index: Sample index.

        Returns:
            ``(image [3, S, S] float32, label)`` with ``S = image_size``.
        """
        path, label = self.samples[index]
        image = self._decode(path)
        s = self.image_size
        _, h, w = image.shape
        if self.train:
            top = int(torch.randint(0, h - s + 1, ()))
            left = int(torch.randint(0, w - s + 1, ()))
        else:
            top, left = (h - s) // 2, (w - s) // 2
        image = image[:, top : top + s, left : left + s]
        if self.train and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        image = (image - self.mean) / self.std
        return image.contiguous(), torch.tensor(label, dtype=torch.int64)

    def _decode(self, path: Path) -> torch.Tensor:
        """Read an image as RGB with its shorter side resized to ``image_size``.

        Args:
            path: The image file.

        Returns:
            ``[3, H, W]`` float32 in ``[0, 1]`` with ``min(H, W) == image_size``.
        """
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from exc
        w, h = rgb.size
        s = self.image_size
        scale = s / min(w, h)
        new_w, new_h = max(s, round(w * scale)), max(s, round(h * scale))
        if (new_w, new_h) != (w, h):
            rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return pixels.view(new_h, new_w, 3).permute(2, 0, 1).float().div_(255.0)
