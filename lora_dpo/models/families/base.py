"""The model-family protocol: everything the kit needs to know about one kind of diffusers pipeline.

A family (SD1.x/2.x, SDXL, ...) is one module of :mod:`lora_dpo.models.families` with one :class:`ModelFamily`
subclass, registered by one line of the package's ``__init__``. The rest of the kit asks the family and never
compares family names. :class:`Components` (what training loads) names its family by a string, which caches and
reports store; :attr:`Components.model_family` reaches the object.

Each member's docstring says what SD1.5/SDXL do and how a transformer denoiser with flow-matching targets (SD3:
Esser et al. 2024, arXiv 2403.03206; FLUX.1) would implement it. Those families take: latents packed into patch
tokens inside :meth:`ModelFamily.predict` only (noising, targets and errors stay in the VAE's ``(N, C, h, w)``
layout), several text encoders (two CLIPs plus T5), and a density over σ in [0, 1] instead of a uniform integer t.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lora_dpo.errors import ConfigError

# name -> family, in registration order; filled by lora_dpo/models/families/__init__.py (register).
_REGISTRY: dict[str, ModelFamily] = {}


def register(*families: ModelFamily) -> dict[str, ModelFamily]:
    """Add families to the registry (names must be new); returns the registry, ``{name: family}``."""
    for family in families:
        if family.name in _REGISTRY:
            raise ValueError(f"a model family named {family.name!r} is already registered")
        _REGISTRY[family.name] = family
    return _REGISTRY


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name``.

    Raises:
        ValueError: no such family (the message lists the registered names).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"family must be one of {tuple(_REGISTRY)}, not {name!r}") from None


@dataclass
class Components:
    """The frozen pipeline parts plus the denoiser that gets trained.

    ``family`` is the registry name (stored in caches and reports); :attr:`model_family` is the family object.
    ``text_encoders``/``tokenizers`` hold one entry per text encoder, in the pipeline's order (SD1.5: CLIP ViT-L;
    SDXL: CLIP ViT-L, then OpenCLIP bigG with projection). ``noise_scheduler`` is the training schedule (a
    ``DDPMScheduler`` for SD1.5/SDXL) built from the pipeline's scheduler config.
    """

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    prediction_type: str
    model_index: dict[str, Any] = field(default_factory=dict)
    scaling_factor: float | None = None  # the VAE's, when the VAE itself is not loaded (training from a cache)
    # Family settings from the recipe: the flow families' σ density (weighting_scheme, logit_mean, logit_std,
    # mode_scale), the VAE's shift_factor, FLUX's guidance scale. Empty for the UNet families.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def model_family(self) -> ModelFamily:
        """The :class:`ModelFamily` registered as ``family``."""
        return get_family(self.family)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else float(self.scaling_factor)


class ModelFamily(ABC):
    """One kind of diffusers text-to-image pipeline: how to recognise, load, condition, noise and export it."""

    name: ClassVar[str]
    """Registry key, e.g. ``sd15``: :attr:`Components.family`, the cache manifest's and the reports' ``family``."""
    label: ClassVar[str]
    """Human name for messages, e.g. ``SD1.x/2.x``."""
    pipeline_class: ClassVar[type]
    """The diffusers pipeline class: ``from_pretrained``, ``save_lora_weights``, ``load_lora_weights``,
    ``lora_state_dict``. SD3: ``StableDiffusion3Pipeline``; FLUX: ``FluxPipeline``."""
    pipeline_class_names: ClassVar[frozenset[str]]
    """``model_index.json`` ``_class_name`` values that are this family (text-to-image, img2img, inpaint)."""
    denoiser_name: ClassVar[str]
    """The denoiser's subfolder in the pipeline and the prefix of its LoRA keys: ``unet`` (SD3/FLUX:
    ``transformer``)."""
    denoiser_class: ClassVar[type]
    """The denoiser's diffusers class: ``UNet2DConditionModel``; SD3: ``SD3Transformer2DModel``; FLUX:
    ``FluxTransformer2DModel``."""
    default_target_modules: ClassVar[tuple[str, ...]]
    """PEFT ``target_modules`` of a LoRA on the denoiser's attention (the recipe default). SD3/FLUX add the joint
    attention's context projections (``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``)."""
    kohya_spec: ClassVar[tuple[str, str]]
    """``(ss_base_model_version, modelspec.architecture)`` of a kohya LoRA file's header. FLUX: ``("flux1",
    "flux-1-dev/lora")``."""
    model_card_tags: ClassVar[tuple[str, ...]]
    """Hugging Face tags naming the base, e.g. ``("stable-diffusion",)``; FLUX: ``("flux",)``."""
    tiny_arch: ClassVar[str]
    """The name of its tiny random-weight test pipeline in :data:`lora_dpo.models.archs.ARCHES`."""
    recipe_folder: ClassVar[str | None] = None
    """The ``recipes/`` folder whose recipes are written for this family (None: :attr:`name`; SD3: ``sd35``)."""
    cudnn_attention: ClassVar[bool] = True
    """Whether training may use cuDNN's fused attention (PyTorch's ``SDPBackend.CUDNN_ATTENTION``). FLUX: False,
    its backward fails for FLUX.1's 24 x 128 heads (measured on an H200, torch 2.x: ``mha_graph.execute ...
    is_good()``; first a CUDA illegal memory access), so its runs use the flash / memory-efficient kernels."""
    lora_exclude_modules: ClassVar[str | None] = None
    """PEFT ``exclude_modules`` (a regex matched against the whole module path) of every LoRA on the denoiser: FLUX
    leaves out its final ``proj_out``, whose name the single blocks' ``proj_out`` target also matches."""
    flow_options: ClassVar[tuple[str, ...]] = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                                                "quantization", "guidance_scale")
    """``model`` keys that only the flow-matching families read."""

    lora_key_markers: ClassVar[tuple[tuple[str, str], ...]] = ()
    """``(regular expression, reason)`` pairs: LoRA module paths (keys without their LoRA part and outer prefixes)
    that only this family's adapters have, in any layout (diffusers, kohya, BFL), searched by
    :meth:`adapter_signature`. The UNet families have none (the shape check tells SD1.x from SDXL)."""

    def adapter_signature(self, paths: set[str]) -> str | None:
        """Why an adapter whose module paths are ``paths`` can only be this family's ("they name FLUX's
        single_transformer_blocks"), or None. :func:`lora_dpo.models.lora_files.adapter_key_families` asks every
        family before it falls back to the key prefixes."""
        for pattern, why in self.lora_key_markers:
            if any(re.search(pattern, path) for path in paths):
                return f"its keys: {why}"
        return None

    def draw_key(self, model_cfg) -> dict[str, Any]:
        """The recipe's settings (``model`` section) that change a pair's reference errors beyond the weights: how
        the timestep or σ is drawn and what the denoiser is conditioned on. A cache of precomputed reference errors
        stores them in its key. None for the UNet families (their draw is fixed); SD3/FLUX: the σ density, FLUX also
        the guidance scale."""
        return {}

    def check_recipe(self, cfg) -> None:
        """Refuse, before any weights load, recipe options this family cannot honour. The UNet families refuse the
        flow-only ``model`` keys (:attr:`flow_options`); the flow families override this.

        Raises:
            ConfigError: the first option that does not fit, naming it and the family.
        """
        for key in self.flow_options:
            if getattr(cfg.model, key, None) is not None:
                raise ConfigError(f"model.{key} applies to the flow-matching families (SD3/SD3.5, FLUX.1), not to "
                                  f"{self.label}: remove it")

    def __repr__(self) -> str:
        return f"<model family {self.name}: {self.label}>"

    # -- recognising and opening a pipeline -------------------------------------------------------------------

    def recognises(self, model_index: dict[str, Any]) -> bool:
        """``model_index["_class_name"]`` is one of :attr:`pipeline_class_names` (checked for every family before
        any :meth:`matches_layout`)."""
        return model_index.get("_class_name", "") in self.pipeline_class_names

    @abstractmethod
    def matches_layout(self, model_index: dict[str, Any]) -> bool:
        """A pipeline of an unknown class has this family's components (e.g. a community pipeline class).

        Must be False for every other registered family's layout. SD1.5: ``unet`` and ``text_encoder`` without
        ``text_encoder_2``; SDXL: ``unet`` and ``text_encoder_2``; SD3: ``transformer`` and ``text_encoder_3``;
        FLUX: ``transformer`` and ``text_encoder_2`` without ``text_encoder_3``.
        """

    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        """Extra keyword arguments of every call of a loaded pipeline of this family that samples with the kit
        (evaluation, preference sets, ``lora-dpo generate``): none for the UNet families; the flow families' T5
        length (:meth:`~lora_dpo.models.families.rectified_flow.RectifiedFlowFamily.sampling_kwargs`)."""
        return {}

    def usage_kwargs(self, components: Components, model_cfg) -> dict[str, Any]:
        """The keyword arguments a plain diffusers call of this model needs to sample as the kit trained it (shown
        in the model card's usage line): none for the UNet families; the flow families' T5 length where it is not
        the pipeline's default."""
        return {}

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of every pipeline the kit opens for sampling and scoring (``from_pretrained``)
        or builds (:meth:`build_tiny_pipeline`): SD1.5 leaves out its safety checker. None by default."""
        return {}

    @abstractmethod
    def load_components(self, model_cfg, model_index: dict[str, Any], weight_dtype: torch.dtype,
                        device: torch.device | str, unet_dtype: torch.dtype | None, encoders: bool,
                        unet: bool) -> Components:
        """Load and freeze the denoiser, VAE, text encoders, tokenizers and the training noise scheduler.

        Arguments as :func:`lora_dpo.models.loading.load_components`, plus the ``model_index`` read from
        ``model_cfg``. SD3/FLUX: ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``, two CLIP encoders plus T5
        (SD3) or CLIP plus T5 (FLUX), and ``FlowMatchEulerDiscreteScheduler`` (``prediction_type`` ``flow``).

        Raises:
            ModelLoadError: pickle-only weights, or a prediction type the family cannot train.
        """

    # -- the training step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_posterior(self, components: Components, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior ``vae.encode(x).latent_dist`` as ``(mean, std)``.

        Args:
            pixel_values: ``(N, 3, H, W)`` in [-1, 1].
        Returns:
            ``mean, std``: each ``(N, C, H/f, W/f)`` in the VAE's dtype (f = the downsampling factor, 8 for SD; C = 4).
            A latent is :func:`lora_dpo.data.draws.posterior_sample` of them. SD3/FLUX (VAE ``shift_factor``, C =
            16) would return ``mean - shift_factor``, so the sample times the scaling factor is their latent.
        """
        vae = components.vae
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        # contiguous: the posterior's halves are strided views, and a UNet fed a strided latent picks other
        # (channels-last) kernels, which round differently from the same latent read back from a cache
        return dist.mean.contiguous(), dist.std.contiguous()

    @abstractmethod
    def encode_prompts(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning of ``B`` captions, every tensor ``(B, ...)`` (no grad; the cache stores it per caption).

        SD1.5: ``{"encoder_hidden_states": (B, 77, 768)}``; SDXL adds the pooled ``"text_embeds": (B, 1280)``.
        SD3: CLIP-L and CLIP-G penultimate states concatenated, padded to 4096 and joined along the sequence with
        T5's, plus both pooled outputs ``(B, 2048)``; FLUX: T5 states ``(B, 512, 4096)`` and CLIP pooled ``(B, 768)``.
        """

    @abstractmethod
    def denoiser_conditioning(self, components: Components, text: dict[str, torch.Tensor], batch,
                              dtype: torch.dtype, images_per_caption: int = 2) -> dict[str, Any]:
        """The denoiser's keyword arguments for ``images_per_caption`` images per caption of ``batch``.

        Text tensors ``(B, ...)`` are repeated to ``(images_per_caption·B, ...)`` (preferred images first) and cast to
        ``dtype``. SDXL adds micro-conditioning per image from ``batch`` (``original_size``, ``crop_top_left``,
        ``target_size``). SD3: ``encoder_hidden_states`` and ``pooled_projections``; FLUX also ``txt_ids``,
        ``img_ids`` (from the latent size) and ``guidance`` (guidance-distilled models).
        """

    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        """The denoiser's output for ``noisy`` latents ``(N, C, h, w)`` at ``timesteps`` ``(N,)``, shaped like
        ``noisy``. SD1.5/SDXL: ``unet(noisy, timesteps, **conditioning).sample``. FLUX packs the latents into 2x2
        patch tokens ``(N, h·w/4, 4C)``, passes ``timestep = t / 1000`` and unpacks the output; SD3 passes
        ``hidden_states`` and ``timestep`` by keyword."""

    @abstractmethod
    def sample_timesteps(self, components: Components, generator: torch.Generator, n: int,
                         latent_shape: Sequence[int]) -> torch.Tensor:
        """``n`` training timesteps drawn from ``generator`` (a CPU generator: the draw is device-independent).

        SD1.5/SDXL: integer ``t ~ U{0, ..., T-1}`` (long; T = ``num_train_timesteps``), one ``torch.randint`` call.
        SD3/FLUX: ``σ`` from a density (SD3: logit-normal, ``σ = sigmoid(u)``, ``u ~ N(0, 1)``, then shifted;
        FLUX shifts by the image's token count, from ``latent_shape`` ``(C, h, w)``), returned as ``σ·T`` floats.
        """

    @abstractmethod
    def add_noise(self, components: Components, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """The noised latents ``x_t``, all ``(N, C, h, w)``. SD1.5/SDXL: ``α_t·x_0 + σ_t·ε``
        (``DDPMScheduler.add_noise``); SD3/FLUX (rectified flow): ``(1 − σ)·x_0 + σ·ε``."""

    @abstractmethod
    def training_target(self, components: Components, latents: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict, ``(N, C, h, w)``. SD1.5/SDXL: ``ε`` (epsilon) or
        ``v = α_t·ε − σ_t·x_0`` (v_prediction); SD3/FLUX: the velocity ``ε − x_0``."""

    # -- LoRA files -------------------------------------------------------------------------------------------

    @abstractmethod
    def save_lora_weights(self, save_dir: str | Path, layers: dict[str, torch.Tensor], metadata: dict,
                          weight_name: str) -> None:
        """Write the denoiser's LoRA ``layers`` (PEFT names) with its ``LoraConfig`` ``metadata`` through the
        pipeline's ``save_lora_weights`` (SD: ``unet_lora_layers``; SD3/FLUX: ``transformer_lora_layers``)."""

    @abstractmethod
    def lora_state_dict(self, source, denoiser_config, **kwargs) -> tuple:
        """The pipeline's LoRA reader (``pipeline_class.lora_state_dict``: converts kohya / A1111 layouts) on
        ``source`` (a state dict or a folder with ``weight_name=``); ``denoiser_config`` is the denoiser's config
        where the reader needs it (SDXL kohya names). Returns what the reader returns: ``(state, network_alphas)``,
        plus the metadata with ``return_lora_metadata=True``."""

    def kohya_fused(self, module: str, denoiser_config=None) -> tuple[str, int, tuple[str, ...]]:
        """``(stem, part, parts)``: the kohya stem of a denoiser module, its position among the modules that kohya's
        model fuses into that stem, and those modules' diffusers paths in order. Default: one module per stem
        (:meth:`kohya_module_name`, part 0 of ``(module,)``); FLUX fuses q, k, v (and its single blocks' MLP input).

        Raises:
            ValueError: as :meth:`kohya_module_name`.
        """
        return self.kohya_module_name(module, denoiser_config), 0, (module,)

    @abstractmethod
    def kohya_module_name(self, module: str, denoiser_config: dict) -> str:
        """The kohya key stem (``lora_unet_...``) of a denoiser module given by its diffusers path.

        SD1.5: the diffusers name with ``.`` -> ``_``; SDXL: Stability's SGM name; FLUX: ``lora_unet_`` + the BFL
        name (``double_blocks_0_img_attn_qkv``, q, k, v fused). Raises ValueError for a module without one.
        """

    # -- inference --------------------------------------------------------------------------------------------

    compel_class_name: ClassVar[str | None] = None
    """The name of compel's prompt-weighting class for this pipeline (``CompelForSD``, ``CompelForSDXL``;
    ``CompelForFlux`` for FLUX), resolved by :mod:`lora_dpo.inference.generation`, the one stage that imports compel;
    None where compel has none (then plain prompts would go to ``pipe.encode_prompt``)."""

    @abstractmethod
    def prompt_embeddings(self, conditioning, pipe, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """Pipeline keyword arguments from compel's conditioning of one prompt and its negative (the output of
        ``compel_class(pipe)(prompt, negative_prompt=...)``): ``prompt_embeds``, ``negative_prompt_embeds`` and,
        where the pipeline takes them, the pooled embeddings."""

    # -- random-weight models ---------------------------------------------------------------------------------

    @abstractmethod
    def build_tiny_components(self, seed: int = 0) -> dict[str, Any]:
        """Random-weight components of a tiny pipeline of this family (tests, offline demo), keyed as
        :attr:`pipeline_class` takes them. Draws from the global torch generator after ``manual_seed(seed)``."""

    def build_tiny_pipeline(self, seed: int = 0):
        """A tiny :attr:`pipeline_class` with random weights (:meth:`build_tiny_components`, :meth:`pipeline_kwargs`)."""
        return self.pipeline_class(**self.build_tiny_components(seed), **self.pipeline_kwargs())

    @abstractmethod
    def build_real_components(self) -> dict[str, Any]:
        """Random-weight components of the real-size architecture, keyed as :attr:`pipeline_class` takes them
        (``scheduler`` included); tokenizers are the kit's small offline ones padded to the real lengths."""

    @abstractmethod
    def text_component_names(self) -> list[tuple[str, str]]:
        """``(tokenizer, text encoder)`` component names of the pipeline, in its order."""

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The VAE's dtype when ``model.vae_dtype`` is ``auto``: the frozen weights' dtype (SDXL: fp32 under fp16)."""
        return weight_dtype

    def build_random_components(self, tiny: bool, weight_dtype: torch.dtype, device: torch.device | str,
                                unet_dtype: torch.dtype | None, seed: int) -> Components:
        """Frozen random-weight :class:`Components` of the tiny test pipeline (:meth:`build_tiny_components`) or of
        the real-size architecture (:meth:`build_real_components`; cost benchmarks: time and memory depend on the
        architecture, not on the weights' values), built on ``device`` after ``manual_seed(seed)``: the denoiser in
        ``unet_dtype or weight_dtype``, the VAE in :meth:`vae_dtype`, the text encoders in ``weight_dtype``. The
        prediction type is the scheduler's (``flow`` for a flow-matching scheduler, which names none)."""
        torch.manual_seed(seed)
        with torch.device(device):
            parts = self.build_tiny_components(seed) if tiny else self.build_real_components()
        denoiser, vae = parts[self.denoiser_name], parts["vae"]
        names = self.text_component_names()
        tokenizers, encoders = [parts[t] for t, _ in names], [parts[e] for _, e in names]
        denoiser.to(device, unet_dtype or weight_dtype)
        vae.to(device, self.vae_dtype(weight_dtype))
        for module in (denoiser, vae, *encoders):
            module.requires_grad_(False).eval()
        for encoder in encoders:
            encoder.to(device, weight_dtype)
        scheduler = parts["scheduler"]
        return Components(self.name, denoiser, vae, encoders, tokenizers, scheduler,
                          scheduler.config.get("prediction_type", "flow"))
