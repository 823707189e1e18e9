"""Classes of images and the episodic N-way K-shot sampler (PIL/numpy only, no torchvision).

A :class:`ClassPool` is one split's classes (meta-train, meta-val or meta-test): it
knows how many images each class has and returns any of them as a float array
``(n, channels, size, size)``. :class:`ArrayPool` holds decoded images in memory
(glyphs, Omniglot, Fashion-MNIST, Hugging Face sets); :class:`FilePool` reads image
files on demand (mini/tieredImageNet: tens of GB would not fit), with PIL.

:func:`sample_episode` draws one task: ``ways`` distinct classes in random order
(labelled ``0 .. ways-1`` in that order), then ``shots + query`` distinct images of
each, the first ``shots`` for the support set and the rest for the query set, both
ordered by label. Every draw comes from the ``torch.Generator`` passed in, so a seed
gives the same episodes wherever they are drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ArrayPool", "ClassPool", "FilePool", "sample_episode", "stack_episodes"]

#: ``((xs, ys), (xq, yq))``.
Episode = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]
#: Per-class extra variants: a class index and a transform (Omniglot's rotations).
Transform = Callable[[np.ndarray], np.ndarray]


class ClassPool:
    """One split's classes. Subclasses define :meth:`count` and :meth:`_load`.

    Args:
        names: a name per class (for messages and checks).
        transforms: per class, a function applied to its images (``(n, C, H, W)``
            float arrays), or ``None``.
        mean, std: per-channel normalization applied after loading.
    """

    def __init__(
        self,
        names: Sequence[str],
        transforms: Sequence[Transform | None] | None = None,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        self.names = list(names)
        self.transforms = list(transforms) if transforms is not None else [None] * len(names)
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.names)

    def count(self, c: int) -> int:
        """Images of class ``c``."""
        raise NotImplementedError

    def _load(self, c: int, items: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def images(self, c: int, items: Sequence[int]) -> np.ndarray:
        """Images ``items`` of class ``c``, ``float32 (n, C, H, W)``, normalized."""
        x = self._load(c, items)
        transform = self.transforms[c]
        if transform is not None:
            x = transform(x)
        return (x - self.mean) / self.std


class ArrayPool(ClassPool):
    """Classes held in memory: ``images[c]`` is a ``uint8`` array ``(n_c, H, W)`` or
    ``(n_c, H, W, C)``, scaled to ``[0, 1]`` on loading. ``images`` may be one array
    ``(classes, n, ...)`` or a list of per-class arrays (different counts)."""

    def __init__(self, images: np.ndarray | Sequence[np.ndarray], names: Sequence[str], **kw):
        super().__init__(names, **kw)
        self.arrays = images
        if len(images) != len(self.names):
            raise ValueError(f"{len(images)} image arrays for {len(self.names)} class names")

    def count(self, c: int) -> int:
        return int(self.arrays[c].shape[0])

    def _load(self, c: int, items: Sequence[int]) -> np.ndarray:
        x = np.asarray(self.arrays[c][np.asarray(items)], dtype=np.float32) / 255.0
        return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


class FilePool(ClassPool):
    """Classes as lists of image files, decoded with PIL when drawn: converted to
    ``mode`` (``"RGB"`` or ``"L"``), resized to ``size x size`` if they are not."""

    def __init__(
        self, files: Sequence[Sequence[Path]], names: Sequence[str], size: int, mode: str, **kw
    ):
        super().__init__(names, **kw)
        self.files, self.size, self.mode = [list(f) for f in files], size, mode

    def count(self, c: int) -> int:
        return len(self.files[c])

    def _load(self, c: int, items: Sequence[int]) -> np.ndarray:
        from PIL import Image

        out = []
        for i in items:
            with Image.open(self.files[c][i]) as img:
                img = img.convert(self.mode)
                if img.size != (self.size, self.size):
                    img = img.resize((self.size, self.size), Image.BILINEAR)
                out.append(np.asarray(img, dtype=np.float32) / 255.0)
        x = np.stack(out)
        return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


def sample_episode(
    pool: ClassPool, gen: torch.Generator, *, ways: int, shots: int, query: int
) -> Episode:
    """One N-way K-shot episode from ``pool``; see the module docstring.

    Raises:
        ValueError: fewer than ``ways`` classes, or a chosen class with fewer than
            ``shots + query`` images (the message names it).
    """
    if len(pool) < ways:
        raise ValueError(f"{ways}-way episodes need {ways} classes; this split has {len(pool)}")
    classes = torch.randperm(len(pool), generator=gen)[:ways].tolist()
    support, queries = [], []
    for c in classes:
        n = pool.count(c)
        if n < shots + query:
            raise ValueError(
                f"class {pool.names[c]!r} has {n} images; an episode needs shots + query = "
                f"{shots + query}"
            )
        items = torch.randperm(n, generator=gen)[: shots + query].tolist()
        x = pool.images(c, items)
        support.append(x[:shots])
        queries.append(x[shots:])
    xs = torch.from_numpy(np.concatenate(support))
    xq = torch.from_numpy(np.concatenate(queries))
    ys = torch.arange(ways).repeat_interleave(shots)
    yq = torch.arange(ways).repeat_interleave(query)
    return (xs, ys), (xq, yq)


def stack_episodes(episodes: Sequence[Episode]) -> Episode:
    """Episodes stacked along a new first dimension (for evaluation under vmap)."""
    supports, queries = zip(*episodes, strict=True)
    return (
        (torch.stack([x for x, _ in supports]), torch.stack([y for _, y in supports])),
        (torch.stack([x for x, _ in queries]), torch.stack([y for _, y in queries])),
    )
