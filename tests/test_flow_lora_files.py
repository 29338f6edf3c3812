"""LoRA files of the flow-matching families (SD3, FLUX.1): the fit check and the family-mismatch check, export to the
diffusers / PEFT / kohya layouts read back by their consumers' own loaders, merging, and DPO from an existing LoRA.

Float tolerances: two computations of the same function in fp32 that differ only in rounding (a LoRA applied as
``s·B(Ax)`` vs ``(s_u·B)(s_d·A x)``, as diffusers' kohya reader folds alpha into the weights, or fused into ``W``)
differ by the rounding of the sums they reorder, carried to the output by the layers after: :func:`_tol`, derived
from the widest sum; every comparison also checks that the adapter moved the output by far more than that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import ROOT, _args, _metrics

from lora_dpo.cli import main
from lora_dpo.config import LoraConfig
from lora_dpo.errors import AdapterMismatchError
from lora_dpo.export.artifacts import save_lora_adapter
from lora_dpo.export.formats import export_adapter, fuse_lora_parts
from lora_dpo.export.merge import merge_adapter
from lora_dpo.models.adapters import add_lora
from lora_dpo.models.families import get_family
from lora_dpo.models.lora_files import (
    FAMILY_KEY,
    adapter_key_families,
    check_adapter_fits,
    check_adapter_fits_model,
)

FLOW = ("sd3", "flux")
EPS = torch.finfo(torch.float32).eps
TINY_WIDTH = 128  # the widest sum in the tiny transformers: the feed-forward's hidden width (4 x 32)
REAL_WIDTH = 3072 + 12288  # FLUX.1's single block: proj_out reads the attention and MLP outputs side by side
LAYERS = 4  # the layers between a LoRA'd module and the output (attention/MLP, output projection, norm, proj_out)


def _tol(reference: torch.Tensor, width: int = TINY_WIDTH) -> float:
    """Max |a − b| of two fp32 computations of ``reference`` that round differently. A sum of n terms computed in
    another order (or with one operand rounded differently) differs by a random walk of n roundings of at most eps/2
    of its largest term: about sqrt(n)·eps/2 relative; each of the ``LAYERS`` layers after the first difference
    adds its own and passes the earlier ones on with gain ~1 (|weights| ~ 1/sqrt(fan-in), normalized activations).
    So ``LAYERS · sqrt(width) · eps`` of the largest output (tiny: 45 eps ≈ 5e-6 relative; real width: 500 eps ≈
    6e-5): twice the random-walk estimate. Measured: 0 for the diffusers / PEFT loads (the same arithmetic), 3 eps
    for the tiny kohya load, 6 eps at the real width, 3-6 eps for merges."""
    return LAYERS * math.sqrt(width) * EPS * reference.abs().max().item()


# -- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def flow_models(tiny_flow, tiny_sd15) -> dict[str, Path]:
    """The tiny SD3 and FLUX (guidance-distilled) pipelines, and SD1.5 for the cross-kind mismatches."""
    return {**tiny_flow, "sd15": tiny_sd15}


def _inputs(family: str, batch: int = 2) -> dict:
    """Denoiser inputs of the tiny models: SD3 a (N, 16, 8, 8) latent; FLUX 16 packed tokens (a 4 x 4 grid)."""
    g = torch.Generator().manual_seed(0)
    if family == "sd3":  # joint_attention_dim 64, pooled 16 + 32
        return dict(hidden_states=torch.randn(batch, 16, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 8, 64, generator=g),
                    pooled_projections=torch.randn(batch, 48, generator=g), timestep=torch.tensor([300.0, 800.0]))
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=torch.randn(batch, 16, 64, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 64, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.tensor([0.3, 0.8]),
                guidance=torch.tensor([3.5, 3.5]), img_ids=ids, txt_ids=torch.zeros(8, 3))


@torch.no_grad()
def _forward(denoiser, family: str) -> torch.Tensor:
    return denoiser(**_inputs(family), return_dict=False)[0]


def _randomize(denoiser: torch.nn.Module, seed: int) -> None:
    """Seeded random LoRA weights of a size that moves the outputs by O(their size): A ~ N(0, 1/in), B ~ N(0, 0.3²)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in denoiser.named_parameters():
        if ".lora_A." in name:
            p.data = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
        elif ".lora_B." in name:
            p.data = torch.randn(p.shape, generator=g)


