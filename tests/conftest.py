"""Shared fixtures: tiny SD1.5/SDXL/SD3/FLUX pipelines saved with save_pretrained, small preference data sets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lora_dpo.models.archs import save_tiny_pipeline
from lora_dpo.world.demo import build_photo_pairs


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd15", "sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", "sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """FLUX.1-dev's layout (guidance-distilled: the transformer takes the guidance scale)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", "flux", seed=0)


@pytest.fixture(scope="session")
def tiny_flow(tiny_sd3, tiny_flux) -> dict[str, Path]:
    """The tiny flow-matching pipelines by family name."""
    return {"sd3": tiny_sd3, "flux": tiny_flux}


def save_random_lora(out: Path, model: Path, family: str, r: int = 4, lora_alpha: float = 2.0, std: float = 0.2,
                     seed: int = 0, target_modules: list[str] | None = None) -> Path:
    """A LoRA for the tiny ``model`` with seeded random A and B (it changes the outputs clearly; alpha != r, so a
    loader that drops alpha is caught), saved as ``out/pytorch_lora_weights.safetensors`` by the kit's exporter."""
    import torch
    from diffusers import UNet2DConditionModel

    from lora_dpo.config import LoraConfig
    from lora_dpo.export.artifacts import save_lora_adapter
    from lora_dpo.models.adapters import add_lora

    unet = UNet2DConditionModel.from_pretrained(Path(model) / "unet")
    lora = LoraConfig(r=r, lora_alpha=lora_alpha, **({"target_modules": target_modules} if target_modules else {}))
    g = torch.Generator().manual_seed(seed)
    for p in add_lora(unet, lora):
        p.data = torch.randn(p.shape, generator=g) * std
    save_lora_adapter(out, unet, family)
    return Path(out)


@pytest.fixture(scope="session")
def lora_sd15(tiny_sd15, tmp_path_factory) -> Path:
    return save_random_lora(tmp_path_factory.mktemp("loras") / "sd15", tiny_sd15, "sd15")


@pytest.fixture(scope="session")
def lora_sdxl(tiny_sdxl, tmp_path_factory) -> Path:
    return save_random_lora(tmp_path_factory.mktemp("loras") / "sdxl", tiny_sdxl, "sdxl")


@pytest.fixture(scope="session")
def photo_pairs(tmp_path_factory) -> Path:
    """Real-photo pairs (Pick-a-Pic schema), 3 per photograph, 48 px, about 10% ties."""
    return build_photo_pairs(tmp_path_factory.mktemp("data") / "pairs.parquet", pairs_per_photo=3, size=48)


def _jpeg(arr: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode=None).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def messy_pairs(tmp_path_factory) -> tuple[Path, dict]:
    """16 good pairs plus 3 ties, 2 undecodable, 1 truncated JPEG, and grayscale / RGBA / odd-sized images.

    Returns the parquet path and the expected counts.
    """
    rng = np.random.default_rng(0)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}

    def add(caption, a, b, label):
        rows["caption"].append(caption)
        rows["jpg_0"].append(a)
        rows["jpg_1"].append(b)
        rows["label_0"].append(label)

    def img(h=40, w=40):
        return rng.integers(0, 255, (h, w, 3))

    for i in range(16):
        add(f"good pair {i}", _jpeg(img()), _jpeg(img()), float(i % 2))
    for i in range(3):
        add(f"tie {i}", _jpeg(img()), _jpeg(img()), 0.5)
    add("garbage 0", b"not an image at all", _jpeg(img()), 1.0)
    add("garbage 1", _jpeg(img()), b"\x00" * 64, 0.0)
    full = _jpeg(img(64, 64))
    add("truncated", full[: len(full) // 3], _jpeg(img()), 1.0)
    add("gray", _jpeg(img(), "L"), _jpeg(img()), 1.0)
    add("rgba", _jpeg(img(), "RGBA", "PNG"), _jpeg(img()), 0.0)
    add("odd size", _jpeg(img(37, 53)), _jpeg(img(29, 61)), 1.0)
    path = tmp_path_factory.mktemp("data") / "messy.parquet"
    pq.write_table(pa.table(rows), path)
    expected = {"rows": 25, "ties": 3, "undecodable_at_load": 2, "truncated": 1, "good": 19}
    (path.parent / "expected.json").write_text(json.dumps(expected))
    return path, expected


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine run faster and steadier on one thread (two threads contend badly
    with any other busy process, e.g. the 2-process test)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """accelerate keeps process-wide state; tests build several Accelerators in one process."""
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
