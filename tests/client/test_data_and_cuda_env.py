"""Synthetic data placement and the CUDA module-loading guard (CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from pipeweaver.client.cuda_env import (
    MODULE_LOADING,
    prefer_shape_generic_attention,
    warn_if_unprepared_for_dynamic_pipelines,
)
from pipeweaver.client.data import SyntheticData, stable_seed


def test_cpu_draws_match_a_plain_generator_per_key() -> None:
    data = SyntheticData(seed=3, iteration=7, dp_replica=1)
    got = data.image_patches(2, 0, 1, patches=5, patch_dim=4)
    g = torch.Generator().manual_seed(stable_seed(3, 7, 1, "image", 2, 0, 1))
    assert torch.equal(got, torch.randn(5, 4, generator=g))
    assert got.device.type == "cpu"


def test_every_kind_and_key_draws_its_own_values() -> None:
    data = SyntheticData(seed=0, iteration=0)
    a = data.video_latents(0, 0, 0, tokens=6, channels=3)
    b = data.diffusion_noise(0, 0, 0, tokens=6, channels=3)
    c = data.video_latents(0, 0, 1, tokens=6, channels=3)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, SyntheticData(seed=0, iteration=0).video_latents(0, 0, 0, tokens=6, channels=3))


def test_text_ids_are_one_draw_per_microbatch_and_a_longer_draw_extends_a_shorter() -> None:
    data = SyntheticData(seed=1, iteration=4)
    short, long = data.text_ids(2, 1000, 512), data.text_ids(2, 1300, 512)
    assert torch.equal(long[:1000], short)  # torch's padding appends a document: earlier ids stay
    assert not torch.equal(data.text_ids(3, 1000, 512), short)
    assert int(long.min()) >= 0 and int(long.max()) < 512


def test_packed_labels_are_next_tokens_inside_each_document() -> None:
    from pipeweaver import presets
    from pipeweaver.client.geometry import IGNORE_INDEX, LossScale, TextGeometry, geometry
    from pipeweaver.spec.batch import BatchMetadata, Document, MediaItem, Microbatch
    from pipeweaver.spec.model import Modality

    w = presets.tiny_vlm()
    image = MediaItem(Modality.IMAGE, 16, 4)
    docs = (Document(5), Document(0, (image,)), Document(3, (image,)), Document(1), Document(4))
    batch = BatchMetadata(iteration=0, microbatches=(Microbatch(docs),))
    g = geometry(w.model, batch, "llm", 0, (0,), SyntheticData(seed=0, iteration=0), LossScale.of(w.model, batch))
    assert isinstance(g, TextGeometry)
    ids, labels = g.token_ids, g.labels
    # Layout: per document its 4 merged image tokens (id 0, no label), then its text: text at 0-4, 13-15, 16,
    # 17-20; the two images' placeholders at 5-12.
    runs = ((0, 5), (13, 3), (16, 1), (17, 4))
    assert ids.shape[0] == labels.shape[0] == 21
    want = torch.full((21,), IGNORE_INDEX)
    for start, n in runs:
        want[start : start + n - 1] = ids[start + 1 : start + n]  # the document's last token predicts nothing
    assert torch.equal(labels, want)
    text_pos = [start + i for start, n in runs for i in range(n)]
    vocab = w.model.module("llm").vocab_size
    assert torch.equal(ids[text_pos], SyntheticData(seed=0, iteration=0).text_ids(0, 13, vocab))
    assert int(ids[5:13].abs().sum()) == 0


@pytest.mark.parametrize("lengths", [[3, 0, 2, 5], [1], [0], [], [4096], [1] * 700])
def test_positions_restart_at_every_document(lengths: list[int]) -> None:
    from pipeweaver.client.geometry import _positions

    want = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    assert torch.equal(_positions(lengths), want)


def test_unprepared_cuda_settings_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        monkeypatch.setenv(MODULE_LOADING, "EAGER")
        torch.backends.cuda.enable_cudnn_sdp(True)
        with pytest.warns(RuntimeWarning, match="cuDNN attention"):
            warn_if_unprepared_for_dynamic_pipelines()
        prefer_shape_generic_attention()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.delenv(MODULE_LOADING)
        with pytest.warns(RuntimeWarning, match="EAGER"):
            warn_if_unprepared_for_dynamic_pipelines()
        monkeypatch.setenv(MODULE_LOADING, "eager")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_unprepared_for_dynamic_pipelines()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


def test_require_eager_keeps_a_users_choice() -> None:
    code = (
        "import os; from pipeweaver.client.cuda_env import require_eager_module_loading as r; r(); "
        "print(os.environ['CUDA_MODULE_LOADING'])"
    )
    env = {k: v for k, v in os.environ.items() if k != MODULE_LOADING}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "EAGER"
    env[MODULE_LOADING] = "LAZY"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "LAZY"