def save_random_flow_lora(out: Path, model: Path, family: str, r: int = 4, lora_alpha: float = 3.0, seed: int = 1,
                          target_modules: list[str] | None = None) -> SimpleNamespace:
    """The flow families' ``conftest.save_random_lora``: a LoRA on the tiny ``model``'s transformer (the family's
    default targets; alpha != r, so a loader that drops alpha is caught, and alpha / r = 0.75 is not a power of two,
    so a reader that folds it into the weights rounds differently) with seeded random A and B, saved by the
    kit's exporter. Returns the file, the policy (the transformer with the LoRA) and the base and policy outputs."""
    spec = get_family(family)
    denoiser = spec.denoiser_class.from_pretrained(Path(model) / spec.denoiser_name)
    base = _forward(denoiser, family)
    add_lora(denoiser, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules), family)
    _randomize(denoiser, seed)
    file = save_lora_adapter(out, denoiser, family)
    return SimpleNamespace(family=family, model=Path(model), file=file, policy=denoiser, base_out=base,
                           ref=_forward(denoiser, family))


@pytest.fixture(scope="session")
def flow_loras(flow_models, tmp_path_factory) -> dict[str, SimpleNamespace]:
    root = tmp_path_factory.mktemp("flow-loras")
    loras = {family: save_random_flow_lora(root / family, flow_models[family], family) for family in FLOW}
    from conftest import save_random_lora

    loras["sd15"] = SimpleNamespace(file=save_random_lora(root / "sd15", flow_models["sd15"], "sd15")
                                    / "pytorch_lora_weights.safetensors")
    return loras


def _check_same(out: torch.Tensor, ad: SimpleNamespace, reference: torch.Tensor | None = None,
                width: int = TINY_WIDTH) -> None:
    reference = ad.ref if reference is None else reference
    tol = _tol(reference, width)
    assert (reference - ad.base_out).abs().max() > 1000 * tol  # the adapter matters: a lost one fails
    assert (out - reference).abs().max().item() <= tol


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118 (not a dict)


# -- the exported file and the fit check ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FLOW)
def test_run_file_has_the_family_and_diffusers_metadata(flow_loras, family):
    tensors, header = _read(flow_loras[family].file)
    assert header[FAMILY_KEY] == family
    meta = json.loads(header["lora_adapter_metadata"])  # diffusers' own, intact: alpha survives load_lora_weights
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 3
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    # SD3: 2 joint blocks x 8 targets, less to_add_out of the context_pre_only last block; FLUX: 1 double block x 12
    # targets + 1 single block x 5 (q, k, v, proj_mlp, proj_out); the model's own proj_out is excluded.
    modules = {"sd3": 15, "flux": 17}[family]
    assert len(tensors) == 2 * modules
    assert check_adapter_fits_model(flow_loras[family].file, str(flow_loras[family].model)) == flow_loras[family].file
    assert check_adapter_fits(flow_loras[family].file, flow_loras[family].policy, family) == modules


MISMATCHES = [("sd3", "flux", "SD3/SD3.5", "FLUX.1"), ("sd3", "sd15", "SD3/SD3.5", "SD1.x/2.x"),
              ("flux", "sd3", "FLUX.1", "SD3/SD3.5"), ("sd15", "flux", "SD1.x/2.x", "FLUX.1")]


