"""LoRA policy and disabled-adapter reference on a tiny UNet loaded through the kit's loader."""

import pytest
import torch

from lora_dpo.config import LoraConfig, ModelConfig
from lora_dpo.models.adapters import adapters_disabled, add_lora, load_lora_state_dict, lora_state_dict
from lora_dpo.models.loading import load_components


def _unet(path, dtype=torch.float32):
    return load_components(ModelConfig(pretrained_model_name_or_path=str(path)), dtype).unet


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 32, 32, generator=g)


def _randomise_lora(unet):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_fresh_adapter_equals_base_and_disabled_adapter_is_exactly_base(tiny_sd15):
    base, policy = _unet(tiny_sd15), _unet(tiny_sd15)
    add_lora(policy, LoraConfig())
    x, t, h = _inputs()
    with torch.no_grad():
        expected = base(x, t, h).sample
        assert torch.equal(policy(x, t, h).sample, expected)  # LoRA B = 0 at init: step-0 policy = reference
        _randomise_lora(policy)
        trained = policy(x, t, h).sample
        assert (trained - expected).abs().max() > 1e-3
        with adapters_disabled(policy):
            assert torch.equal(policy(x, t, h).sample, expected)
        assert torch.equal(policy(x, t, h).sample, trained)


def test_state_restored_after_exception(tiny_sd15):
    policy = _unet(tiny_sd15)
    params = add_lora(policy, LoraConfig())
    _randomise_lora(policy)
    x, t, h = _inputs()
    with torch.no_grad():
        trained = policy(x, t, h).sample
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(policy):
            assert not any(p.requires_grad for p in params)
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in policy.parameters()) == len(params)
    with torch.no_grad():
        assert torch.equal(policy(x, t, h).sample, trained)


def test_nested_disable_keeps_disabled(tiny_sd15):
    policy = _unet(tiny_sd15)
    add_lora(policy, LoraConfig())
    _randomise_lora(policy)
    x, t, h = _inputs()
    with torch.no_grad(), adapters_disabled(policy):
        base_out = policy(x, t, h).sample
        with adapters_disabled(policy):
            pass
        assert torch.equal(policy(x, t, h).sample, base_out)  # inner exit must not re-enable


def test_lora_params_fp32_under_bf16_weights(tiny_sd15):
    unet = _unet(tiny_sd15, torch.bfloat16)
    params = add_lora(unet, LoraConfig(r=4, lora_alpha=16))
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if "lora_" not in n)
    assert all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
    assert unet.peft_config["default"].lora_alpha == 16 and unet.peft_config["default"].r == 4


def test_state_dict_round_trip_and_mismatch(tiny_sd15):
    a, b = _unet(tiny_sd15), _unet(tiny_sd15)
    add_lora(a, LoraConfig())
    add_lora(b, LoraConfig())
    _randomise_lora(a)
    load_lora_state_dict(b, lora_state_dict(a))
    x, t, h = _inputs()
    with torch.no_grad():
        assert torch.equal(a(x, t, h).sample, b(x, t, h).sample)
    c = _unet(tiny_sd15)
    add_lora(c, LoraConfig(target_modules=["to_q"]))
    with pytest.raises(ValueError, match="does not match"):
        load_lora_state_dict(c, lora_state_dict(a))


def test_target_modules_matching_nothing(tiny_sd15):
    with pytest.raises(ValueError, match="to_q, to_k"):
        add_lora(_unet(tiny_sd15), LoraConfig(target_modules=["no_such_layer"]))
