"""Image features: the preprocessing matches open_clip's, and the on-disk cache hits, misses and
rebuilds a corrupt file instead of crashing or trusting it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from colour_images import write_colour_folder
from PIL import Image

from edge_client.bundle import Bundle
from edge_client.datasets import load_dataset
from edge_client.features import FeatureCache, encoder_key, image_features
from edge_client.preprocess import ImagePreprocessor


@pytest.mark.parametrize("size", [(32, 32), (50, 37), (37, 90)])
def test_preprocessing_matches_open_clip_eval_transform(tiny_bundle: Path, size: tuple[int, int]) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    settings = Bundle.open(tiny_bundle).preprocess
    pixels = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    config = PreprocessCfg(size=settings["crop"], mean=tuple(settings["mean"]), std=tuple(settings["std"]))
    expected = image_transform_v2(config, is_train=False)(image).numpy()
    np.testing.assert_allclose(ImagePreprocessor(settings)(image), expected, atol=1e-5)


def test_cache_misses_then_hits_and_follows_content_not_names(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    images = load_dataset(write_colour_folder(tmp_path / "data", per_class=3))
    cache = tmp_path / "cache"
    first, stats = image_features(images, bundle, cache, progress=False)
    assert (stats.hits, stats.computed, stats.rebuilt) == (0, 12, False)
    assert first.shape == (12, bundle.embed_dim) and first.dtype == np.float32
    second, stats = image_features(images, bundle, cache, progress=False)
    assert (stats.hits, stats.computed) == (12, 0)
    np.testing.assert_array_equal(first, second)
    # the encoder really ran on these pixels
    session = bundle.image_session(providers=["cpu"])
    pixels = ImagePreprocessor(bundle.preprocess)(images.rgb(5))[None]
    np.testing.assert_allclose(first[5], session.run(None, {"images": pixels})[0][0], rtol=1e-5, atol=1e-6)
    # an edited image misses; a renamed copy of an unchanged one hits
    Image.new("RGB", (32, 32), (9, 9, 9)).save(images.paths[0])
    images.paths[1].rename(images.paths[1].with_name("renamed.png"))
    changed = load_dataset(tmp_path / "data")
    _, stats = image_features(changed, bundle, cache, progress=False)
    assert (stats.hits, stats.computed) == (11, 1)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_a_corrupt_cache_is_rebuilt(tiny_bundle: Path, tmp_path: Path, damage: str) -> None:
    bundle = Bundle.open(tiny_bundle)
    images = load_dataset(write_colour_folder(tmp_path / "data", per_class=2))
    cache_dir = tmp_path / "cache"
    reference, _ = image_features(images, bundle, cache_dir, progress=False)
    path = FeatureCache(cache_dir, encoder_key(bundle, "fp32")).path
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        data[data.find(reference[1].tobytes()) + 2] ^= 0xFF  # one stored feature value
    else:
        data = bytearray(b"not a cache at all")
    path.write_bytes(bytes(data))
    rebuilt, stats = image_features(images, bundle, cache_dir, progress=False)
    assert stats.rebuilt and stats.computed == len(images)
    np.testing.assert_array_equal(rebuilt, reference)
    _, stats = image_features(images, bundle, cache_dir, progress=False)
    assert not stats.rebuilt and stats.hits == len(images)