@pytest.mark.parametrize("header", [True, False], ids=["kit-header", "keys-only"])
@pytest.mark.parametrize("adapter,model,trained,target", MISMATCHES, ids=[f"{a}-into-{m}" for a, m, *_ in MISMATCHES])
def test_family_mismatch_fails_before_any_weights_load(flow_models, flow_loras, tmp_path, monkeypatch, adapter, model,
                                                       trained, target, header):
    """The message names both families, from the header lora-dpo writes or, without it, from the keys alone (the
    tiny SD3 and FLUX have the same width 32: shapes cannot tell them apart)."""
    import diffusers

    file = flow_loras[adapter].file
    if not header:  # what another tool would write: the same keys, diffusers' metadata only
        tensors, meta = _read(file)
        file = tmp_path / "other_tool.safetensors"
        save_file(tensors, str(file), {k: v for k, v in meta.items() if k != FAMILY_KEY})

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    for name in ("from_pretrained", "lora_state_dict", "load_lora_weights"):
        for cls in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusion3Pipeline, diffusers.FluxPipeline):
            monkeypatch.setattr(cls, name, no_loading)
    for cls in (diffusers.UNet2DConditionModel, diffusers.SD3Transformer2DModel, diffusers.FluxTransformer2DModel):
        monkeypatch.setattr(cls, "from_pretrained", no_loading)
    for check in (lambda: check_adapter_fits_model(file, str(flow_models[model])),
                  lambda: merge_adapter(str(flow_models[model]), file, tmp_path / "merged")):
        with pytest.raises(AdapterMismatchError) as info:
            check()
        message = str(info.value)
        assert f"trained for {trained}" in message and f"the model is {target}" in message, message
        assert "keys" in message or header
    assert not (tmp_path / "merged").exists()


