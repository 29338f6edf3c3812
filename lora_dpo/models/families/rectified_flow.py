"""What the rectified-flow transformer families (SD3 / SD3.5, FLUX.1) share: a transformer denoiser trained on the
velocity ``v = ε − x_0`` at a σ drawn from a density (:mod:`.flow_matching`), a 16-channel VAE with a shift factor,
CLIP and T5 text encoders, and LoRA files under the ``transformer.`` prefix. :mod:`.sd3` and :mod:`.flux` subclass
:class:`RectifiedFlowFamily` and fill in their text conditioning, token layout and architectures.

Flow-DPO (Wallace et al. 2023, arXiv 2311.12908, Eq. 14, on the rectified-flow objective of Esser et al. 2024,
arXiv 2403.03206, Eq. 1): one σ and one ε per pair, shared by both images, ``x_σ = (1 − σ)·x_0 + σ·ε``, and the
per-sample error ``e = mean((v_θ − (ε − x_0))²)`` in fp32. The training loop is the UNet families' one: this module
only answers the :class:`~lora_dpo.models.families.base.ModelFamily` questions.

Timesteps travel through the loop as ``σ·T`` floats (T = the scheduler's ``num_train_timesteps``, 1000), the unit
the transformers take (``SD3Transformer2DModel``: ``timestep = σ·1000``; FLUX is called with ``σ``, see
:mod:`.flux`), so the timestep-bucket margins and the diagnostics read σ·1000 where they read t for a UNet.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import AutoTokenizer

from lora_dpo.errors import ConfigError, ModelLoadError
from lora_dpo.models.families.base import Components, ModelFamily
from lora_dpo.models.families.flow_matching import (
    flow_noised,
    flow_velocity,
    image_seq_len,
    sample_density,
    scheduler_shift,
)
from lora_dpo.models.pretrained import DTYPES, safetensors_only
from lora_dpo.models.quantize import check_quantization, quantize_linear_layers
from lora_dpo.models.tiny_flow import build_tiny_flow_components

# The σ density of a run when the recipe names none: SD3's (Esser et al. 2024, Eq. 19, m = 0, s = 1), the default of
# diffusers' SD3 and FLUX training scripts.
DEFAULT_SIGMA_SAMPLING = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)


def sigma_sampling(model_cfg) -> dict[str, Any]:
    """The σ density settings of a recipe's ``model`` section (:data:`DEFAULT_SIGMA_SAMPLING` where unset):
    ``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale`` (diffusers' training-script names)."""
    settings = dict(DEFAULT_SIGMA_SAMPLING)
    for key in settings:
        value = getattr(model_cfg, key, None)
        if value is not None:
            settings[key] = value
    return settings


class RectifiedFlowFamily(ModelFamily):
    """A transformer on the rectified-flow objective with a 16-channel VAE (``z = (x − shift)·scale``)."""

    denoiser_name = "transformer"
    text_parts: ClassVar[tuple[tuple[str, str, type], ...]]
    """``(tokenizer, text encoder, encoder class)`` component names of the pipeline, in its order."""
    max_sequence_length: ClassVar[int]
    """T5 tokens per caption, the pipeline's default (SD3 256, FLUX 512)."""
    t5_tokenizer_name: ClassVar[str]
    """The pipeline component holding T5's tokenizer (SD3 ``tokenizer_3``, FLUX ``tokenizer_2``)."""
    patch_size: ClassVar[int] = 2
    """Latent pixels per token side (both pack 2 x 2 patches)."""

    def matches_layout(self, model_index: dict) -> bool:
        return "transformer" in model_index and self._layout(model_index)

    def sequence_length(self, t5_tokenizer) -> int:
        """T5 tokens per caption: the pipeline's default :attr:`max_sequence_length`, or fewer where the pipeline's
        own T5 tokenizer says its model takes fewer (``model_max_length`` in ``tokenizer_config.json``; the
        digits-sd3 world's is 32). The transformer attends to every one of these tokens, padding included, so
        training and sampling must use the same count: :meth:`encode_prompts` and :meth:`sampling_kwargs` both
        take it from here. ``t5_tokenizer`` None (a pipeline without T5): the default."""
        limit = getattr(t5_tokenizer, "model_max_length", None)
        return min(self.max_sequence_length, int(limit)) if limit else self.max_sequence_length

    def usage_kwargs(self, components: Components, model_cfg) -> dict[str, Any]:
        """``{"max_sequence_length": n}`` where the model's T5 length differs from its pipeline's default (a plain
        ``pipe(prompt)`` would sample on another length than the model trained on); else none. The T5 tokenizer is
        the loaded one, or (a run from the latent cache loads none) read from ``model_cfg``'s model."""
        names = [tokenizer_name for tokenizer_name, _, _ in self.text_parts]
        tokenizer = dict(zip(names, components.tokenizers)).get(self.t5_tokenizer_name)
        if tokenizer is None and self.t5_tokenizer_name in components.model_index:
            tokenizer = AutoTokenizer.from_pretrained(model_cfg.pretrained_model_name_or_path,
                                                      subfolder=self.t5_tokenizer_name, revision=model_cfg.revision)
        n = self.sequence_length(tokenizer)
        return {"max_sequence_length": n} if n != self.max_sequence_length else {}

    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        """``{"max_sequence_length": n}``: the T5 length :meth:`sequence_length` gives for the pipeline's T5
        tokenizer, which the diffusers pipelines otherwise set to their default whatever the model was trained on."""
        return {"max_sequence_length": self.sequence_length(getattr(pipe, self.t5_tokenizer_name, None))}

    @abstractmethod
    def _layout(self, model_index: dict) -> bool:
        """The text-encoder layout that tells this family from the other transformer family."""

    # -- loading ----------------------------------------------------------------------------------------------

    def load_components(self, model_cfg, model_index: dict[str, Any], weight_dtype: torch.dtype,
                        device: torch.device | str, unet_dtype: torch.dtype | None, encoders: bool,
                        unet: bool) -> Components:
        """The transformer (quantized in place with ``model.quantization``: :mod:`lora_dpo.models.quantize`), VAE,
        tokenizers and text encoders, and the flow scheduler; all frozen. ``prediction_type`` is ``flow``."""
        name = model_cfg.pretrained_model_name_or_path
        kw = dict(revision=model_cfg.revision)
        wkw = dict(kw, variant=model_cfg.variant, use_safetensors=True)
        if getattr(model_cfg, "prediction_type", None) is not None:
            raise ModelLoadError(f"model.prediction_type applies to the UNet families; {self.label} predicts the flow "
                                 "velocity: remove it")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler", **kw)
        vae_dtype = self.vae_dtype(weight_dtype) if model_cfg.vae_dtype == "auto" else DTYPES[model_cfg.vae_dtype]
        quantization = getattr(model_cfg, "quantization", None)
        with safetensors_only(name):
            denoiser = None
            if unet:
                denoiser = self.denoiser_class.from_pretrained(name, subfolder=self.denoiser_name,
                                                               torch_dtype=unet_dtype or weight_dtype, **wkw)
                if quantization:
                    quantize_linear_layers(denoiser, quantization, compute_dtype=weight_dtype)
            vae, tokenizers, text_encoders, vae_config = None, [], [], None
            if encoders:
                vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=vae_dtype, **wkw)
                vae_config = dict(vae.config)
                for tokenizer_name, encoder_name, encoder_class in self.text_parts:
                    tokenizers.append(AutoTokenizer.from_pretrained(name, subfolder=tokenizer_name, **kw))
                    text_encoders.append(encoder_class.from_pretrained(name, subfolder=encoder_name,
                                                                       torch_dtype=weight_dtype, **wkw))
            else:
                vae_config = AutoencoderKL.load_config(name, subfolder="vae", **kw)
        for module in (denoiser, vae, *text_encoders):
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        components = Components(self.name, denoiser, vae, text_encoders, tokenizers, scheduler, "flow", model_index,
                                float(vae_config.get("scaling_factor", 1.0)))
        components.options.update(sigma_sampling(model_cfg), shift_factor=float(vae_config.get("shift_factor") or 0.0),
                                  guidance=getattr(model_cfg, "guidance_scale", None))
        return components

    def draw_key(self, model_cfg) -> dict[str, Any]:
        """``{"sigma_sampling": ...}``: the σ density with its defaults resolved (:func:`sigma_sampling`)."""
        return {"sigma_sampling": sigma_sampling(model_cfg)}

    def check_recipe(self, cfg) -> None:
        """Flow families take the σ density and quantization options and refuse what only a UNet has.

        Raises:
            ConfigError: ``model.prediction_type`` (the target is the velocity); ``model.quantization`` in full mode;
                a ``data.resolution`` whose latent the transformer cannot cut into patches (real models: a multiple
                of 16).
        """
        if cfg.model.prediction_type is not None:
            raise ConfigError(f"model.prediction_type={cfg.model.prediction_type} applies to the UNet families; "
                              f"{self.label} is trained on the flow velocity: remove it")
        if cfg.model.quantization and cfg.train.mode == "full":
            raise ConfigError(f"model.quantization={cfg.model.quantization} freezes the base in 4/8 bits, which full "
                              "fine-tuning trains: use train.mode=lora, or remove model.quantization")
        if cfg.model.quantization:  # bitsandbytes present and usable, before any weights load
            check_quantization(cfg.model.quantization)
        vae = AutoencoderKL.load_config(cfg.model.pretrained_model_name_or_path, subfolder="vae",
                                        revision=cfg.model.revision)
        step = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1) * self.patch_size
        if cfg.data.resolution % step:
            raise ConfigError(f"data.resolution={cfg.data.resolution} must be a multiple of {step} for {self.label} (the "
                              f"VAE downsamples by {step // self.patch_size}, the transformer takes {self.patch_size} x "
                              f"{self.patch_size} patches); try data.resolution={max(step, round(cfg.data.resolution / step) * step)}")

    # -- the training step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_posterior(self, components: Components, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean − shift_factor, std)``, each ``(N, 16, H/f, W/f)``: the sample times the scaling factor is the
        transformer's latent ``(x − shift)·scale``, as the pipelines decode it (``z / scale + shift``)."""
        mean, std = super().encode_posterior(components, pixel_values)
        return mean - components.options.get("shift_factor", 0.0), std

    def sample_timesteps(self, components: Components, generator: torch.Generator, n: int,
                         latent_shape: Sequence[int]) -> torch.Tensor:
        """``σ·T`` (float32, ``(n,)``): σ from the recipe's density (``model.weighting_scheme``, default
        logit-normal), shifted as the scheduler shifts its sampling schedule (SD3: static ``shift``; FLUX: by the
        image's token count), T = ``num_train_timesteps``."""
        opts = {**DEFAULT_SIGMA_SAMPLING, **components.options}
        u = sample_density(opts["weighting_scheme"], n, generator, logit_mean=opts["logit_mean"],
                           logit_std=opts["logit_std"], mode_scale=opts["mode_scale"])
        config = components.noise_scheduler.config
        sigmas = scheduler_shift(u, config, image_seq_len(latent_shape, self.patch_size))
        return sigmas * config.num_train_timesteps

    @staticmethod
    def sigmas(components: Components, timesteps: torch.Tensor) -> torch.Tensor:
        """σ of ``σ·T`` timesteps."""
        return timesteps.float() / components.noise_scheduler.config.num_train_timesteps

    def add_noise(self, components, latents, noise, timesteps):
        return flow_noised(latents, noise, self.sigmas(components, timesteps))

    def training_target(self, components, latents, noise, timesteps):
        return flow_velocity(latents, noise)

    # -- LoRA files -------------------------------------------------------------------------------------------

    def save_lora_weights(self, save_dir: str | Path, layers: dict[str, torch.Tensor], metadata: dict,
                          weight_name: str) -> None:
        self.pipeline_class.save_lora_weights(
            save_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata,
            weight_name=weight_name, safe_serialization=True,
        )

    # -- random weights ---------------------------------------------------------------------------------------

    def build_tiny_components(self, seed: int = 0) -> dict[str, Any]:
        return build_tiny_flow_components(self.name, seed, **self.tiny_options)

    tiny_options: ClassVar[dict] = {}
    """Keyword arguments of :func:`lora_dpo.models.tiny_flow.build_tiny_flow_components` (FLUX: guidance)."""

    def build_random_components(self, tiny: bool, weight_dtype: torch.dtype, device: torch.device | str,
                                unet_dtype: torch.dtype | None, seed: int) -> Components:
        """:meth:`ModelFamily.build_random_components` with the default σ density and the VAE's shift factor."""
        components = super().build_random_components(tiny, weight_dtype, device, unet_dtype, seed)
        components.options.update(DEFAULT_SIGMA_SAMPLING, shift_factor=float(components.vae.config.shift_factor or 0.0))
        return components

    def text_component_names(self) -> list[tuple[str, str]]:
        return [(tokenizer, encoder) for tokenizer, encoder, _ in self.text_parts]
