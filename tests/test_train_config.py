"""Typed training config: method defaults, task card, validated `key=value` overrides."""

import json

import pytest
import yaml

from diffpolicy.envs.tasks import load_task
from diffpolicy.policies.errors import ConfigError
from diffpolicy.train.config import TrainConfig, apply_cli_overrides, build_config, config_for_run


def test_card_and_method_defaults():
    card = load_task("pusht")
    for method in ("diffusion", "flow"):
        config = build_config("pusht", method)
        assert config.task == "pusht" and config.method == method
        assert config.policy.process.type == method
        assert config.policy.obs_shapes == card.obs_shapes
        assert config.policy.action_dim == card.action_dim
        assert (config.policy.obs_horizon, config.policy.pred_horizon, config.policy.action_horizon) == (2, 16, 8)
        assert config.data.path == card.dataset["path"]
    diffusion = build_config("lift", "diffusion").policy.process  # the method's defaults
    assert (diffusion.eta, diffusion.prediction, diffusion.train_steps) == (1.0, "epsilon", 100)
    assert build_config("pusht", "diffusion").policy.process.prediction == "sample"  # the PushT card's choice


def test_image_task_gets_image_keys_and_a_crop():
    config = build_config("pusht_image", "flow")
    assert config.policy.image_keys == ("image",)
    assert config.policy.encoder["crop_shape"] == [84, 84]


def test_overrides_are_typed():
    config = build_config("pusht", "flow", ["optim.lr=3e-4", "train.steps=1e4", "train.bf16=false",
                                            "optim.betas=[0.9, 0.99]", "optim.grad_clip=none",
                                            "policy.backbone.num_blocks=2", "eval.inference_steps=3"])
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.train.steps == 10000 and isinstance(config.train.steps, int)
    assert config.train.bf16 is False
    assert config.optim.betas == [0.9, 0.99]
    assert config.optim.grad_clip is None
    assert config.policy.backbone["num_blocks"] == 2
    assert config.eval.inference_steps == 3


def test_a_whole_dict_can_be_replaced():
    config = build_config("pusht", "diffusion", ["policy.backbone={type: mlp, hidden_dim: 64}"])
    assert config.policy.backbone == {"type": "mlp", "hidden_dim": 64}


@pytest.mark.parametrize("override, close", [
    ("optim.lrr=1e-3", "optim.lr"),
    ("lr=1e-3", "optim.lr"),
    ("train.step=5", "train.steps"),
    ("policy.backbone.hiden_dim=8", "policy.backbone.hidden_dim"),
])
def test_unknown_key_lists_close_matches(override, close):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        build_config("pusht", "diffusion", [override])
    assert close in str(info.value)


@pytest.mark.parametrize("override, expected", [
    ("train.steps=abc", "int"),
    ("train.steps=2.5", "int"),
    ("optim.lr=fast", "float"),
    ("train.bf16=maybe", "bool"),
    ("optim.betas=0.9", "list"),
    ("optim.betas=[a, b]", "float"),
    ("policy.backbone.hidden_dim=wide", "int"),
])
def test_wrong_type_names_key_type_and_value(override, expected):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as info:
        build_config("pusht", "diffusion", [override])
    message = str(info.value)
    assert repr(key) in message and expected in message and value.split(",")[0].strip("[") in message


@pytest.mark.parametrize("override", ["task=lift", "method=flow", "policy.process.type=flow", "noequals",
                                      "policy.obs_horizon=0", "train.steps=0", "train.ema_every=0", "policy=1"])
def test_invalid_overrides_are_refused(override):
    with pytest.raises(ConfigError):
        build_config("pusht", "diffusion", [override])


def test_json_round_trip_and_resume_config(tmp_path):
    config = build_config("pusht", "flow", ["train.steps=77", "policy.backbone.hidden_dim=16"])
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 77
    # resuming takes the saved config (not the defaults), then applies the new overrides
    resumed = config_for_run("pusht", "flow", ["train.steps=100"], tmp_path, resume=True)
    assert resumed.train.steps == 100 and resumed.policy.backbone["hidden_dim"] == 16
    with pytest.raises(ConfigError, match="--policy"):
        config_for_run("pusht", "diffusion", [], tmp_path, resume=True)


def test_saved_config_with_unknown_key_is_refused(tmp_path):
    data = build_config("pusht", "flow").to_dict()
    data["train"]["stepz"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="stepz"):
        TrainConfig.load(tmp_path / "config.json")


def test_card_train_section_overrides_defaults(tmp_path):
    card = yaml.safe_load(open(load_task("pusht").source))
    card["train"] = {"train.steps": 1234, "optim.lr": 0.002}
    path = tmp_path / "pusht_tuned.yaml"
    path.write_text(yaml.safe_dump(card))
    config = build_config(str(path), "diffusion")
    assert (config.train.steps, config.optim.lr) == (1234, 0.002)
    assert apply_cli_overrides(config, ["train.steps=5"]).train.steps == 5
    card["train"] = {"train.stepz": 1}
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match="pusht_tuned.yaml"):
        build_config(str(path), "diffusion")


def test_card_train_section_per_method(tmp_path):
    card = yaml.safe_load(open(load_task("pusht").source))
    card["train"] = {"train.steps": 1234, "diffusion": {"policy.process.prediction": "sample", "train.steps": 99},
                     "flow": {"policy.inference_steps": 7}}
    path = tmp_path / "pusht_tuned.yaml"
    path.write_text(yaml.safe_dump(card))
    diffusion, flow = build_config(str(path), "diffusion"), build_config(str(path), "flow")
    assert (diffusion.train.steps, diffusion.policy.process.prediction, diffusion.policy.inference_steps) == (99, "sample", 10)
    assert (flow.train.steps, flow.policy.process.prediction, flow.policy.inference_steps) == (1234, None, 7)
    # a method's own key wins even where a broader common key comes after it
    card["train"] = {"policy.backbone.hidden_dim": 64, "policy.backbone": {"type": "mlp", "hidden_dim": 32},
                     "flow": {"policy.backbone.hidden_dim": 128}}
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    assert build_config(str(path), "flow").policy.backbone == {"type": "mlp", "hidden_dim": 128}


@pytest.mark.parametrize("section, match", [
    ({"diffusion": 3}, "'diffusion' must be a mapping"),
    ({"flow": {"policy.process.prediction": "sample"}}, "process.prediction"),  # a diffusion-only key
])
def test_card_train_section_per_method_bad_input(tmp_path, section, match):
    card = yaml.safe_load(open(load_task("pusht").source))
    card["train"] = section
    path = tmp_path / "pusht_tuned.yaml"
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match=match) as info:
        build_config(str(path), "flow")
    assert str(info.value).count("pusht_tuned.yaml") == 1
