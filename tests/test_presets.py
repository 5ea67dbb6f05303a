"""Preset modules and workloads: the paper's parameter counts and token geometry."""

from __future__ import annotations

import re

import pytest

from pipeweaver import presets
from pipeweaver.spec import ImageGeometry, Modality, VideoGeometry, Workload


def nominal_params(name: str) -> float:
    """The parameter count a module's name promises: 'Qwen2 72B' -> 72e9."""
    match = re.search(r"(\d+)B$", name)
    assert match, name
    return float(match.group(1)) * 1e9


def test_the_seven_paper_modules_are_named() -> None:
    assert list(presets.named_modules()) == [
        "ViT 5B",
        "ViT 22B",
        "Llama3 8B",
        "Qwen2 32B",
        "Qwen2 72B",
        "DiT 5B",
        "DiT 30B",
    ]


@pytest.mark.parametrize("name", list(presets.named_modules()))
def test_parameter_count_matches_the_name_within_5_percent(name: str) -> None:
    module = presets.named_modules()[name]
    assert module.display_name == name
    assert module.total_params() == pytest.approx(nominal_params(name), rel=0.05)


def test_image_geometry_is_728px_at_patch_14() -> None:
    g = ImageGeometry()
    assert (g.image_px, g.patch_px, g.merge) == (728, 14, 4)
    assert g.patches_per_image == 2704
    assert g.tokens_per_image == 169
    assert 8192 // g.tokens_per_image == 48


def test_video_geometry_is_4608_tokens_a_second() -> None:
    g = VideoGeometry()
    assert g.tokens_per_second == 4608
    assert g.tokens_for(16) == 73728
    assert g.tokens_for(0.01) == g.tokens_per_latent_frame  # at least one latent frame


def test_tiny_geometry_is_small() -> None:
    assert presets.TINY_IMAGE.patches_per_image == 16 and presets.TINY_IMAGE.tokens_per_image == 4
    assert presets.TINY_VIDEO.tokens_per_second == 32


def test_the_eight_presets() -> None:
    assert list(presets.WORKLOADS) == [
        "vlm-s",
        "vlm-m",
        "vlm-l",
        "t2v-s",
        "t2v-l",
        "motivation-37b",
        "tiny-vlm",
        "tiny-t2v",
    ]


@pytest.mark.parametrize("name", list(presets.WORKLOADS))
def test_every_preset_constructs(name: str) -> None:
    w = presets.workload(name)
    assert isinstance(w, Workload) and w.name == name
    w.parallel.check_model(w.model)
    inputs = {m.input for m in w.model.modules}
    assert Modality.TEXT in inputs and inputs & {Modality.IMAGE, Modality.VIDEO}


@pytest.mark.parametrize(
    ("name", "gpus", "billions"),
    [("vlm-s", 16, 13), ("vlm-m", 32, 38), ("vlm-l", 64, 95), ("t2v-s", 16, 12.5), ("t2v-l", 64, 61)],
)
def test_table_3_setups(name: str, gpus: int, billions: float) -> None:
    w = presets.workload(name)
    assert w.parallel.gpus == gpus
    assert w.model.total_params() == pytest.approx(billions * 1e9, rel=0.05)


def test_unknown_workload_lists_the_choices() -> None:
    with pytest.raises(KeyError, match="vlm-s"):
        presets.workload("nope")
