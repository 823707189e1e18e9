"""An offline Omniglot-like dataset: characters of many scripts rendered from installed fonts.

Each script with a font (Debian's ``fonts-noto-core`` ships one per script:
``NotoSansArmenian-Regular.ttf``, ``NotoSansRunic-Regular.ttf``, ...; the generic
``NotoSans``/``DejaVuSans`` add Latin, Greek and Cyrillic) is an *alphabet*; each of its
letters (Unicode categories ``Lo`` and ``Lu`` whose name starts with the script's name,
``ARMENIAN CAPITAL LETTER AYB``) that the font really draws (not its "missing glyph"
box, not a duplicate drawing) is a *class*, at most ``max_per_script`` per script,
spread evenly over the script's code points. Each class gets ``instances`` images (20,
as Omniglot's 20 drawers), each a random draw of

* stroke weight: the glyph eroded or dilated by 0-2 pixels (of 96);
* an affine map: rotation +-15 degrees, shear +-0.25, scale 0.8-1.1 per axis,
  translation +-6 pixels (of 96);
* noise: Gaussian pixel noise (std 0.06) after the resize to ``size x size``.

Pixels are in ``[0, 1]``, strokes bright on a dark background. Scripts (never single
characters) are split into meta-train / meta-val / meta-test by a fixed shuffle of their
names (about 70 / 10 / 20 % of the classes), so no class or alphabet is shared between
splits. Everything is drawn from ``numpy.random.default_rng`` seeded per class, so the
set depends only on the fonts and the version: it is generated once (~1 min) and cached
as an ``.npz`` under the cache folder, keyed by a hash of the font files and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FONT_DIRS", "GlyphSet", "find_fonts", "load_glyphs"]

#: Where fonts are looked for (Debian's layout).
FONT_DIRS = ("/usr/share/fonts/truetype/noto", "/usr/share/fonts/truetype/dejavu")
VERSION = "glyphs/1"
SPLITS = ("train", "val", "test")
_GENERIC = {"NotoSans": ("LATIN", "GREEK", "CYRILLIC"), "DejaVuSans": ("LATIN", "GREEK")}
_CANVAS, _BOX, _FONT_PX = 96, 72, 64


@dataclass(frozen=True)
class GlyphSet:
    """The rendered set: ``images[c]`` holds class ``c``'s instances.

    Attributes:
        images: ``uint8`` array ``(classes, instances, size, size)``.
        scripts: each class's script (its alphabet).
        chars: each class's character.
        split: each class's split, ``train`` / ``val`` / ``test``.
    """

    images: np.ndarray
    scripts: list[str]
    chars: list[str]
    split: list[str]

    def classes(self, split: str) -> list[int]:
        """Indices of the classes of ``split``."""
        return [i for i, s in enumerate(self.split) if s == split]


def find_fonts(dirs: Sequence[str] = FONT_DIRS) -> dict[str, Path]:
    """``{Unicode script prefix: font file}``, one font per script (the shortest name wins).

    ``NotoSansOldItalic-Regular.ttf`` serves ``OLD ITALIC``; generic fonts serve Latin,
    Greek and Cyrillic. Bold/italic/display/mono variants are skipped.
    """
    found: dict[str, Path] = {}
    files = sorted(p for d in dirs if Path(d).is_dir() for p in Path(d).glob("*.ttf"))
    for path in sorted(files, key=lambda p: (len(p.name), p.name)):
        stem = path.stem
        if re.search(r"Bold|Italic|Display|Mono|Condensed|Light|Oblique", stem.split("-", 1)[-1]):
            continue
        base = stem.split("-")[0]
        if base in _GENERIC:
            prefixes: tuple[str, ...] = _GENERIC[base]
        else:
            m = re.fullmatch(r"Noto(?:Sans|Serif)([A-Z]\w+)", base)
            if not m or re.search(r"Display|Mono|Symbols|Math|Music|Numerals", m.group(1)):
                continue
            words = re.findall(r"[A-Z][a-z]*|\d+", m.group(1))
            prefixes = (" ".join(words).upper(), "".join(words).upper(), "-".join(words).upper())
        for prefix in prefixes:
            found.setdefault(prefix, path)
    return found


def _letters(prefixes: Sequence[str]) -> dict[str, list[str]]:
    """Letters (``Lo``/``Lu``) of each script prefix, by Unicode name."""
    wanted = set(prefixes)
    out: dict[str, list[str]] = {p: [] for p in prefixes}
    for cp in range(0x21, 0x30000):
        ch = chr(cp)
        if unicodedata.category(ch) not in ("Lo", "Lu"):
            continue
        words = unicodedata.name(ch, "").split(" ")
        for n in range(min(3, len(words) - 1), 0, -1):
            prefix = " ".join(words[:n])
            if prefix in wanted:
                out[prefix].append(ch)
                break
    return out


def _master(font: object, ch: str, notdef: bytes) -> np.ndarray | None:
    """The glyph, white on black, fitted into a ``_BOX`` square centered on the canvas;
    ``None`` when the font draws nothing or its missing-glyph box."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (_CANVAS * 2, _CANVAS * 2), 0)
    ImageDraw.Draw(img).text((_CANVAS // 2, _CANVAS // 2), ch, fill=255, font=font)
    box = img.getbbox()
    if box is None or img.tobytes() == notdef:
        return None
    glyph = img.crop(box)
    w, h = glyph.size
    scale = _BOX / max(w, h)
    glyph = glyph.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    canvas.paste(glyph, ((_CANVAS - glyph.size[0]) // 2, (_CANVAS - glyph.size[1]) // 2))
    return np.asarray(canvas)


def _instance(master: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """One random drawing of ``master``: stroke weight, affine map, noise; ``uint8``."""
    from PIL import Image, ImageFilter

    img = Image.fromarray(master)
    weight = int(rng.integers(-1, 3))  # erode 1, keep, dilate 1 or 2
    if weight:
        filt = ImageFilter.MaxFilter if weight > 0 else ImageFilter.MinFilter
        img = img.filter(filt(2 * abs(weight) + 1))
    angle = np.deg2rad(rng.uniform(-15, 15))
    shear = rng.uniform(-0.25, 0.25)
    sx, sy = rng.uniform(0.8, 1.1, size=2)
    tx, ty = rng.uniform(-6, 6, size=2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    inv = np.linalg.inv(forward)  # PIL maps output pixels to input pixels
    c = np.array([_CANVAS / 2, _CANVAS / 2])
    offset = c - inv @ (c + np.array([tx, ty]))
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    img = img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)
    img = img.resize((size, size), Image.BOX)
    x = np.asarray(img, dtype=np.float32) / 255.0 + rng.normal(0.0, 0.06, (size, size))
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def _split_of(scripts: list[str], counts: dict[str, int]) -> dict[str, str]:
    """Scripts to splits: a fixed shuffle, filled to ~70 / 10 / 20 % of the classes."""
    order = sorted(scripts, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    total = sum(counts.values())
    out, seen = {}, 0
    for script in order:
        frac = seen / total
        out[script] = "train" if frac < 0.7 else "val" if frac < 0.8 else "test"
        seen += counts[script]
    return out


def _key(fonts: dict[str, Path], settings: dict[str, int]) -> str:
    h = hashlib.sha256(json.dumps([VERSION, settings], sort_keys=True).encode())
    for prefix, path in sorted(fonts.items()):
        h.update(f"{prefix}:{path.name}:{path.stat().st_size}".encode())
    return h.hexdigest()[:16]


def cache_dir(path: str = "") -> Path:
    """The cache folder: ``path``, else ``$RECIPES_CACHE``, else ``~/.cache/tmg-recipes``."""
    return Path(path or os.environ.get("RECIPES_CACHE") or Path.home() / ".cache" / "tmg-recipes")


def load_glyphs(
    cache: str = "",
    *,
    size: int = 28,
    instances: int = 20,
    max_per_script: int = 40,
    fonts: dict[str, Path] | None = None,
) -> GlyphSet:
    """The glyph set, from the cache or generated (and cached) now.

    Raises:
        FileNotFoundError: no usable font is installed (the message says which Debian
            package to install).
    """
    fonts = find_fonts() if fonts is None else fonts
    if not fonts:
        raise FileNotFoundError(
            f"glyphs: no fonts found in {', '.join(FONT_DIRS)}; install them with "
            "`apt-get install -y fonts-noto-core` (Debian/Ubuntu)"
        )
    settings = {"size": size, "instances": instances, "max_per_script": max_per_script}
    path = cache_dir(cache) / f"glyphs-{_key(fonts, settings)}.npz"
    if path.is_file():
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return GlyphSet(data["images"], meta["scripts"], meta["chars"], meta["split"])
    glyphs = _generate(fonts, size=size, instances=instances, max_per_script=max_per_script)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    meta = {"scripts": glyphs.scripts, "chars": glyphs.chars, "split": glyphs.split}
    np.savez(tmp, images=glyphs.images, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return glyphs


def _generate(
    fonts: dict[str, Path], *, size: int, instances: int, max_per_script: int
) -> GlyphSet:
    from PIL import ImageFont

    letters = _letters(list(fonts))
    masters: dict[str, list[tuple[str, np.ndarray]]] = {}
    for prefix, path in sorted(fonts.items()):
        chars = letters[prefix]
        if not chars:
            continue
        font = ImageFont.truetype(str(path), _FONT_PX)
        notdef = _notdef(font)
        kept, seen = [], set()
        step = max(1, len(chars) // (max_per_script * 2))  # spread over the script
        for ch in chars[::step]:
            m = _master(font, ch, notdef)
            if m is None or m.tobytes() in seen:
                continue
            seen.add(m.tobytes())
            kept.append((ch, m))
        if len(kept) >= 5:
            idx = np.linspace(0, len(kept) - 1, min(max_per_script, len(kept))).round()
            masters[prefix] = [kept[int(i)] for i in dict.fromkeys(idx.tolist())]
    split = _split_of(list(masters), {s: len(v) for s, v in masters.items()})
    scripts, chars, splits, images = [], [], [], []
    for script in sorted(masters):
        for ch, master in masters[script]:
            seed = int.from_bytes(hashlib.sha256(f"{script}:{ch}".encode()).digest()[:8], "big")
            rng = np.random.default_rng(seed)
            images.append(np.stack([_instance(master, rng, size) for _ in range(instances)]))
            scripts.append(script)
            chars.append(ch)
            splits.append(split[script])
    return GlyphSet(np.stack(images), scripts, chars, splits)


def _notdef(font: object) -> bytes:
    """How the font draws a character it lacks (a private-use code point)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (_CANVAS * 2, _CANVAS * 2), 0)
    ImageDraw.Draw(img).text((_CANVAS // 2, _CANVAS // 2), "\ue000", fill=255, font=font)
    return img.tobytes()
