"""The few-shot datasets, each as meta-train / meta-val / meta-test class pools.

Nothing is downloaded unless a Hugging Face hub name is given (``--hub``). Layouts:

* ``glyphs``: generated here from installed fonts (:mod:`recipes.fewshot.glyphs`).
* ``omniglot``: ``ROOT/images_background/<Alphabet>/<characterNN>/*.png`` and
  ``ROOT/images_evaluation/...``, as unzipped from the release (either folder may be
  missing; both are used when present). Images resized to 28x28 and inverted (strokes 1,
  as MAML does). The 1,623 characters, sorted, are shuffled with ``random.Random(1)`` (MAML's
  ``random.seed(1)``): the first 1,100 are meta-train, the next 100 meta-val, the rest
  meta-test (MAML's 1,200-class meta-train split, its last 100 held out for validation);
  each character's rotations by 0/90/180/270 degrees are four classes of its split.
* ``miniimagenet`` / ``tieredimagenet``: ``ROOT/{train,val,test}/<class>/*.{jpg,png}``
  (the Ravi-Larochelle and Ren et al. splits), read on demand, 84x84 RGB, normalized
  with ImageNet's channel means and deviations.
* ``fashion-mnist``: the four ``*-idx?-ubyte.gz`` files (Debian's
  ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``). Ten
  classes leave no third split: meta-train is classes 0-4 (training file), meta-test
  classes 5-9 (test file), meta-val classes 5-9 from the training file (other images
  of the meta-test classes: use it to watch training, not to select models).
* ``hf``: a Hugging Face ``datasets`` dataset, ``--hub NAME`` (from the hub) or
  ``--root DIR`` (saved with ``save_to_disk``); splits ``train`` / ``validation`` (or
  ``val``) / ``test`` with disjoint classes, or one split whose classes are divided
  64 / 16 / 20 % by a fixed shuffle. The image column is the first ``Image`` feature,
  the label column ``label`` (``--image-column`` / ``--label-column`` to choose).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recipes.fewshot.episodes import ArrayPool, ClassPool, FilePool
from recipes.fewshot.glyphs import cache_dir, load_glyphs

__all__ = ["DATASETS", "DataSpec", "Splits", "load_splits"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class DataSpec:
    """Where the data is: ``root`` (a folder), ``hub`` (a hub name), the cache folder,
    the image side (0: the dataset's), and the Hugging Face columns."""

    root: str = ""
    hub: str = ""
    cache: str = ""
    image_size: int = 0
    image_column: str = ""
    label_column: str = "label"


@dataclass(frozen=True)
class Splits:
    """The three class pools and the images' shape."""

    train: ClassPool
    val: ClassPool
    test: ClassPool
    channels: int
    size: int


def _glyphs(spec: DataSpec) -> Splits:
    size = spec.image_size or 28
    g = load_glyphs(spec.cache, size=size)
    pools = [
        ArrayPool(g.images[idx], [f"{g.scripts[i]}/{g.chars[i]}" for i in idx])
        for idx in (np.asarray(g.classes(s)) for s in ("train", "val", "test"))
    ]
    return Splits(*pools, channels=1, size=size)


def _missing(name: str, root: str, layout: str) -> FileNotFoundError:
    where = f"at {root!r}" if root else "(no --root given)"
    return FileNotFoundError(f"{name}: no dataset {where}. Put it in this layout:\n{layout}")


def _omniglot(spec: DataSpec) -> Splits:
    root = Path(spec.root) if spec.root else None
    parts = [root / p for p in ("images_background", "images_evaluation")] if root else []
    parts = [p for p in parts if p.is_dir()]
    if not parts:
        raise _missing(
            "omniglot",
            spec.root,
            "  ROOT/images_background/<Alphabet>/<characterNN>/*.png\n"
            "  ROOT/images_evaluation/<Alphabet>/<characterNN>/*.png\n"
            "(the two zips of the Omniglot release, unzipped into ROOT; pass --root ROOT)",
        )
    chars = sorted(c for part in parts for a in sorted(part.iterdir()) if a.is_dir()
                   for c in sorted(a.iterdir()) if c.is_dir())  # fmt: skip
    files = [sorted(f for f in c.iterdir() if f.suffix.lower() == ".png") for c in chars]
    size = spec.image_size or 28

    def build() -> dict[str, np.ndarray]:
        from PIL import Image

        arrays = []
        for char_files in files:
            imgs = []
            for f in char_files:
                with Image.open(f) as img:
                    img = img.convert("L").resize((size, size), Image.LANCZOS)
                    imgs.append(255 - np.asarray(img, np.uint8))
            arrays.append(np.stack(imgs))
        counts = np.array([len(a) for a in arrays])
        return {"images": np.concatenate(arrays), "counts": counts}

    key = f"{[str(f) for f in files]}|{size}"
    data = _cached("omniglot", key, build, spec.cache)
    starts = np.concatenate([[0], np.cumsum(data["counts"])])
    per_char = [data["images"][starts[i] : starts[i + 1]] for i in range(len(chars))]
    order = list(range(len(chars)))
    random.Random(1).shuffle(order)
    n_val = min(100, max(1, len(order) // 10))
    n_train = min(1100, len(order) - n_val - max(1, len(order) // 5))
    groups = [order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]]
    pools = []
    for group in groups:
        images, names, transforms = [], [], []
        for i in group:
            for k in range(4):  # rotations as extra classes
                images.append(per_char[i])
                names.append(f"{chars[i].parent.name}/{chars[i].name}/rot{90 * k}")
                transforms.append(_rotation(k))
        pools.append(ArrayPool(images, names, transforms=transforms))
    return Splits(*pools, channels=1, size=size)


def _rotation(k: int) -> Callable[[np.ndarray], np.ndarray] | None:
    if k == 0:
        return None
    return lambda x: np.ascontiguousarray(np.rot90(x, k, axes=(2, 3)))


def _imagenet(name: str) -> Callable[[DataSpec], Splits]:
    def load(spec: DataSpec) -> Splits:
        root = Path(spec.root) if spec.root else None
        if root is None or not all((root / s).is_dir() for s in ("train", "val", "test")):
            raise _missing(
                name,
                spec.root,
                "  ROOT/train/<class>/*.jpg   (64 classes for miniImageNet, 351 for tiered)\n"
                "  ROOT/val/<class>/*.jpg     (16 / 97)\n"
                "  ROOT/test/<class>/*.jpg    (20 / 160)\n"
                "(class folders of images, any size (resized to 84x84); pass --root ROOT)",
            )
        size = spec.image_size or 84
        pools = []
        for split in ("train", "val", "test"):
            classes = sorted(c for c in (root / split).iterdir() if c.is_dir())
            files = [sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTS)
                     for c in classes]  # fmt: skip
            pools.append(
                FilePool(files, [c.name for c in classes], size, "RGB",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)
            )  # fmt: skip
        return Splits(*pools, channels=3, size=size)

    return load


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(spec: DataSpec) -> Splits:
    root = Path(spec.root or "/usr/share/datasets/fashion-mnist")
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]  # fmt: skip
    if not all((root / n).is_file() for n in names):
        raise _missing(
            "fashion-mnist",
            str(root),
            "  ROOT/" + "\n  ROOT/".join(names) + "\n(`apt-get install -y dataset-fashion-mnist` "
            "puts them in /usr/share/datasets/fashion-mnist, the default ROOT)",
        )
    x_train, y_train, x_test, y_test = (_idx(root / n) for n in names)
    size = spec.image_size or 28
    if size != 28:
        raise ValueError("fashion-mnist: images are 28x28 (--image-size 28 or 0)")

    def pool(x: np.ndarray, y: np.ndarray, classes: range) -> ArrayPool:
        return ArrayPool([x[y == c] for c in classes], [f"class{c}" for c in classes])

    return Splits(
        pool(x_train, y_train, range(5)),
        pool(x_train, y_train, range(5, 10)),
        pool(x_test, y_test, range(5, 10)),
        channels=1,
        size=size,
    )


def _hf(spec: DataSpec) -> Splits:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "hf: needs Hugging Face `datasets`: pip install -e '.[fewshot-hf]'"
        ) from None
    if spec.hub:
        data = datasets.load_dataset(spec.hub)
    elif spec.root and Path(spec.root).exists():
        data = datasets.load_from_disk(spec.root)
    else:
        raise _missing(
            "hf",
            spec.root,
            "  a folder written by datasets' save_to_disk (--root DIR), or a hub name (--hub "
            "NAME); splits train / validation / test with disjoint classes, or one split",
        )
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    by_split: dict[str, dict[object, list[np.ndarray]]] = {}
    image_col, channels, size = spec.image_column, 0, spec.image_size
    for split_name, split in data.items():
        if split_name not in SPLIT_NAMES:
            continue
        features = split.features
        image_col = image_col or next(
            k for k, f in features.items() if isinstance(f, datasets.Image)
        )
        for row in split:
            img = row[image_col]
            if channels == 0:
                channels = 1 if img.mode in ("L", "1") else 3
                size = size or (28 if channels == 1 else 84)
            img = img.convert("L" if channels == 1 else "RGB").resize((size, size))
            classes = by_split.setdefault(SPLIT_NAMES[split_name], {})
            classes.setdefault(row[spec.label_column], []).append(np.asarray(img, np.uint8))
    if set(by_split) == {"train"}:  # one split: divide its classes
        labels = sorted(by_split["train"], key=str)
        random.Random(0).shuffle(labels)
        a, b = round(0.64 * len(labels)), round(0.8 * len(labels))
        everything = by_split["train"]
        by_split = {s: {k: everything[k] for k in part}
                    for s, part in (("train", labels[:a]), ("val", labels[a:b]),
                                    ("test", labels[b:]))}  # fmt: skip
    pools = []
    for s in ("train", "val", "test"):
        classes = by_split.get(s, {})
        pools.append(ArrayPool([np.stack(v) for v in classes.values()], list(map(str, classes))))
    norm = {} if channels == 1 else {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    for p in pools:
        if norm:
            p.mean = np.asarray(norm["mean"], np.float32)[:, None, None]
            p.std = np.asarray(norm["std"], np.float32)[:, None, None]
    return Splits(*pools, channels=channels, size=size)


def _cached(
    name: str, key: str, build: Callable[[], dict[str, np.ndarray]], cache: str
) -> dict[str, np.ndarray]:
    """``build()``'s arrays, cached as ``<cache>/<name>-<hash of key>.npz``."""
    path = cache_dir(cache) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


#: Dataset name -> loader.
DATASETS: dict[str, Callable[[DataSpec], Splits]] = {
    "glyphs": _glyphs,
    "omniglot": _omniglot,
    "miniimagenet": _imagenet("miniimagenet"),
    "tieredimagenet": _imagenet("tieredimagenet"),
    "fashion-mnist": _fashion_mnist,
    "hf": _hf,
}


def load_splits(name: str, spec: DataSpec) -> Splits:
    """The meta-train / meta-val / meta-test pools of dataset ``name``.

    Raises:
        FileNotFoundError: the data is not where ``spec`` says (the message gives the
            layout to put it in).
    """
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    return DATASETS[name](spec)
