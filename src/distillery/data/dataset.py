"""The image+caption dataset artifact: a folder any step (and a user with their own data) can read.

    data.npz             images uint8 (N, H, W, 3) RGB, labels int64 (N,), split uint8 (N,) 0=train 1=holdout
    captions.json        N non-empty captions
    classes.json         class names, label i <-> classes[i]
    class_prompts.json   one canonical prompt per class (evaluation asks for each class with it)
    manifest.json        name, sources, resolution, counts, content_sha256, data_revision (data.dvc md5)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from distillery.data.sources import DIGITS

MNIST_TEMPLATES = ["a handwritten digit {w}", "the number {w}, handwritten", "a photo of the digit {w}",
                   "a scanned handwritten {w}"]
EXCLUDED_EMOJI_CATEGORIES = {"Component"}  # five skin-tone swatches, not a class anyone asks for


@dataclass
class ImageCaptionDataset:
    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    captions: list[str]
    classes: list[str]
    class_prompts: list[str]
    manifest: dict = field(default_factory=dict)

    def _subset(self, mask: np.ndarray) -> "ImageCaptionDataset":
        idx = np.nonzero(mask)[0]
        return replace(self, images=self.images[idx], labels=self.labels[idx], split=self.split[idx],
                       captions=[self.captions[i] for i in idx])

    def train(self) -> "ImageCaptionDataset":
        return self._subset(self.split == 0)

    def holdout(self) -> "ImageCaptionDataset":
        return self._subset(self.split == 1)

    def __len__(self) -> int:
        return len(self.labels)


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(images), resolution, resolution, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img)
        if pil.mode == "RGBA":  # emoji: composite on white
            bg = Image.new("RGBA", pil.size, (255, 255, 255, 255))
            pil = Image.alpha_composite(bg, pil)
        out[i] = np.asarray(pil.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC))
    return out


def _mnist(data_dir: Path, per_class: int, rng: np.random.Generator):
    images = np.load(data_dir / "mnist" / "images.npy", mmap_mode="r")
    labels = np.load(data_dir / "mnist" / "labels.npy")
    picks, caps = [], []
    for c in range(10):
        idx = rng.permutation(np.nonzero(labels == c)[0])[:per_class]
        picks.append(idx)
        caps += [MNIST_TEMPLATES[int(rng.integers(len(MNIST_TEMPLATES)))].format(w=DIGITS[c]) for _ in idx]
    idx = np.concatenate(picks)
    imgs = np.asarray(images[idx])
    return imgs, labels[idx], caps, [f"digit {w}" for w in DIGITS], [MNIST_TEMPLATES[0].format(w=w) for w in DIGITS]


def _emoji(data_dir: Path, per_class: int, rng: np.random.Generator):
    images = np.load(data_dir / "emoji" / "images.npy", mmap_mode="r")
    records = json.loads((data_dir / "emoji" / "emoji.json").read_text())
    cats = sorted({r["category"] for r in records} - EXCLUDED_EMOJI_CATEGORIES)
    cat_of = np.array([cats.index(r["category"]) if r["category"] in cats else -1 for r in records])
    picks, labels, caps = [], [], []
    for c, cat in enumerate(cats):
        idx = np.sort(rng.permutation(np.nonzero(cat_of == c)[0])[:per_class])
        picks.append(idx)
        labels += [c] * len(idx)
        caps += [f"an emoji of {records[i]['name']} ({cat.lower()})" for i in idx]
    idx = np.concatenate(picks)
    return (np.asarray(images[idx]), np.array(labels, dtype=np.int64), caps, [f"emoji {c.lower()}" for c in cats],
            [f"an emoji ({c.lower()})" for c in cats])


SOURCES = {"mnist": _mnist, "emoji": _emoji}


def build_image_caption_dataset(out_dir: Path, *, sources=("mnist",), resolution: int = 32, per_class: int = 100,
                                holdout_fraction: float = 0.1, seed: int = 0, data_dir: Path | None = None) -> dict:
    """Class-balanced, stratified train/holdout dataset from the raw sources in data/."""
    from distillery.settings import get_settings

    data_dir = Path(data_dir or get_settings().data_dir)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; available: {sorted(SOURCES)}")
    if not sources:
        raise ValueError(f"no sources given; choose from {sorted(SOURCES)}")
    if resolution < 4:
        raise ValueError(f"resolution={resolution} is too small: use 4 or more (e.g. 32)")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction={holdout_fraction} must be in [0, 1) (e.g. 0.1)")
    if per_class < (2 if holdout_fraction > 0 else 1):
        raise ValueError(f"per_class={per_class} leaves no training images: use at least 2 with a holdout split")
    missing = [s for s in sources if not (data_dir / s).exists()]
    if missing:
        raise FileNotFoundError(f"{missing} not in {data_dir}: run `distillery data pull` (or `make data`) first")
    rng = np.random.default_rng(seed)
    all_imgs, all_labels, all_caps, classes, prompts = [], [], [], [], []
    for s in sources:
        imgs, labels, caps, cls, prm = SOURCES[s](data_dir, per_class, rng)
        counts = np.bincount(labels, minlength=len(cls))
        if counts.min() < per_class:  # balance is the contract: refuse rather than quietly skew the classes
            short = int(counts.argmin())
            raise ValueError(f"per_class={per_class} is more than the {counts[short]} images of class '{cls[short]}' "
                             f"in source '{s}': lower per_class to at most {counts.min()} or drop that source")
        all_imgs.append(_resize(imgs, resolution))
        all_labels.append(labels + len(classes))
        all_caps += caps
        classes += cls
        prompts += prm
    images, labels = np.concatenate(all_imgs), np.concatenate(all_labels)
    split = np.zeros(len(labels), dtype=np.uint8)
    for c in range(len(classes)):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        split[idx[: max(1, int(round(len(idx) * holdout_fraction)))]] = 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "data.npz", images=images, labels=labels, split=split)
    for name, obj in (("captions", all_caps), ("classes", classes), ("class_prompts", prompts)):
        (out / f"{name}.json").write_text(json.dumps(obj, indent=1))
    manifest = {"name": "image-captions", "sources": list(sources), "resolution": resolution,
                "num_images": int(len(labels)), "num_classes": len(classes), "per_class": per_class,
                "holdout_fraction": holdout_fraction, "seed": seed,
                "content_sha256": content_sha256(images, labels, split, all_caps),
                "data_revision": _data_revision(data_dir)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _data_revision(data_dir: Path) -> str:
    """The md5 recorded for data_dir in its DVC pointer file (`data.dvc` beside `data/`), or "untracked"."""
    from distillery.platform.versioning import recorded_md5

    try:
        return recorded_md5(data_dir.resolve().parent / f"{data_dir.resolve().name}.dvc")
    except (FileNotFoundError, ValueError):
        return "untracked"


def content_sha256(images: np.ndarray, labels: np.ndarray, split: np.ndarray, captions: list[str]) -> str:
    h = hashlib.sha256()
    for a in (images, labels, split):
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(captions).encode())
    return h.hexdigest()


def load_image_caption_dataset(path: Path) -> ImageCaptionDataset:
    path = Path(path)
    if not (path / "data.npz").exists():
        raise FileNotFoundError(f"{path} is not an image+caption dataset (no data.npz)")
    with np.load(path / "data.npz", allow_pickle=False) as z:
        images, labels, split = z["images"], z["labels"], z["split"]
    read = lambda n: json.loads((path / f"{n}.json").read_text())  # noqa: E731
    manifest = read("manifest") if (path / "manifest.json").exists() else {}
    return ImageCaptionDataset(images, labels, split, read("captions"), read("classes"), read("class_prompts"), manifest)
