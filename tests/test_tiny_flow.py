"""The tiny flow-matching pipelines (SD3, FLUX.1) of lora_dpo.models.tiny_flow: saved, opened by diffusers' own loader,
sampled; the offline T5 tokenizer; deterministic weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)

from lora_dpo.models.tiny_flow import (
    build_t5_tokenizer,
    build_tiny_flow_components,
    build_tiny_flow_pipeline,
    save_tiny_flow_pipeline,
)

CLASSES = {
    "sd3": (StableDiffusion3Pipeline, dict(
        transformer=SD3Transformer2DModel, vae=AutoencoderKL, scheduler=FlowMatchEulerDiscreteScheduler,
        text_encoder=CLIPTextModelWithProjection, text_encoder_2=CLIPTextModelWithProjection,
        text_encoder_3=T5EncoderModel, tokenizer=CLIPTokenizer, tokenizer_2=CLIPTokenizer, tokenizer_3=T5TokenizerFast)),
    "flux": (FluxPipeline, dict(
        transformer=FluxTransformer2DModel, vae=AutoencoderKL, scheduler=FlowMatchEulerDiscreteScheduler,
        text_encoder=CLIPTextModel, text_encoder_2=T5EncoderModel, tokenizer=CLIPTokenizer,
        tokenizer_2=T5TokenizerFast)),
}
CASES = [("sd3", False), ("flux", False), ("flux", True)]


@pytest.fixture(scope="module", params=CASES, ids=["sd3", "flux-schnell", "flux-dev"])
def loaded(request, tmp_path_factory):
    family, guidance = request.param
    path = save_tiny_flow_pipeline(tmp_path_factory.mktemp("flow") / family, family, seed=0, guidance_embeds=guidance)
    return family, guidance, DiffusionPipeline.from_pretrained(path)


def _sample(pipe, seed: int) -> np.ndarray:
    return pipe("a photo of the digit 7", num_inference_steps=2, height=32, width=32, guidance_scale=3.5,
                output_type="np", generator=torch.Generator().manual_seed(seed)).images


def test_loads_back_with_the_family_classes(loaded):
    family, guidance, pipe = loaded
    pipeline_class, parts = CLASSES[family]
    assert type(pipe) is pipeline_class
    for name, cls in parts.items():
        assert isinstance(getattr(pipe, name), cls), name
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.shift_factor is not None and pipe.vae.config.scaling_factor != 0.18215
    if family == "flux":
        assert pipe.transformer.config.guidance_embeds is guidance
        assert pipe.transformer.config.in_channels == 16 * 4  # 2 x 2 packed latent patches


def test_samples_are_finite_and_reproducible(loaded):
    _, _, pipe = loaded
    pipe.set_progress_bar_config(disable=True)
    first, again = _sample(pipe, 0), _sample(pipe, 0)
    assert first.shape == (1, 32, 32, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)


def test_t5_tokenizer_round_trips_a_caption(tmp_path):
    tokenizer = build_t5_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    for tok in (tokenizer, T5TokenizerFast.from_pretrained(tmp_path)):
        ids = tok("a photo of the digit 7, zebra").input_ids
        assert ids[-1] == tok.eos_token_id == 1
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == "a photo of the digit 7, zebra"
        padded = tok("a cat", padding="max_length", max_length=8).input_ids
        assert padded[-1] == tok.pad_token_id == 0 and len(padded) == 8


def _weights(components: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, part in components.items() if isinstance(part, torch.nn.Module)
            for key, value in part.state_dict().items()}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_weights_depend_only_on_the_seed(family):
    first, same, other = (_weights(build_tiny_flow_components(family, seed)) for seed in (0, 0, 1))
    assert first.keys() == same.keys() == other.keys()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_unknown_family_and_sd3_guidance_are_refused():
    with pytest.raises(ValueError, match="family must be one of"):
        build_tiny_flow_pipeline("sd2")
    with pytest.raises(ValueError, match="guidance_embeds"):
        build_tiny_flow_pipeline("sd3", guidance_embeds=True)
