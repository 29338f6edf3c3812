"""Only safetensors are read: pickle weights are refused with an explanation, for adapters and for base models."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo.config import ModelConfig
from lora_dpo.inference.sampling import load_pipeline
from lora_dpo.models.loading import ModelLoadError, load_components
from lora_dpo.models.lora_files import UnsafeFileError, read_lora_file, resolve_lora_file


def test_pickled_adapters_are_refused(lora_sd15, tmp_path):
    tensors = load_file(lora_sd15 / "pytorch_lora_weights.safetensors")
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(tensors, folder / "pytorch_lora_weights.bin")
    for path in (folder, folder / "pytorch_lora_weights.bin"):
        with pytest.raises(UnsafeFileError, match="arbitrary code"):
            resolve_lora_file(path)
    disguised = tmp_path / "disguised.safetensors"  # a pickle under a safetensors name is read by content
    torch.save(tensors, disguised)
    with pytest.raises(UnsafeFileError, match="save_file"):
        read_lora_file(disguised)
    state, metadata = read_lora_file(lora_sd15)
    assert state.keys() == tensors.keys() and "lora_adapter_metadata" in metadata
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_lora_file(tmp_path / "missing")


def test_pickled_base_model_is_refused(tiny_sd15, tmp_path):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_sd15, model)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    shutil.rmtree(model / "unet")
    unet.save_pretrained(model / "unet", safe_serialization=False)  # diffusion_pytorch_model.bin
    assert (model / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ModelLoadError, match="never reads pickle"):
        load_components(ModelConfig(pretrained_model_name_or_path=str(model)), torch.float32)
    with pytest.raises(ModelLoadError, match="never reads pickle"):
        load_pipeline(model)
