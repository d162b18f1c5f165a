"""The device's default hold-out split: each image's side follows from its content and the device's
key alone, so one image added or removed moves no other image (DP-SGD's example-level epsilon then
protects an example of the device's data, not of one split of it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from colour_images import write_colour_folder

from edge_client.datasets import load_dataset
from edge_client.workspace import HOLDOUT_KEY_FILE, holdout_key, holdout_split


def sides(root: Path, key: bytes) -> dict[str, bool]:
    """Image file (relative to root) -> held out?"""
    images = load_dataset(root)
    _, held = holdout_split(images, 0.2, key)
    held_set = set(held.tolist())
    return {str(p.relative_to(root)): i in held_set for i, p in enumerate(images.paths)}


def test_adding_one_image_moves_no_other_image(tmp_path: Path) -> None:
    root = write_colour_folder(tmp_path / "data", per_class=63, size=8)  # 252 images
    key = holdout_key(tmp_path / "state")
    before = sides(root, key)
    extra = write_colour_folder(tmp_path / "extra", per_class=1, size=8, seed=99)
    (extra / "green" / "0.png").rename(root / "green" / "new.png")
    after = sides(root, key)
    assert set(after) == set(before) | {"green/new.png"}
    assert {name: after[name] for name in before} == before
    assert 0.1 < np.mean(list(before.values())) < 0.3  # about the asked-for fraction
    (root / "green" / "new.png").unlink()
    (root / "red" / "5.png").unlink()  # removing one moves none either
    removed = sides(root, key)
    assert removed == {name: side for name, side in before.items() if name != "red/5.png"}


def test_the_key_is_the_devices_own_and_kept(tmp_path: Path) -> None:
    root = write_colour_folder(tmp_path / "data", per_class=30, size=8)
    first = holdout_key(tmp_path / "a")
    assert holdout_key(tmp_path / "a") == first and len(first) == 32
    assert (tmp_path / "a" / HOLDOUT_KEY_FILE).stat().st_mode & 0o077 == 0
    other = holdout_key(tmp_path / "b")
    assert other != first
    assert sides(root, first) != sides(root, other)  # another device splits its data differently
