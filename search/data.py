"""Image classification data for the accuracy evaluator, from local sources only.

Three sources, all resized to the model's input ``(C, H, W)``::

    load_dataset("digits", (3, 32, 32))          # scikit-learn's bundled 8x8 digits
    load_dataset("photos/", (3, 32, 32))         # ImageFolder style: one sub-folder per class
    load_dataset("arrays.npz", (1, 28, 28))      # x / y, or x_train / y_train / x_val / y_val

Grayscale images are replicated to C channels (colour images are averaged to gray when
C is 1). Pixels are scaled to [0, 1], then standardized per channel with the training
split's mean and standard deviation. Without an explicit validation split, a stratified
``val_fraction`` of the samples is held out (seeded). Nothing is downloaded; a source
that cannot be read is a :class:`DataError`, one line naming the path and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from npas_tvm.errors import NpasError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(NpasError):
    """A data source cannot be read or does not hold a classification dataset."""


@dataclass
class Dataset:
    """Train and validation tensors: x float32 NCHW (standardized), y int64 class ids."""

    x_train: "object"
    y_train: "object"
    x_val: "object"
    y_val: "object"
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, {len(self.y_train)} train + {len(self.y_val)} val, "
                f"{self.num_classes} classes, input {tuple(self.x_train.shape[1:])})")


def load_dataset(source: str, input_shape: tuple[int, int, int], *, val_fraction: float = 0.2,
                 seed: int = 0) -> Dataset:
    """Load ``source`` ("digits", an image directory, or a ``.npz``) as a :class:`Dataset`
    with images of ``input_shape`` = (C, H, W)."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise DataError(f"{source}: input shape {tuple(input_shape)} is not (C, H, W)")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"{source}: val_fraction {val_fraction} must be between 0 and 1")
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        x_train, y_train, x_val, y_val = _split(images, digits.target, val_fraction, seed,
                                                source)
    elif os.path.isdir(source):
        images, labels = _read_image_folder(source)
        x_train, y_train, x_val, y_val = _split(images, labels, val_fraction, seed, source)
    elif source.endswith(".npz") or os.path.isfile(source):
        x_train, y_train, x_val, y_val = _read_npz(source, val_fraction, seed)
    else:
        raise DataError(f"{source}: no such file or directory (expected \"digits\", an image "
                        "directory with one sub-folder per class, or a .npz file)")
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    train = _to_tensor(x_train, input_shape, source)
    val = _to_tensor(x_val, input_shape, source)
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    import torch

    name = "digits" if source == "digits" else os.path.basename(os.path.normpath(source))
    return Dataset(((train - mean) / std).contiguous(), torch.as_tensor(y_train, dtype=torch.int64),
                   ((val - mean) / std).contiguous(), torch.as_tensor(y_val, dtype=torch.int64),
                   num_classes, name)


def _split(images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int,
           source: str):
    """A stratified split: ``val_fraction`` of every class (at least one sample of each
    class with two or more) goes to validation."""
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) < 2:
        raise DataError(f"{source}: {len(labels)} sample(s); at least 2 are needed for a "
                        "train / validation split")
    rng = np.random.default_rng(seed)
    val_index = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        val_index.extend(members[:count].tolist())
    is_val = np.zeros(len(labels), bool)
    is_val[val_index] = True
    train = rng.permutation(np.flatnonzero(~is_val))
    val = np.flatnonzero(is_val)
    return images[train], labels[train], images[val], labels[val]


def _read_image(path: str) -> np.ndarray:
    """An image as float32 HWC in [0, 1] (PIL if installed, else matplotlib)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with matplotlib's wheels
        import matplotlib.image as mpimg

        array = np.asarray(mpimg.imread(path))
    else:
        with Image.open(path) as image:
            image = image.convert("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            array = np.asarray(image)
    array = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else
                                        max(1.0, float(array.max())))
    if array.ndim == 2:
        array = array[:, :, None]
    return array[:, :, :3]


def _read_image_folder(root: str):
    classes = sorted(entry for entry in os.listdir(root)
                     if os.path.isdir(os.path.join(root, entry)))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (an image directory needs one "
                        "sub-folder of images per class)")
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise DataError(f"{folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            path = os.path.join(folder, file)
            try:
                images.append(_read_image(path))
            except Exception as err:  # noqa: BLE001 - any decoder failure is the file's fault
                raise DataError(f"{path}: cannot read the image ({err})") from None
            labels.append(label)
    if len(classes) < 2:
        raise DataError(f"{root}: one class sub-folder ({classes[0]!r}); classification "
                        "needs at least two")
    # Images of different sizes are resized one by one to the first one's size first.
    first = images[0].shape[:2]
    images = [_resize_hwc(image, first) if image.shape[:2] != first else image
              for image in images]
    channels = max(image.shape[2] for image in images)
    images = [np.repeat(image, channels, axis=2) if image.shape[2] == 1 else image
              for image in images]
    return np.stack(images), np.asarray(labels, np.int64)


def _resize_hwc(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    out = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear",
                                          align_corners=False)
    return out[0].numpy().transpose(1, 2, 0)


def _read_npz(path: str, val_fraction: float, seed: int):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except Exception as err:  # noqa: BLE001 - not a zip, a pickle, a truncated file
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") \
            from None
    if {"x_train", "y_train", "x_val", "y_val"} <= set(arrays):
        parts = [arrays[key] for key in ("x_train", "y_train", "x_val", "y_val")]
        for key, x, y in (("train", parts[0], parts[1]), ("val", parts[2], parts[3])):
            _check_xy(path, x, y, f"x_{key}", f"y_{key}")
        return (_scale(parts[0]), parts[1].astype(np.int64), _scale(parts[2]),
                parts[3].astype(np.int64))
    if not {"x", "y"} <= set(arrays):
        raise DataError(f"{path}: expected arrays 'x' and 'y' (or x_train, y_train, x_val, "
                        f"y_val); found {', '.join(sorted(arrays)) or 'none'}")
    _check_xy(path, arrays["x"], arrays["y"], "x", "y")
    return _split(_scale(arrays["x"]), arrays["y"], val_fraction, seed, path)


def _check_xy(path: str, x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> None:
    if x.ndim not in (3, 4):
        raise DataError(f"{path}: array {x_name!r} has shape {x.shape}; expected images "
                        "N x H x W, N x C x H x W or N x H x W x C")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: array {y_name!r} has shape {y.shape}; expected one label "
                        f"per image of {x_name!r} ({len(x)})")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{path}: array {y_name!r} must hold class ids 0, 1, ... as "
                        f"integers (dtype {y.dtype})")


def _scale(x: np.ndarray) -> np.ndarray:
    """Pixels to [0, 1]: uint8 / 255, other values by the array's maximum if above 1."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    top = float(np.abs(x).max()) if x.size else 1.0
    return x / top if top > 1.0 else x


def _to_tensor(images: np.ndarray, input_shape, source: str):
    """N x H x W, N x H x W x C or N x C x H x W images -> float32 N x C x H x W tensor of
    ``input_shape``."""
    import torch

    channels, height, width = input_shape
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise DataError(f"{source}: images of shape {x.shape[1:]} have no 1, 3 or 4 "
                        "channel axis")
    x = x[:, :3]
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = np.repeat(x, channels, axis=1)
        elif channels == 1:
            x = x.mean(axis=1, keepdims=True)
        else:
            raise DataError(f"{source}: images have {x.shape[1]} channels; the model takes "
                            f"{channels}")
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if tensor.shape[2:] != (height, width):
        tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear",
                                                 align_corners=False)
    return tensor.float()
