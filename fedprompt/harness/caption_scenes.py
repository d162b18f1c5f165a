"""Captioned scenes built from real Fashion-MNIST images, offline.

A scene puts one to four items on a 56x56 canvas, one per cell of a 2x2 grid, in a colour cast;
its caption is generated from the scene (what, how many, where, which cast) in one of several
caption styles (phrasings). The pretraining of the tiny captioner sees the TRAIN styles on public
images in the PRETRAIN casts; clients get unseen images, their own style and casts the pretraining
never saw; HELD_OUT styles are seen by nobody and only evaluated. What it can show: whether soft
prompts adapt a frozen captioner to a client's phrasing and to new casts, and what federation adds
for the shared part. What it cannot: open-vocabulary captioning of natural images (10 item words,
4 positions, 7 casts, a closed grammar).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_client.datasets import ImageSet
from fedprompt.harness.splits import apply_shift

CELL = 28
CANVAS = 2 * CELL
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # reading order of the grid cells
COUNTS = ("one", "two", "three", "four")
# cast word -> the domain shift of fedprompt.harness.splits that makes it
CASTS = {
    "grey": "clean",
    "red": "tint-red",
    "green": "tint-green",
    "blue": "tint-blue",
    "orange": "tint-orange",
    "yellow": "tint-yellow",
    "cyan": "tint-cyan",
}
PRETRAIN_CASTS = ("grey", "red", "green", "blue")
CLIENT_CASTS = ("orange", "yellow", "cyan")  # never seen by the pretraining


@dataclass(frozen=True)
class Scene:
    """Items (class names) by grid cell, in reading order, and the cast word."""

    items: tuple[tuple[int, str], ...]  # (cell index, item word)
    cast: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _listed(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else " ".join(parts[:-1]) + " and " + parts[-1]


def _style_where(scene: Scene) -> str:
    items = [f"{_article(w)} {w} at the {POSITIONS[c]}" for c, w in scene.items]
    return f"{_listed(items)} on a {scene.cast} background"


def _style_count(scene: Scene) -> str:
    items = [f"{_article(w)} {w} {POSITIONS[c]}" for c, w in scene.items]
    noun = "item" if len(scene.items) == 1 else "items"
    return f"{COUNTS[len(scene.items) - 1]} {noun} in {scene.cast} light {' '.join(items)}"


def _style_position_first(scene: Scene) -> str:
    items = [f"{POSITIONS[c]} {_article(w)} {w}" for c, w in scene.items]
    return f"{' then '.join(items)} all tinted {scene.cast}"


def _style_plain(scene: Scene) -> str:
    noun = "thing" if len(scene.items) == 1 else "things"
    items = [f"{_article(w)} {w}" for _, w in scene.items]
    return f"a {scene.cast} picture with {COUNTS[len(scene.items) - 1]} {noun} {_listed(items)}"


def _style_terse(scene: Scene) -> str:
    return " ".join([scene.cast, *(w for _, w in scene.items)])


def _style_corner(scene: Scene) -> str:
    items = [f"{_article(w)} {w} in the {POSITIONS[c]} corner" for c, w in scene.items]
    return f"there is {_listed(items)} and the light is {scene.cast}"


def _style_inventory(scene: Scene) -> str:
    items = [f"{w} {POSITIONS[c]}" for c, w in scene.items]
    return f"{scene.cast} scene of {COUNTS[len(scene.items) - 1]} {' '.join(items)}"


STYLES: dict[str, Callable[[Scene], str]] = {
    "where": _style_where,
    "count": _style_count,
    "position-first": _style_position_first,
    "plain": _style_plain,
    "terse": _style_terse,
    "corner": _style_corner,
    "inventory": _style_inventory,
}
TRAIN_STYLES = ("where", "count", "position-first", "plain", "terse")  # pretraining and clients
HELD_OUT_STYLES = ("corner", "inventory")  # no one trains on them: evaluation only


def caption(scene: Scene, style: str) -> str:
    return STYLES[style](scene)


def caption_words(item_words: Sequence[str]) -> list[str]:
    """Every word any style can write for these items (the tiny captioner's vocabulary), sorted."""
    words: set[str] = set()
    for style in STYLES.values():
        for cast in CASTS:
            for count in range(1, 5):
                for start in range(len(item_words)):
                    items = tuple((c, item_words[(start + c) % len(item_words)]) for c in range(count))
                    words.update(style(Scene(items, cast)).split())
    return sorted(words)


def item_word(class_name: str) -> str:
    """A class name as one word ('ankle boot' -> 'ankle-boot'), so every item is one token."""
    return class_name.replace(" ", "-")


def draw_scenes(
    images: ImageSet,
    count: int,
    casts: Sequence[str],
    rng: np.random.Generator,
    max_items: int = 4,
    classes: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[Scene]]:
    """`count` scenes: uint8 canvases [count, 56, 56, 3] and their scene descriptions. Items are
    drawn from `images` (only `classes` when given), cells and casts at random."""
    pool = np.arange(len(images)) if classes is None else np.flatnonzero(np.isin(images.labels, classes))
    canvases = np.zeros((count, CANVAS, CANVAS), dtype=np.uint8)
    scenes = []
    for index in range(count):
        cells = np.sort(rng.choice(4, size=rng.integers(1, max_items + 1), replace=False))
        picks = rng.choice(pool, size=len(cells), replace=False)
        items = []
        for cell, pick in zip(cells, picks, strict=True):
            row, col = divmod(int(cell), 2)
            canvases[index, row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = _gray(
                images, pick
            )
            items.append((int(cell), item_word(images.class_names[images.labels[pick]])))
        scenes.append(Scene(tuple(items), str(rng.choice(list(casts)))))
    coloured = np.empty((count, CANVAS, CANVAS, 3), dtype=np.uint8)
    for cast in set(s.cast for s in scenes):
        rows = np.array([s.cast == cast for s in scenes])
        coloured[rows] = apply_shift(CASTS[cast], canvases[rows], rng)
    return coloured, scenes


def _gray(images: ImageSet, index: int) -> np.ndarray:
    if images.pixels is not None and images.pixels.ndim == 3:
        return images.pixels[index]
    return np.asarray(images.rgb(int(index)).convert("L"))


def write_scenes(folder: Path, canvases: np.ndarray, captions: Sequence[str]) -> list[Path]:
    """PNG files plus captions.txt ('file<TAB>caption' per line): what a captioning client reads."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, canvas in enumerate(canvases):
        path = folder / f"scene-{index:05d}.png"
        Image.fromarray(canvas).save(path)
        paths.append(path)
    lines = [f"{p.name}\t{c}" for p, c in zip(paths, captions, strict=True)]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    return paths
