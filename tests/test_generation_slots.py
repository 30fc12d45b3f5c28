"""The warm pipeline's adapter slots: swapping packages replaces adapters, never the base model."""

from __future__ import annotations

import numpy as np

from pipelines.generation import AdapterChoice, StudioPipeline
from pipelines.package import AdapterPackage


def _generate(studio: StudioPipeline, content, style) -> np.ndarray:
    image = studio.generate(
        None,
        content=AdapterChoice(content, "content") if content else None,
        style=AdapterChoice(style, "style") if style else None,
        steps=2,
    )[0]
    return np.asarray(image, dtype=np.int16)


def test_swapping_packages_keeps_the_base_model_loaded(tiny_packages):
    cat, coffee = (AdapterPackage.open(tiny_packages[n]) for n in ("cat", "coffee"))
    studio = StudioPipeline("tiny-sdxl")
    first = _generate(studio, cat, coffee)
    swapped = _generate(studio, coffee, cat)
    _generate(studio, cat, None)
    _generate(studio, None, coffee)
    assert studio.base_loads == 1
    assert studio.adapter_loads == 6
    assert np.abs(first - swapped).max() > 0


def test_hotswap_gives_the_image_of_a_fresh_load(tiny_packages):
    cat, coffee = (AdapterPackage.open(tiny_packages[n]) for n in ("cat", "coffee"))
    hot = StudioPipeline("tiny-sdxl", hotswap_rank=16)
    _generate(hot, cat, coffee)
    swapped = _generate(hot, coffee, cat)
    fresh = _generate(StudioPipeline("tiny-sdxl"), coffee, cat)
    assert hot.base_loads == 1
    assert hot.hotswaps == 2
    np.testing.assert_array_equal(swapped, fresh)
