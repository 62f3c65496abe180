"""Datasets for the segmentation example: a synthetic one that needs no download, and
Pascal VOC 2012, Cityscapes and ADE20K read from their standard layouts with PIL.

Every dataset yields ``(image, target)``: image (3, H, W) float32, normalized with the
ImageNet mean and std; target (H, W) int64 class indices, ``IGNORE_INDEX`` (255) where a
pixel has no label.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

try:
    from PIL import Image
except ImportError:  # only the datasets on disk need Pillow; train.py says how to install it
    Image = None

IGNORE_INDEX = 255
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DATASETS = ("synthetic", "voc", "cityscapes", "ade20k")


class DatasetLayoutError(FileNotFoundError):
    """A dataset directory is missing or does not have the expected layout."""


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> normalized with the ImageNet statistics."""
    mean = torch.tensor(MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(STD, dtype=image.dtype).view(3, 1, 1)
    return (image - mean) / std


# --------------------------------------------------------------------------------------
# Synthetic shapes
# --------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("background", "disk", "square", "triangle", "ring", "cross")
_SPLIT_IDS = {"train": 0, "val": 1}
_SUPERSAMPLE = 2  # subpixels per pixel side; pixels whose subpixels disagree are ignored


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of object-local coordinates (u, v), unit radius, in a shape."""
    if kind == "disk":
        return u * u + v * v <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == "triangle":  # equilateral, vertices at radius 1.3 (about a disk's area)
        s3 = math.sqrt(3.0)
        u, v = u / 1.3, v / 1.3
        return (v >= -0.5) & (s3 * u + v <= 1.0) & (-s3 * u + v <= 1.0)
    if kind == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.55**2)
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    raise ValueError(f"unknown shape {kind!r}")


def _shape_texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """A class-specific pattern in [0, 1] over object-local coordinates."""
    w = 2.0 * math.pi * freq
    if kind == "disk":  # stripes
        t = np.sin(w * u)
    elif kind == "square":  # checkerboard
        t = np.sign(np.sin(w * u) * np.sin(w * v))
    elif kind == "triangle":  # dots
        t = np.where(np.cos(w * u) * np.cos(w * v) > 0.3, 1.0, -1.0)
    elif kind == "ring":  # concentric bands
        t = np.sin(w * np.sqrt(u * u + v * v))
    else:  # cross: flat, with a weak diagonal ramp
        t = 0.3 * (u + v)
    return 0.5 + 0.5 * t


def render_synthetic(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders one synthetic sample, a pure function of (seed, split, index, size).

    Returns image (size, size, 3) float32 in [0, 1] and label (size, size) uint8 with
    classes 0..5 and 255 on pixels that straddle an object boundary.
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    n = size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    # Background: two greyish colours blended by a slow random wave.
    c0, c1 = rng.uniform(0.2, 0.8, size=(2, 1)) + rng.uniform(-0.12, 0.12, size=(2, 3))
    theta = rng.uniform(0, 2 * math.pi)
    period = rng.uniform(0.5, 1.5) * size
    wave = 0.5 + 0.5 * np.sin(
        2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period
        + rng.uniform(0, 2 * math.pi)
    )
    image = c0 + (c1 - c0) * wave[..., None]
    label = np.zeros((n, n), dtype=np.uint8)

    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        kind = SYNTHETIC_CLASSES[cls]
        radius = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(0.15, 0.85, size=2) * size
        rot = rng.uniform(0, 2 * math.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(rot) + dy * math.sin(rot)) / radius
        v = (-dx * math.sin(rot) + dy * math.cos(rot)) / radius
        mask = _shape_mask(kind, u, v)
        # Colour: a hue band per class, wide enough that neighbouring classes overlap (and
        # the per-image colour cast below moves hues further), so the shape and texture
        # are needed to tell them apart. Texture period of 4 to 7 pixels.
        tex = _shape_texture(kind, u, v, radius / rng.uniform(4.0, 7.0))
        hue = (cls - 1) / (len(SYNTHETIC_CLASSES) - 1) + rng.uniform(-0.12, 0.12)
        sat, val = rng.uniform(0.5, 1.0), rng.uniform(0.5, 0.95)
        a = np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val))
        b = np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val * rng.uniform(0.3, 0.6)))
        image[mask] = a + (b - a) * tex[mask][:, None]
        label[mask] = cls

    # Per-image photometric shift: contrast, brightness and a colour cast.
    contrast = rng.uniform(0.5, 1.5)
    brightness = rng.uniform(-0.25, 0.25)
    gain = rng.uniform(0.85, 1.15, size=3)
    image = (image - 0.5) * contrast * gain + 0.5 + brightness

    # Down to pixels: average the subpixels (anti-aliasing); a pixel whose subpixels carry
    # different classes is a boundary pixel and gets the ignore label.
    k = _SUPERSAMPLE
    image = image.reshape(size, k, size, k, 3).mean(axis=(1, 3))
    image = image + rng.normal(0.0, 0.02, size=image.shape)
    sub = label.reshape(size, k, size, k).transpose(0, 2, 1, 3).reshape(size, size, k * k)
    out = sub[..., 0].copy()
    out[(sub != sub[..., :1]).any(axis=-1)] = IGNORE_INDEX
    return np.clip(image, 0.0, 1.0).astype(np.float32), out


class SyntheticShapes(Dataset):
    """Images of textured shapes (disk, square, triangle, ring, cross) on a greyish
    background. Each class has its own texture and a hue band that overlaps its
    neighbours'; every image gets a random brightness, contrast and colour cast.

    Sample ``i`` is generated on the fly and depends only on (seed, split, i, image_size),
    so every rank, worker and run sees the same data without any file.
    """

    num_classes = len(SYNTHETIC_CLASSES)

    def __init__(
        self, num_samples: int, image_size: int, seed: int = 0, split: str = "train"
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if num_samples < 1 or image_size < 8:
            raise ValueError(
                f"need num_samples >= 1 and image_size >= 8, got {num_samples}, {image_size}"
            )
        self.num_samples, self.image_size, self.seed, self.split = (
            num_samples,
            image_size,
            seed,
            split,
        )
        self.flip = split == "train"

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        image, label = render_synthetic(self.seed, self.split, index, self.image_size)
        x = normalize(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        y = torch.from_numpy(label.astype(np.int64))
        if self.flip and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


# --------------------------------------------------------------------------------------
# Datasets on disk
# --------------------------------------------------------------------------------------


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return normalize(torch.from_numpy(arr).permute(2, 0, 1).contiguous())


class TrainTransform:
    """Random scale (image and label resized by the same factor), pad to the crop size
    with the ignore label, random crop of ``crop_size`` and random horizontal flip."""

    def __init__(self, crop_size: int, scale: tuple[float, float] = (0.5, 2.0)) -> None:
        self.crop_size, self.scale = crop_size, scale

    def __call__(self, image: Image.Image, label: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale
        s = lo + (hi - lo) * float(torch.rand(()))
        w, h = image.size
        size = (max(1, round(w * s)), max(1, round(h * s)))
        x = _pil_to_tensor(image.resize(size, Image.BILINEAR))
        y = torch.from_numpy(np.asarray(label.resize(size, Image.NEAREST), dtype=np.int64))
        c = self.crop_size
        ph, pw = max(0, c - y.shape[0]), max(0, c - y.shape[1])
        if ph or pw:  # zero is the mean after normalization
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
        top = int(torch.randint(0, y.shape[0] - c + 1, ()))
        left = int(torch.randint(0, y.shape[1] - c + 1, ()))
        x, y = x[:, top : top + c, left : left + c], y[top : top + c, left : left + c]
        if torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()


def eval_transform(image: Image.Image, label: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution image and label, no augmentation."""
    return _pil_to_tensor(image), torch.from_numpy(np.asarray(label, dtype=np.int64).copy())


class SegmentationFiles(Dataset):
    """(image path, label path) pairs read with PIL.

    ``label_map`` turns the stored label array (H, W) into class indices with
    ``IGNORE_INDEX`` for unlabelled pixels.
    """

    def __init__(
        self,
        pairs: list[tuple[str, str]],
        num_classes: int,
        transform: Callable[[Image.Image, Image.Image], tuple[torch.Tensor, torch.Tensor]],
        label_map: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.pairs, self.num_classes = pairs, num_classes
        self.transform, self.label_map = transform, label_map

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        try:
            image = Image.open(image_path).convert("RGB")
            label = Image.open(label_path)
            # Palette PNGs (VOC) hold class indices: read the indices, never the colours.
            if label.mode not in ("L", "P"):
                raise ValueError(f"label mode {label.mode!r}, expected 8-bit 'L' or 'P'")
            label.load()
        except (OSError, ValueError) as e:
            raise DatasetLayoutError(
                f"cannot read sample {index}: {image_path} / {label_path}: {e}"
            ) from e
        if image.size != label.size:
            raise DatasetLayoutError(
                f"image {image_path} is {image.size} but its label {label_path} is {label.size}"
            )
        if self.label_map is not None:
            label = Image.fromarray(self.label_map(np.asarray(label)).astype(np.uint8))
        return self.transform(image, label)


@dataclass(frozen=True)
class _Layout:
    name: str
    num_classes: int
    text: str  # the expected layout, shown in errors


_VOC = _Layout(
    "voc",
    21,
    """<data-path>/VOCdevkit/VOC2012/   (or <data-path> itself being VOC2012/)
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png            palette PNG: classes 0..20, 255 = ignore
    ImageSets/Segmentation/train.txt      one <id> per line
    ImageSets/Segmentation/val.txt""",
)
_CITYSCAPES = _Layout(
    "cityscapes",
    19,
    """<data-path>/
    leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png
        train ids 0..18, 255 = ignore (made by cityscapesscripts'
        createTrainIdLabelImgs from the *_gtFine_labelIds.png files)""",
)
_ADE20K = _Layout(
    "ade20k",
    150,
    """<data-path>/ADEChallengeData2016/   (or <data-path> itself being ADEChallengeData2016/)
    images/training/<name>.jpg
    images/validation/<name>.jpg
    annotations/training/<name>.png       classes 1..150, 0 = other (ignored)
    annotations/validation/<name>.png""",
)


def _layout_error(layout: _Layout, root: str, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"dataset {layout.name!r} at --data-path {root!r}: {problem}\n"
        f"expected layout:\n{layout.text}"
    )


def _find_dir(root: str, candidates: list[str], must_contain: str) -> str | None:
    for cand in candidates:
        if os.path.isdir(os.path.join(cand, must_contain)):
            return cand
    return None


def _check_pairs(layout: _Layout, root: str, pairs: list[tuple[str, str]], what: str) -> None:
    if not pairs:
        raise _layout_error(layout, root, f"no samples found for {what}")
    for image_path, label_path in pairs:
        for path in (image_path, label_path):
            if not os.path.isfile(path):
                raise _layout_error(layout, root, f"missing file {path} ({what})")


def voc_pairs(root: str, split: str) -> list[tuple[str, str]]:
    """Pascal VOC 2012 segmentation: ``split`` is 'train' or 'val'."""
    base = _find_dir(root, [os.path.join(root, "VOCdevkit", "VOC2012"), root], "JPEGImages")
    if base is None:
        raise _layout_error(_VOC, root, "no VOCdevkit/VOC2012/JPEGImages directory")
    list_file = os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(list_file):
        raise _layout_error(_VOC, root, f"missing split list {list_file}")
    with open(list_file) as f:
        ids = [line.strip() for line in f if line.strip()]
    pairs = [
        (
            os.path.join(base, "JPEGImages", f"{i}.jpg"),
            os.path.join(base, "SegmentationClass", f"{i}.png"),
        )
        for i in ids
    ]
    _check_pairs(_VOC, root, pairs, f"split {split!r} listed in {list_file}")
    return pairs


def cityscapes_pairs(root: str, split: str) -> list[tuple[str, str]]:
    """Cityscapes fine annotations: ``split`` is 'train' or 'val'."""
    image_dir = os.path.join(root, "leftImg8bit", split)
    label_dir = os.path.join(root, "gtFine", split)
    for d in (image_dir, label_dir):
        if not os.path.isdir(d):
            raise _layout_error(_CITYSCAPES, root, f"missing directory {d}")
    pairs = []
    for city in sorted(os.listdir(image_dir)):
        city_dir = os.path.join(image_dir, city)
        if not os.path.isdir(city_dir):
            continue
        for name in sorted(os.listdir(city_dir)):
            if not name.endswith("_leftImg8bit.png"):
                continue
            stem = name[: -len("_leftImg8bit.png")]
            label = os.path.join(label_dir, city, f"{stem}_gtFine_labelTrainIds.png")
            if not os.path.isfile(label) and os.path.isfile(
                label.replace("_labelTrainIds", "_labelIds")
            ):
                raise _layout_error(
                    _CITYSCAPES,
                    root,
                    f"{label} is missing but *_gtFine_labelIds.png exist: convert them to "
                    "train ids first (cityscapesscripts/preparation/createTrainIdLabelImgs.py)",
                )
            pairs.append((os.path.join(city_dir, name), label))
    _check_pairs(_CITYSCAPES, root, pairs, f"split {split!r} under {image_dir}")
    return pairs


def ade20k_pairs(root: str, split: str) -> list[tuple[str, str]]:
    """ADE20K (SceneParsing ADEChallengeData2016): ``split`` is 'train' or 'val'."""
    base = _find_dir(root, [os.path.join(root, "ADEChallengeData2016"), root], "images")
    if base is None:
        raise _layout_error(_ADE20K, root, "no ADEChallengeData2016/images directory")
    sub = {"train": "training", "val": "validation"}[split]
    image_dir = os.path.join(base, "images", sub)
    label_dir = os.path.join(base, "annotations", sub)
    for d in (image_dir, label_dir):
        if not os.path.isdir(d):
            raise _layout_error(_ADE20K, root, f"missing directory {d}")
    names = sorted(n[:-4] for n in os.listdir(image_dir) if n.endswith(".jpg"))
    pairs = [
        (os.path.join(image_dir, f"{n}.jpg"), os.path.join(label_dir, f"{n}.png")) for n in names
    ]
    _check_pairs(_ADE20K, root, pairs, f"split {split!r} under {image_dir}")
    return pairs


def _ade20k_labels(label: np.ndarray) -> np.ndarray:
    # 0 is "other": ignored; classes 1..150 become 0..149.
    out = label.astype(np.int64) - 1
    out[out < 0] = IGNORE_INDEX
    return out


def build_dataset(
    name: str,
    split: str,
    *,
    data_path: str | None = None,
    image_size: int = 64,
    num_samples: int | None = None,
    seed: int = 0,
) -> tuple[Dataset, int]:
    """Returns ``(dataset, num_classes)`` for ``split`` in {'train', 'val'}.

    Training samples of the datasets on disk are randomly scaled (0.5x to 2x), cropped
    to ``image_size`` and flipped; validation samples are full-size images. Synthetic
    samples are ``image_size`` squares. ``num_samples`` keeps the first N samples (all
    of them when None; synthetic: how many to generate, required).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "synthetic":
        if num_samples is None:
            raise ValueError("the synthetic dataset needs num_samples")
        return SyntheticShapes(num_samples, image_size, seed, split), SyntheticShapes.num_classes
    finders = {"voc": (voc_pairs, _VOC), "cityscapes": (cityscapes_pairs, _CITYSCAPES)}
    finders["ade20k"] = (ade20k_pairs, _ADE20K)
    if name not in finders:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    find, layout = finders[name]
    if not data_path:
        raise _layout_error(layout, str(data_path), "--data-path is required")
    if not os.path.isdir(data_path):
        raise _layout_error(layout, data_path, "the directory does not exist")
    pairs = find(data_path, split)
    if num_samples is not None:
        pairs = pairs[:num_samples]
    transform = TrainTransform(image_size) if split == "train" else eval_transform
    label_map = _ade20k_labels if name == "ade20k" else None
    return SegmentationFiles(pairs, layout.num_classes, transform, label_map), layout.num_classes
