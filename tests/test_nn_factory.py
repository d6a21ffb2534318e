"""make_backbone: types, defaults, overrides and clear errors for bad configs."""

import pytest
import torch
from torch import nn

from diffpolicy.nn import BACKBONE_DEFAULTS, ConditionalUnet1D, DiT, MLPDenoiser, NNConfigError, make_backbone


@pytest.mark.parametrize("kind,cls", [("unet", ConditionalUnet1D), ("dit", DiT), ("mlp", MLPDenoiser)])
def test_make_backbone_builds_each_type(kind, cls):
    model = make_backbone({"type": kind}, action_dim=2, horizon=8, cond_dim=5)
    assert type(model) is cls
    assert model(torch.randn(3, 8, 2), torch.rand(3, 8), torch.randn(3, 5)).shape == (3, 8, 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_overrides_replace_defaults():
    model = make_backbone({"type": "unet", "down_dims": [16, 32], "time_embed_dim": 8}, 2, 8, 0)
    assert [level[0].conv1[0].out_channels for level in model.down_levels] == [16, 32]
    assert BACKBONE_DEFAULTS["unet"]["down_dims"] == [64, 128, 256]  # the defaults table is not mutated
    model = make_backbone({"type": "dit", "depth": 2}, 2, 8, 0)
    assert len(model.blocks) == 2


def test_bad_configs_raise_clear_errors():
    expected = r"unknown backbone type 'transformer'; expected one of \['dit', 'mlp', 'unet'\]"
    with pytest.raises(NNConfigError, match=expected):
        make_backbone({"type": "transformer"}, 2, 8, 0)
    with pytest.raises(NNConfigError, match="mapping with a 'type'"):
        make_backbone({"down_dims": [16]}, 2, 8, 0)
    expected = r"type='unet'.*unknown config key\(s\) \['down_dim'\]; allowed keys are \['down_dims'"
    with pytest.raises(NNConfigError, match=expected):
        make_backbone({"type": "unet", "down_dim": [16]}, 2, 8, 0)
    with pytest.raises(NNConfigError, match=r"type='mlp'.*unknown config key\(s\) \['horizon'\]"):
        make_backbone({"type": "mlp", "horizon": 4}, 2, 8, 0)
    with pytest.raises(NNConfigError, match="type='unet'.*multiples of n_groups=8"):
        make_backbone({"type": "unet", "down_dims": [12]}, 2, 8, 0)
    with pytest.raises(NNConfigError, match="type='dit'.*invalid config value"):
        make_backbone({"type": "dit", "depth": "four"}, 2, 8, 0)
