"""Full fine-tuning (``train.mode=full``): the whole UNet against a frozen copy, its optimizers, its export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_train import ROOT, _args, _metrics, _unet_inputs

from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.models.families import pipeline_class
from lora_dpo.models.loading import load_components
from lora_dpo.training.recipe import train


def _full(model, data, out, *extra):
    return _args(model, data, out, "train.mode=full", "optim.lr=1e-4", *extra)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_mode_trains_the_policy_only_and_exports_a_pipeline(family, request, photo_pairs, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / family / "lora_dpo.yaml"), *_full(model, photo_pairs, out)]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the frozen copy equals the policy at step 0
    assert rows[0]["rewards/margins"] == 0 and rows[-1]["rewards/margins"] != 0

    # The checkpoint holds the whole UNet; it is the exported pipeline's UNet; the base is not it.
    base = load_components(load_config(out / "recipe.yaml").model, torch.float32).unet.state_dict()
    ckpt = load_file(out / "checkpoints/step_3/trainable_weights.safetensors")
    assert ckpt.keys() == base.keys()
    changed = [k for k in base if not torch.equal(ckpt[k], base[k])]
    assert len(changed) > 0.9 * len(base)  # nearly every tensor moved (AdamW moves all but exact-zero grads)

    pipe = pipeline_class(family).from_pretrained(out)
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[k], ckpt[k]) for k in ckpt)
    x, t, cond = _unet_inputs(family)
    tuned_out = pipe.unet(x, t, **cond).sample
    base_unet = load_components(load_config(out / "recipe.yaml").model, torch.float32).unet
    assert (tuned_out - base_unet(x, t, **cond).sample).abs().max() > 1e-4
    assert "from_pretrained(\"path/to/this/folder\")" in (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model_relation == "finetune" and "lora" not in card.data.tags
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_reference_copy_stays_frozen(tiny_sd15, photo_pairs, tmp_path):
    cfg = load_config(None, _full(tiny_sd15, photo_pairs, tmp_path / "run"))
    result = train(cfg)
    base = load_components(cfg.model, torch.float32).unet.state_dict()
    ref = result.policy.frozen_reference
    assert ref is not result.model and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(v, base[k]) for k, v in ref.state_dict().items())
    assert any(not torch.equal(v, base[k]) for k, v in result.model.state_dict().items())
    # no storage is shared between policy and reference
    policy_ptrs = {p.data_ptr() for p in result.model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ref.parameters()}


def test_eval_refuses_a_full_run_clearly(tiny_sd15, photo_pairs, tmp_path, capsys):
    train(load_config(None, _full(tiny_sd15, photo_pairs, tmp_path / "run", "train.max_steps=1")))
    assert main(["eval", str(tmp_path / "run"), "--scorer", "jpeg"]) == 2
    assert "full fine-tuning run" in capsys.readouterr().err


@pytest.mark.parametrize("mode,optim", [("full", "adamw"), ("full", "adamw8bit"), ("full", "adafactor"),
                                        ("lora", "adafactor")])
def test_resume_is_exact_with_each_optimizer(mode, optim, tiny_sd15, photo_pairs, tmp_path):
    common = (f"train.mode={mode}", f"optim.name={optim}", "optim.lr=1e-4", "train.checkpoint_every=2",
              "optim.lr_scheduler=constant_with_warmup", "optim.lr_warmup_steps=1")
    if mode == "lora":
        common += ("lora.r=64",)  # bitsandbytes keeps small tensors' state in 32 bit; make it matter elsewhere too
    recipe = str(ROOT / "recipes/sd15/lora_dpo.yaml")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", recipe, *_args(tiny_sd15, photo_pairs, straight, *common, "train.max_steps=4")]) == 0
    assert main(["train", recipe, *_args(tiny_sd15, photo_pairs, split, *common, "train.max_steps=2")]) == 0
    state = torch.load(split / "checkpoints/step_2/optimizer.pt", weights_only=True)["state"]
    assert state  # the optimizer's state is in the checkpoint
    if optim == "adamw8bit":
        quant = [s["__bnb_optimizer_quant_state__"] for s in state.values()]
        assert any(q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in quant)
    if optim == "adafactor":  # factored second moments: a row and a column statistic per matrix
        assert any("exp_avg_sq_row" in s for s in state.values())
    assert main(["train", recipe, *_args(tiny_sd15, photo_pairs, split, *common, "train.max_steps=4",
                                         "train.resume_from=latest")]) == 0
    a, b = _metrics(straight), _metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_file(straight / "checkpoints/step_4/trainable_weights.safetensors")
    wb = load_file(split / "checkpoints/step_4/trainable_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_offloaded_reference_gives_the_same_run(tiny_sd15, photo_pairs, tmp_path):
    plain = train(load_config(None, _full(tiny_sd15, photo_pairs, tmp_path / "a", "train.max_steps=2")))
    offloaded = train(load_config(None, _full(tiny_sd15, photo_pairs, tmp_path / "b", "train.max_steps=2",
                                              "reference.offload=true")))
    assert hasattr(offloaded.policy.frozen_reference, "_hf_hook")  # accelerate's offload hooks are attached
    for ra, rb in zip(_metrics(tmp_path / "a"), _metrics(tmp_path / "b")):
        assert ra["loss"] == rb["loss"] and ra["ref_mse/chosen"] == rb["ref_mse/chosen"]
    assert plain.final_metrics["rewards/margins"] == offloaded.final_metrics["rewards/margins"]


def test_low_precision_reference_under_fp32_policy(tiny_sd15, photo_pairs, tmp_path):
    """A bf16 copy under an fp32 policy: half the reference memory, but u is no longer 0 at step 0."""
    cfg = load_config(None, _full(tiny_sd15, photo_pairs, tmp_path / "run", "train.max_steps=1",
                                  "reference.dtype=bfloat16"))
    result = train(cfg)
    assert {p.dtype for p in result.policy.frozen_reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    first = _metrics(tmp_path / "run")[0]
    assert first["ref_mse/chosen"] != first["mse/chosen"]  # the rounding of the weights shows in e_ref
    assert math.isfinite(first["loss"]) and abs(first["loss"] - math.log(2)) < 0.2


def test_full_sft_builds_no_reference(tiny_sdxl, photo_pairs, tmp_path):
    result = train(load_config(None, _full(tiny_sdxl, photo_pairs, tmp_path / "run", "loss.type=sft",
                                           "train.max_steps=2", "optim.name=adafactor")))
    assert result.policy.frozen_reference is None
    with pytest.raises(RuntimeError, match="without a reference"):
        with result.policy.reference():
            pass
    assert (Path(tmp_path / "run") / "model_index.json").is_file()
