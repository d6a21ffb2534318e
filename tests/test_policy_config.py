"""PolicyConfig: defaults, JSON round trip, and errors that name the bad key."""

import dataclasses
import json

import pytest

from diffpolicy.policies import ConfigError, LossConfig, PolicyConfig, ProcessConfig, diffusion_process, flow_process


def base(**overrides):
    return {"obs_shapes": {"state": [20], "image": [96, 96, 3]}, "image_keys": ["image"], "action_dim": 2,
            **overrides}


def test_defaults_are_diffusion_policy_defaults():
    config = PolicyConfig(obs_shapes={"state": (20,)}, action_dim=2)
    assert (config.obs_horizon, config.pred_horizon, config.action_horizon) == (2, 16, 8)
    assert config.process == ProcessConfig(type="diffusion", schedule={"name": "cosine"}, prediction="epsilon",
                                           train_steps=100, eta=1.0, clip=1.0)
    assert config.inference_steps == 100
    assert config.loss == LossConfig(weighting="uniform", min_snr_gamma=5.0, mask_padding=False)


def test_round_trip_through_json():
    config = PolicyConfig.from_dict(base(process=dataclasses.asdict(flow_process(step_std=0.1)),
                                         loss={"weighting": "min_snr", "min_snr_gamma": 3.0, "mask_padding": True}))
    assert isinstance(config.process, ProcessConfig) and config.process.type == "flow"
    again = PolicyConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.obs_shapes == {"state": (20,), "image": (96, 96, 3)}
    assert again.low_dim_keys == ("state",)


def test_process_defaults_depend_on_type():
    assert diffusion_process().train_steps == 100
    flow = flow_process()
    assert (flow.schedule, flow.prediction, flow.eta, flow.train_steps, flow.clip) == (None, None, None, None, 1.0)


@pytest.mark.parametrize("data, message", [
    (base(extra=1), r"unknown config key 'extra'; expected keys of PolicyConfig"),
    ({"obs_shapes": {"state": [2]}}, r"missing config key 'action_dim'"),
    (base(action_dim="2"), r"'action_dim': expected an integer, got '2' \(str\)"),
    (base(action_dim=0), r"'action_dim': expected an integer >= 1, got 0"),
    (base(action_horizon=17), r"'action_horizon': expected at most pred_horizon = 16, got 17"),
    (base(obs_shapes={"state": [20], "image": [96, 96]}), r"'obs_shapes.image': expected an image shape \[H, W, 3\]"),
    (base(obs_shapes={"state": [2, 3], "image": [8, 8, 3]}), r"'obs_shapes.state': expected a low-dim shape \[d\]"),
    (base(image_keys=["camera"]), r"'image_keys': expected keys of obs_shapes"),
    (base(process={"type": "ddim"}), r"'process.type': expected one of \['diffusion', 'flow'\], got 'ddim'"),
    (base(process={"type": "diffusion", "prediction": "x0"}),
     r"'process.prediction': expected one of \['epsilon', 'sample', 'v'\], got 'x0'"),
    (base(process={"type": "diffusion", "schedule": {"name": "quadratic"}}),
     r"'process.schedule.name': expected one of \['cosine', 'linear', 'sigmoid'\]"),
    (base(process={"type": "diffusion", "eta": 1.5}), r"'process.eta': expected a number <= 1, got 1.5"),
    (base(process={"type": "flow", "step_std": float("nan")}), r"'process.step_std': expected a finite number"),
    (base(process={"type": "flow", "eta": 0.0}), r"'process.eta': expected null for type 'flow'"),
    (base(process={"type": "flow", "train_steps": 0}), r"'process.train_steps': expected an integer >= 1, got 0"),
    (base(process={"type": "flow", "clip": -1}), r"'process.clip': expected a number > 0, got -1"),
    (base(process={"type": "flow", "typo": 1}), r"unknown config key 'process.typo'; expected keys of ProcessConfig"),
    (base(loss={"weighting": "snr"}), r"'loss.weighting': expected one of \['uniform', 'min_snr'\], got 'snr'"),
    (base(loss={"mask_padding": 1}), r"'loss.mask_padding': expected a bool, got 1"),
    (base(backbone={"hidden_dim": 3}), r"'backbone.type': expected a string naming the kind, got None"),
    (base(encoder={"image_keys": ["image"]}), r"'encoder.image_keys': expected no such key"),
    (base(inference_steps=1.5), r"'inference_steps': expected an integer, got 1.5"),
    (base(obs_shapes={"action": [2]}, image_keys=[]), r"'obs_shapes': expected keys that are non-empty strings"),
    ([1, 2], r"'<root>': expected a dict with keys of PolicyConfig"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        PolicyConfig.from_dict(data)
