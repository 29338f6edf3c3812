"""Adapter export (lora_dpo.export.formats): each layout loads back in its consumer's own loader with the same UNet output."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from lora_dpo.config import LoraConfig
from lora_dpo.export.artifacts import save_lora_adapter
from lora_dpo.export.formats import FORMATS, export_adapter, kohya_module_name
from lora_dpo.models.adapters import add_lora
from lora_dpo.models.families import pipeline_class
from lora_dpo.models.families.sd15 import UNET_CONFIG as SD15_UNET
from lora_dpo.models.families.sdxl import UNET_CONFIG as SDXL_UNET

ATOL = 1e-5
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
# Attention, transformer projections, resnets, down/upsamplers ("conv"), conv_in/out and the embedding MLPs.
WIDE = ATTN + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj",
               "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
VARIANTS = {  # name: (family, PEFT LoraConfig kwargs; None = lora_dpo's add_lora with r=4, alpha=2)
    "sd15": ("sd15", None),
    "sdxl": ("sdxl", None),
    "sd15-wide-rslora": ("sd15", dict(r=4, lora_alpha=2, target_modules=WIDE, use_rslora=True)),
    "sdxl-wide": ("sdxl", dict(r=4, lora_alpha=2, target_modules=WIDE)),
    "sdxl-patterns": ("sdxl", dict(r=4, lora_alpha=2, target_modules=ATTN + ["proj_in", "proj_out"],
                                   alpha_pattern={"proj_in": 8.0}, rank_pattern={"proj_out": 2})),
}


def _inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(0)
    width = 64 if family == "sdxl" else 32
    kwargs = dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([10, 700]),
                  encoder_hidden_states=torch.randn(2, 8, width, generator=g))
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    return kwargs


@torch.no_grad()
def _forward(unet, family: str) -> torch.Tensor:
    return unet(**_inputs(family)).sample


def _build(variant: str, base: Path, folder: Path) -> SimpleNamespace:
    """Train-free adapter: LoRA with seeded random A and B (so it changes the output), saved by lora-dpo."""
    import peft

    family, kwargs = VARIANTS[variant]
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    base_out = _forward(unet, family)
    if kwargs is None:
        add_lora(unet, LoraConfig(r=4, lora_alpha=2))
    else:
        unet.add_adapter(peft.LoraConfig(**kwargs), adapter_name="default")
    g = torch.Generator().manual_seed(1)
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    file = save_lora_adapter(folder, unet, family)
    return SimpleNamespace(family=family, base=base, file=file, ref=_forward(unet, family), base_out=base_out,
                           config=unet.config, peft_config=unet.peft_config["default"])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_sd15, tiny_sdxl):
    cache: dict[str, SimpleNamespace] = {}

    def get(variant: str) -> SimpleNamespace:
        if variant not in cache:
            base = tiny_sdxl if VARIANTS[variant][0] == "sdxl" else tiny_sd15
            cache[variant] = _build(variant, base, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get


def _check_same_output(out: torch.Tensor, ad: SimpleNamespace) -> None:
    assert (ad.ref - ad.base_out).abs().max() > 1000 * ATOL  # the adapter matters, so a lost one would fail
    torch.testing.assert_close(out, ad.ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_in_the_consumers_loader(adapters, tmp_path, variant, fmt):
    ad = adapters(variant)
    main = export_adapter(ad.file, tmp_path / "export", fmt, ad.family, ad.config)
    assert main.is_file() and main.parent == tmp_path / "export"
    if fmt == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(ad.base / "unet"), main.parent)
        _check_same_output(_forward(model, ad.family), ad)
        return
    pipe = pipeline_class(ad.family).from_pretrained(ad.base)
    torch.testing.assert_close(_forward(pipe.unet, ad.family), ad.base_out)
    pipe.load_lora_weights(str(main.parent), weight_name=main.name, adapter_name="x")
    _check_same_output(_forward(pipe.unet, ad.family), ad)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118 (not a dict)


def test_diffusers_keeps_tensors_and_metadata_in_peft_key_names(adapters, tmp_path):
    """Earlier lora-dpo files mixed ``to_q.lora.down.weight`` and ``proj_in.lora_A.weight``; the export never does."""
    ad = adapters("sdxl-wide")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"old")  # overwritten
    main = export_adapter(ad.file.parent, tmp_path, "diffusers", "sdxl", None)
    (ours, our_meta), (theirs, their_meta) = _read(main), _read(ad.file)
    assert our_meta == their_meta and len(ours) == len(theirs)
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in ours)
    for key, tensor in theirs.items():
        new = key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        assert torch.equal(ours[new], tensor), key


def test_peft_files_match_peft_own_save(adapters, tmp_path):
    """Same keys and config as PeftModel.save_pretrained of a UNet wrapped with the adapter's own LoraConfig."""
    from peft import get_peft_model

    ad = adapters("sdxl-patterns")
    main = export_adapter(ad.file, tmp_path / "ours", "peft", ad.family, ad.config)
    get_peft_model(UNet2DConditionModel.from_pretrained(ad.base / "unet"), ad.peft_config).save_pretrained(
        tmp_path / "peft")
    keys = {}
    for name in ("ours", "peft"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as fh:
            keys[name] = set(fh.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert keys["ours"] == keys["peft"] and all(k.startswith("base_model.model.") for k in keys["ours"])
    ours, theirs = (json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("ours", "peft"))
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert ours[field] == theirs[field], field
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert main.name == "adapter_model.safetensors"


def test_kohya_file_keys_alphas_and_metadata(adapters, tmp_path):
    ad = adapters("sdxl-patterns")
    main = export_adapter(ad.file, tmp_path / "sub" / "my_lora.safetensors", "kohya", ad.family, ad.config)
    assert main == tmp_path / "sub" / "my_lora.safetensors" and sorted(main.parent.iterdir()) == [main]
    tensors, meta = _read(main)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert all(s.startswith("lora_unet_") and "." not in s for s in stems)
    assert set(tensors) == {f"{s}.{p}" for s in stems for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    for stem in stems:
        rank, alpha = tensors[f"{stem}.lora_down.weight"].shape[0], tensors[f"{stem}.alpha"]
        assert alpha.dim() == 0 and tensors[f"{stem}.lora_up.weight"].shape[1] == rank
        want_alpha = 8.0 if stem.endswith("proj_in") else 2.0
        assert alpha.item() == want_alpha and rank == (2 if stem.endswith("proj_out") else 4), stem
    for part in ("input_blocks", "middle_block", "output_blocks"):  # SDXL: Stability's names
        assert any(s.startswith(f"lora_unet_{part}_") for s in stems), part
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    # A folder: <folder name>.safetensors inside it.
    assert export_adapter(ad.file, tmp_path / "kf", "kohya", "sdxl", ad.base) == tmp_path / "kf" / "kf.safetensors"


@functools.cache
def _meta_unet_modules(family: str) -> tuple[list[str], dict]:
    """Names of the LoRA-wrapped modules of the real-size UNet, built without memory on the meta device."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET if family == "sdxl" else SD15_UNET)
        unet.add_adapter(PeftLoraConfig(r=4, target_modules=WIDE))
    return [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)], unet.config


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_names_on_the_real_architectures_read_back_by_diffusers(family):
    """Every module name of the real UNet maps to a unique kohya name that diffusers' kohya reader maps back."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    modules, config = _meta_unet_modules(family)
    assert len(modules) > 200 and any(".resnets." in m for m in modules) and "conv_in" in modules
    stems = {m: kohya_module_name(m, family, config) for m in modules}
    assert len(set(stems.values())) == len(modules)
    fake = {f"{s}.{p}": torch.zeros(()) for s in stems.values() for p in ("lora_down.weight", "lora_up.weight")}
    state, alphas = pipeline_class(family).lora_state_dict(fake, unet_config=config)
    back = {k.removeprefix("unet.").rsplit(".lora_A.", 1)[0]
            for k in convert_unet_state_dict_to_peft(state) if ".lora_A." in k}
    assert back == set(modules)


def test_kohya_known_names():
    _, config = _meta_unet_modules("sdxl")
    sdxl = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.2.attentions.1.proj_in": "input_blocks_8_1_proj_in",
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0":
            "middle_block_1_transformer_blocks_9_attn2_to_out_0",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj":
            "output_blocks_2_1_transformer_blocks_0_ff_net_0_proj",
        "up_blocks.1.attentions.0.proj_out": "output_blocks_3_1_proj_out",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
        "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
        "mid_block.resnets.0.time_emb_proj": "middle_block_0_emb_layers_1",
        "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
        "up_blocks.2.resnets.2.conv2": "output_blocks_8_0_out_layers_3",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
        "conv_in": "input_blocks_0_0", "conv_out": "out_2", "add_embedding.linear_2": "label_emb_0_2",
    }
    for module, name in sdxl.items():
        assert kohya_module_name(module, "sdxl", config) == f"lora_unet_{name}", module
    sd15 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert kohya_module_name(sd15, "sd15", SD15_UNET) == "lora_unet_" + sd15.replace(".", "_")


def test_errors(adapters, tmp_path):
    ad = adapters("sdxl")
    with pytest.raises(ValueError, match="diffusers, peft, kohya"):
        export_adapter(ad.file, tmp_path, "ckpt", "sdxl", ad.config)
    with pytest.raises(ValueError, match="sd15"):
        export_adapter(ad.file, tmp_path, "kohya", "sd3", ad.config)
    for module in ("down_blocks.0.resnets.0.norm1", "encoder_hid_proj"):
        with pytest.raises(ValueError, match=module.replace(".", r"\.")):
            kohya_module_name(module, "sdxl", ad.config)
    kohya = export_adapter(ad.file, tmp_path / "k.safetensors", "kohya", "sdxl", ad.config)
    with pytest.raises(ValueError, match="lora_adapter_metadata"):  # a file without its LoRA config
        export_adapter(kohya, tmp_path / "again", "peft", "sdxl", ad.config)


@pytest.mark.parametrize("variant", ["sd15-wide-rslora", "sdxl-wide", "sdxl-patterns"])
def test_the_run_file_itself_loads_in_diffusers(adapters, variant):
    """save_lora_adapter's own file, with modules beyond attention: diffusers' loader keeps every module."""
    ad = adapters(variant)
    pipe = pipeline_class(ad.family).from_pretrained(ad.base)
    pipe.load_lora_weights(str(ad.file.parent), weight_name=ad.file.name, adapter_name="x")
    _check_same_output(_forward(pipe.unet, ad.family), ad)