def test_key_evidence_of_other_layouts():
    """kohya FLUX names, BFL / SAI names, UNet names in kohya and PEFT spellings, and a text-encoder-only file."""
    def names(keys):
        return [f.name for f in adapter_key_families([f"{k}.lora_down.weight" for k in keys])[0]]

    assert names(["lora_unet_double_blocks_0_img_attn_qkv"]) == ["flux"]
    assert names(["diffusion_model.single_blocks.3.linear1"]) == ["flux"]
    assert names(["transformer.joint_blocks.0.x_block.attn.qkv"]) == ["sd3"]
    assert names(["transformer.transformer_blocks.0.attn2.to_q"]) == ["sd3"]  # SD3.5's dual attention
    assert names(["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]) == ["sd15", "sdxl"]
    assert names(["base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]) == ["sd15", "sdxl"]
    assert names(["transformer.transformer_blocks.0.attn.to_q"]) == ["sd3", "flux"]  # ambiguous: the header decides
    assert names(["lora_te_text_model_encoder_layers_0_mlp_fc1"]) == []


# -- export ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
@pytest.mark.parametrize("family", FLOW)
def test_export_loads_in_the_consumers_loader(flow_loras, tmp_path, family, fmt):
    ad = flow_loras[family]
    spec = get_family(family)
    main_file = export_adapter(ad.file, tmp_path / "out", fmt, family, ad.model)
    if fmt == "peft":
        from peft import PeftModel

        tensors, header = _read(main_file)
        assert all(k.startswith("base_model.model.") for k in tensors) and header[FAMILY_KEY] == family
        base = spec.denoiser_class.from_pretrained(ad.model, subfolder="transformer")
        _check_same(_forward(PeftModel.from_pretrained(base, main_file.parent), family), ad)
        return
    (ours, our_meta), (theirs, their_meta) = _read(main_file), _read(ad.file)
    assert our_meta == their_meta and ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    pipe = spec.pipeline_class.from_pretrained(ad.model)
    pipe.load_lora_weights(str(main_file.parent), weight_name=main_file.name, adapter_name="x")
    _check_same(_forward(pipe.transformer, family), ad)


FLUX_STEMS = {"double_blocks_0_img_attn_qkv": 3, "double_blocks_0_img_attn_proj": 1, "double_blocks_0_txt_attn_qkv": 3,
              "double_blocks_0_txt_attn_proj": 1, "double_blocks_0_img_mlp_0": 1, "double_blocks_0_img_mlp_2": 1,
              "double_blocks_0_txt_mlp_0": 1, "double_blocks_0_txt_mlp_2": 1, "single_blocks_0_linear1": 4,
              "single_blocks_0_linear2": 1}  # stem -> modules fused into it


def test_flux_kohya_layout_and_diffusers_reads_the_double_blocks(flow_loras, tmp_path):
    ad = flow_loras["flux"]
    file = export_adapter(ad.file, tmp_path / "flux_style.safetensors", "kohya", "flux", ad.model)
    tensors, meta = _read(file)
    assert set(tensors) == {f"lora_unet_{s}.{p}" for s in FLUX_STEMS for p in ("lora_down.weight", "lora_up.weight",
                                                                                 "alpha")}
    assert meta["ss_base_model_version"] == "flux1" and meta[FAMILY_KEY] == "flux"
    peft = {n: m for n, m in ad.policy.named_modules() if hasattr(m, "lora_A")}
    groups = {}
    for module in peft:
        stem, _, parts = get_family("flux").kohya_fused(module)
        groups[stem.removeprefix("lora_unet_")] = parts
    assert {s: len(p) for s, p in groups.items()} == FLUX_STEMS
    for stem, parts in groups.items():
        k = len(parts)
        down, up, alpha = (tensors[f"lora_unet_{stem}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape == (4 * k, peft[parts[0]].in_features) and up.shape[1] == 4 * k, stem
        assert alpha.item() == 3.0 * k, stem  # alpha / rank = lora_alpha / r = 3 / 4
        row = 0  # down = cat(A_i); up block-diagonal: B_i in its rows x its rank's columns, zeros elsewhere
        for i, module in enumerate(parts):
            a, b = peft[module].lora_A["default"].weight, peft[module].lora_B["default"].weight
            assert torch.equal(down[4 * i: 4 * i + 4], a)
            assert torch.equal(up[row: row + b.shape[0], 4 * i: 4 * i + 4], b)
            rest = up[row: row + b.shape[0]].clone()
            rest[:, 4 * i: 4 * i + 4] = 0
            assert not rest.any()
            row += b.shape[0]
        assert row == up.shape[0]
    # diffusers' own kohya reader (FluxPipeline.load_lora_weights) splits the fused double-block layers back. It
    # hard-codes FLUX.1's widths for linear1, so linear1 is checked on a real-width block below; here it is left
    # out, and the reference is the policy without the single block's q, k, v, proj_mlp LoRA.
    without = tmp_path / "double.safetensors"
    save_file({k: v for k, v in tensors.items() if "linear1" not in k}, str(without), meta)
    pipe = get_family("flux").pipeline_class.from_pretrained(ad.model)
    pipe.load_lora_weights(str(tmp_path), weight_name=without.name, adapter_name="kohya")
    held = {}
    for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        layer = peft[f"single_transformer_blocks.0.{name}"]
        held[name] = layer.scaling["default"]
        layer.scaling["default"] = 0.0
    try:
        reference = _forward(ad.policy, "flux")
    finally:
        for name, scaling in held.items():
            peft[f"single_transformer_blocks.0.{name}"].scaling["default"] = scaling
    _check_same(_forward(pipe.transformer, "flux"), ad, reference)
    # The whole file on the tiny model: the kit's fit check turns the reader's failure into a clear refusal.
    with pytest.raises(AdapterMismatchError, match="FluxPipeline reader.*3072"):
        check_adapter_fits(file, ad.policy, "flux")


def _real_width_flux():
    """A FLUX transformer with FLUX.1's single-block width (24 heads x 128 = 3072, MLP 12288) and one single block,
    built on the meta device; every weight is a view into one shared random buffer (offset per parameter, scaled
    1/sqrt(3072)), so its ~180M parameters take ~190 MB instead of 720 MB and no init time."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=0, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=16,
                                       pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    params = list(model.named_parameters())
    largest = max(p.numel() for _, p in params)
    buffer = torch.randn(largest + len(params), generator=torch.Generator().manual_seed(2)) / math.sqrt(3072)
    for i, (name, p) in enumerate(params):
        owner = model.get_submodule(name.rpartition(".")[0])
        owner._parameters[name.rpartition(".")[2]] = torch.nn.Parameter(
            buffer[i: i + p.numel()].view(p.shape), requires_grad=False)
    assert not any(b.is_meta for b in model.buffers())
    return model.eval()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # the kohya copy beside the kit's adapter
def test_flux_kohya_linear1_at_the_real_width_reads_back_in_diffusers(tmp_path):
    """``lora_unet_single_blocks_0_linear1`` (q, k, v, proj_mlp fused: rank 16, up 21504 x 16) through diffusers'
    ``FluxPipeline.lora_state_dict`` + ``load_lora_adapter`` (what ``load_lora_weights`` does) computes the kit's
    policy."""
    from diffusers import FluxPipeline

    model = _real_width_flux()
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 4, 16, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]), img_ids=ids,
                  txt_ids=torch.zeros(4, 3), return_dict=False)
    with torch.no_grad():
        base_out = model(**inputs)[0]
    add_lora(model, LoraConfig(r=4, lora_alpha=3), "flux")
    _randomize(model, seed=3)
    with torch.no_grad():
        ref = model(**inputs)[0]
    run = save_lora_adapter(tmp_path / "run", model, "flux")
    kohya = export_adapter(run, tmp_path / "real.safetensors", "kohya", "flux", dict(model.config))
    tensors, _ = _read(kohya)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 16)
    state, alphas = FluxPipeline.lora_state_dict(str(kohya), return_alphas=True)
    assert alphas is None  # kohya: the scale is folded into the weights
    model.load_lora_adapter(state, network_alphas=alphas, adapter_name="kohya")
    model.set_adapters(["kohya"])
    with torch.no_grad():
        out = model(**inputs)[0]
    _check_same(out, SimpleNamespace(ref=ref, base_out=base_out), width=REAL_WIDTH)


def test_fuse_lora_parts_is_exact_with_other_ranks_scales_and_missing_parts():
    """The fused LoRA's update equals the parts' stacked updates: ranks 2 and 3, scales 0.5 and 3, a missing part."""
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    a3, b3 = torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g)
    down, up, alpha = fuse_lora_parts([(a1, b1, 0.5), None, (a3, b3, 3.0)], [5, 7, 4])
    assert down.shape == (9, 6) and up.shape == (16, 9) and alpha == 0.5 * 9
    want = torch.cat([0.5 * b1 @ a1, torch.zeros(7, 6), 3.0 * b3 @ a3])
    torch.testing.assert_close(alpha / 9 * up @ down, want, atol=_tol(want, width=3), rtol=0)
    with pytest.raises(ValueError, match="different widths"):
        fuse_lora_parts([(a1, b1, 1.0), (torch.randn(2, 5), b1, 1.0)], [5, 5])


def test_flux_kohya_of_a_partial_fused_layer_writes_zero_blocks(flow_models, tmp_path):
    """An adapter on to_q and to_v only: the qkv stem's k block is zero (its width read from the base's config)."""
    ad = save_random_flow_lora(tmp_path / "qv", flow_models["flux"], "flux", target_modules=["attn.to_q", "attn.to_v"])
    file = export_adapter(ad.file, tmp_path / "qv.safetensors", "kohya", "flux", flow_models["flux"])
    tensors, _ = _read(file)
    down, up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], \
        tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert down.shape == (12, 32) and up.shape == (96, 12) and tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"] == 9
    assert not down[4:8].any() and not up[32:64].any() and down[:4].any() and down[8:].any()
    with pytest.raises(ValueError, match="--base"):
        export_adapter(ad.file, tmp_path / "x.safetensors", "kohya", "flux", None)
    # the command line reads the base's transformer/config.json itself
    assert main(["export", str(ad.file), "--format", "kohya", "--out", str(tmp_path / "cli.safetensors"),
                 "--base", str(flow_models["flux"])]) == 0
    cli, _ = _read(tmp_path / "cli.safetensors")
    assert cli.keys() == tensors.keys() and all(torch.equal(cli[k], tensors[k]) for k in cli)


def test_sd3_kohya_is_refused_with_one_error_line(flow_loras, flow_models, tmp_path, capsys):
    ad = flow_loras["sd3"]
    with pytest.raises(ValueError, match="diffusers or peft"):
        export_adapter(ad.file, tmp_path / "a.safetensors", "kohya", "sd3", ad.model)
    code = main(["export", str(ad.file), "--format", "kohya", "--out", str(tmp_path / "b"),
                 "--base", str(flow_models["sd3"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "diffusers or peft" in err[0]
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b").exists()
    assert main(["export", str(ad.file), "--format", "peft", "--out", str(tmp_path / "c"),
                 "--base", str(flow_models["sd3"])]) == 0
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["r"] == 4


# -- merge ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FLOW)
def test_merge_matches_the_policy_and_transformer_only(flow_loras, tmp_path, family):
    ad = flow_loras[family]
    spec = get_family(family)
    report = merge_adapter(str(ad.model), ad.file, tmp_path / "full")
    assert report["family"] == family and report["modules"] == {"sd3": 15, "flux": 17}[family]
    merged = spec.pipeline_class.from_pretrained(tmp_path / "full")  # opens alone: no adapter, no PEFT
    assert not getattr(merged.transformer, "peft_config", None)
    _check_same(_forward(merged.transformer, family), ad)
    assert f"{spec.pipeline_class.__name__}.from_pretrained" in (tmp_path / "full" / "README.md").read_text()

    merge_adapter(str(ad.model), ad.file, tmp_path / "only", unet_only=True)
    alone = spec.denoiser_class.from_pretrained(tmp_path / "only")
    assert f"{spec.denoiser_class.__name__}.from_pretrained" in (tmp_path / "only" / "README.md").read_text()
    a = load_file(tmp_path / "only" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "full" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _check_same(_forward(alone, family), ad)


# -- DPO from an existing LoRA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,recipe", [("sd3", "sd35"), ("flux", "flux")])
def test_init_from_starts_at_ln2(flow_loras, photo_pairs, tmp_path, family, recipe):
    ad = flow_loras[family]
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / recipe / "lora_dpo.yaml"),
                 *_args(ad.model, photo_pairs, out, f"lora.init_from={ad.file.parent}", "train.max_steps=1",
                        "train.checkpoint_every=1", "optim.lr_warmup_steps=0")]) == 0
    first = _metrics(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference = the starting LoRA
    assert first["rewards/margins"] == 0 and first["ref_mse/chosen"] == first["mse/chosen"]
    trained, start = load_file(out / "pytorch_lora_weights.safetensors"), load_file(ad.file)
    assert trained.keys() == start.keys()  # the file's own shape (rank 4), not the recipe's r = 16
    assert load_file(out / "reference_lora.safetensors").keys() == start.keys()


def test_init_from_of_another_family_is_refused_before_training(flow_loras, flow_models, photo_pairs, tmp_path,
                                                                capsys):
    out = tmp_path / "run"
    code = main(["train", str(ROOT / "recipes/flux/lora_dpo.yaml"),
                 *_args(flow_models["flux"], photo_pairs, out, f"lora.init_from={flow_loras['sd3'].file}",
                        "optim.lr_warmup_steps=0")])
    err = capsys.readouterr().err
    assert code == 2 and "trained for SD3/SD3.5" in err and "the model is FLUX.1" in err
    assert not (out / "metrics.jsonl").exists()
