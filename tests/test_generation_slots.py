"""Hotswap where it applies: in place for the same layers, a fresh load for any other adapter."""

from __future__ import annotations

from pipelines.generation import AdapterChoice, StudioPipeline
from pipelines.package import AdapterPackage


def test_hotswap_is_used_only_when_the_new_adapter_covers_the_same_layers(cat_package, coffee_package):
    cat, coffee = AdapterPackage.open(cat_package), AdapterPackage.open(coffee_package)
    warm = StudioPipeline("tiny-sdxl", hotswap_rank=8)
    for package, part in ((cat, "content"), (coffee, "content"), (cat, "full"), (coffee, "content")):
        warm.generate("A [c]", content=AdapterChoice(package, part), steps=2)
    # content -> content swaps in place; content -> full (both blocks) and back cannot, and load afresh.
    assert warm.hotswaps == 1
    assert warm.adapter_loads == 4 and warm.base_loads == 1
