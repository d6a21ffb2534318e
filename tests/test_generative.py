"""diffpolicy.generative: one DiT class and one sampler loop for actions, image patches and text;
learning (digits recognised by a classifier of real digits, text below the uniform bits per
character); save -> load; the image model as a policy's perception backbone; bad input."""

import math
import shutil
from dataclasses import replace

import pytest
import torch
from policy_helpers import IMAGE, make_config, make_normalizer, make_obs

import diffpolicy.core.samplers as samplers
from diffpolicy.core import ClassifierFreeGuidance, PrefixInpainting
from diffpolicy.errors import DiffpolicyError, MissingFileError
from diffpolicy.generative import (
    ImageModel,
    ImageModelConfig,
    TextModel,
    TextModelConfig,
    corpus,
    fit,
    patchify,
    unpatchify,
)
from diffpolicy.generative import image_model as image_model_module
from diffpolicy.generative import text_model as text_model_module
from diffpolicy.nn import DiT, DiTImageEncoder, NNConfigError
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies import chunk_policy as chunk_policy_module

TINY_DIT = {"hidden_dim": 32, "depth": 1, "num_heads": 4, "time_embed_dim": 32}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_image_model(kind="flow", num_classes=10, image_size=8, channels=1, patch_size=2, position="learned",
                     prediction="v"):
    torch.manual_seed(0)
    return ImageModel(ImageModelConfig(image_size=image_size, channels=channels, patch_size=patch_size,
                                       num_classes=num_classes, process=kind, prediction=prediction,
                                       backbone={**TINY_DIT, "position": position}))


def trained_a_little(model, steps=5):
    """A few optimizer steps so that the adaLN-Zero output layers are no longer zero."""
    c, s = model.config.channels, model.config.image_size
    images = torch.rand(16, c, s, s, generator=gen(0)) * 2 - 1
    labels = torch.arange(16) % model.config.num_classes if model.config.num_classes else None
    fit(model, lambda i, g: model.loss(images[i], None if labels is None else labels[i], g), 16, steps, 8, 1e-2,
        warmup=0)
    return model


@pytest.mark.parametrize("cosine", [False, True])
def test_fit_moves_a_parameter_by_the_sum_of_its_learning_rates(cosine):
    """Loss = p (gradient 1): every AdamW step moves p by exactly its rate (m_hat / sqrt(v_hat) = 1), so the
    total move is the schedule's sum: linear warm-up, then constant or a cosine ending near 0."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    steps, warmup, lr = 40, 10, 1e-3
    fit(model, lambda i, g: model.weight.sum(), 4, steps, batch_size=2, lr=lr, warmup=warmup, cosine=cosine)
    rates = [lr * (k + 1) / warmup for k in range(warmup - 1)]
    after = range(warmup - 1, steps)
    if cosine:
        rates += [lr * 0.5 * (1 + math.cos(math.pi * (k + 1 - warmup) / (steps + 1 - warmup))) for k in after]
    else:
        rates += [lr] * len(after)
    assert rates[-1] < (0.01 * lr if cosine else 1.01 * lr)
    assert float(-model.weight.detach()) == pytest.approx(sum(rates), rel=1e-5)


def test_patchify_is_row_major_and_exactly_inverted():
    images = torch.randn(2, 3, 8, 12, generator=gen(0))
    tokens = patchify(images, 4)
    assert tokens.shape == (2, 6, 48)
    assert torch.equal(tokens[:, 1], images[:, :, 0:4, 4:8].reshape(2, 48))  # second patch: top row, second column
    assert torch.equal(tokens[:, 3], images[:, :, 4:8, 0:4].reshape(2, 48))
    assert torch.equal(unpatchify(tokens, 4, 3, 8, 12), images)


def test_one_dit_class_and_one_sampler_loop_for_actions_patches_and_text():
    policy = ChunkPolicy(replace(make_config(), backbone={"type": "dit", **TINY_DIT}), make_normalizer())
    image = trained_a_little(tiny_image_model())
    text = TextModel(TextModelConfig(seq_len=8, backbone=TINY_DIT))
    assert type(policy.backbone) is DiT and type(image.denoiser) is DiT and type(text.denoiser) is DiT
    assert chunk_policy_module.run_sampler is samplers.sample
    assert image_model_module.sample is samplers.sample and text_model_module.sample is samplers.sample

    # the image model's samples are exactly the core loop run on its patch tokens
    labels = torch.tensor([3, 7])
    g = gen(5)
    x_init = torch.randn(2, 16, 4, generator=g)
    cond = torch.nn.functional.one_hot(labels, 10).float()
    expected = samplers.sample(image.denoiser, image.process, x_init, 3, cond=cond, generator=g,
                               guidance=ClassifierFreeGuidance(2.0, torch.zeros(10))).x0
    got = image.generate(labels, steps=3, guidance_scale=2.0, generator=gen(5))
    assert torch.equal(got, unpatchify(expected, 2, 1, 8, 8).clamp(-1, 1))

    # the text model's samples are exactly the core loop run on its one-hot tokens
    prompt = corpus.encode("ab")
    x_init = text.process.all_masked(2, 8)
    prefix = text.process.encode(prompt.expand(2, 2).contiguous())
    expected = samplers.sample(text.denoiser, text.process, x_init, 4, guidance=PrefixInpainting(prefix),
                               generator=gen(6)).x0
    got = text.generate(2, 4, prompt="ab", generator=gen(6))
    assert got == [corpus.decode(ids) for ids in text.process.decode(expected)]
    assert all(s.startswith("ab") and len(s) == 8 for s in got)


@pytest.fixture(scope="module")
def digit_classifier():
    """Logistic regression on the real digits at a given size (8: the originals, 16: upsampled)."""
    from sklearn.linear_model import LogisticRegression

    from diffpolicy.generative.data import digits
    cache = {}

    def classifier(size):
        if size not in cache:
            images, labels = digits(size)
            cache[size] = LogisticRegression(max_iter=1000).fit(images.flatten(1).numpy(), labels.numpy())
        return cache[size]
    return classifier


def digits_accuracy(classifier, kind, size, patch, train_steps, steps):
    """Train a tiny class-conditional model on the digits and return the classifier's accuracy on
    10 guided samples of each class."""
    from diffpolicy.generative.data import digits
    torch.manual_seed(0)
    images, labels = digits(size)
    model = ImageModel(ImageModelConfig(image_size=size, patch_size=patch, process=kind,
                                        backbone={**TINY_DIT, "hidden_dim": 64, "depth": 2}))
    fit(model, lambda i, g: model.loss(images[i], labels[i], g), len(images), train_steps, 64, 3e-3, warmup=50)
    want = torch.arange(10).repeat(10)
    samples = model.generate(want, steps=steps, guidance_scale=3.0, generator=gen(1))
    return float((classifier(size).predict(samples.flatten(1).numpy()) == want.numpy()).mean())


def test_tiny_image_model_draws_digits_a_classifier_of_real_digits_recognises(digit_classifier):
    """200 steps on the original 8 x 8 digits (2 x 2 patches, about 10 s on one core): guided samples
    of each class are recognised far above chance (10 %)."""
    assert digits_accuracy(digit_classifier, "flow", 8, 2, 200, 8) >= 0.6


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_image_model_draws_recognisable_upsampled_digits(digit_classifier, kind):
    """600 steps on the digits upsampled to 16 x 16 (4 x 4 patches)."""
    assert digits_accuracy(digit_classifier, kind, 16, 4, 600, 10) >= 0.6


def test_tiny_text_model_learns_the_corpus_below_uniform_bits_per_character():
    train, val = corpus.windows(corpus.stdlib_docstrings(("json", "textwrap", "heapq")), 16)
    torch.manual_seed(0)
    model = TextModel(TextModelConfig(seq_len=16, backbone={**TINY_DIT, "position": "rotary"}))
    uniform = torch.log2(torch.tensor(95.0)).item()
    before = model.bits_per_character(val, steps=16, generator=gen(0))
    assert abs(before - uniform) < 0.15  # an untrained DiT outputs zero logits: uniform over 95 symbols
    fit(model, lambda i, g: model.loss(train[i], g), len(train), 150, 32, 3e-3, warmup=20)
    after = model.bits_per_character(val, steps=16, generator=gen(0))
    assert after < uniform - 1.5


@pytest.mark.parametrize("kind, position", [("diffusion", "learned"), ("flow", "learned"), ("flow", "rotary")])
def test_image_model_save_load_gives_identical_samples(tmp_path, kind, position):
    model = trained_a_little(tiny_image_model(kind, position=position))
    model.save_pretrained(tmp_path / "m")
    loaded = ImageModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    labels = torch.tensor([0, 5, 9])
    a = model.generate(labels, 4, 2.0, generator=gen(3))
    b = loaded.generate(labels, 4, 2.0, generator=gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, loaded.generate(labels, 4, 2.0, generator=gen(4)))


def test_text_model_save_load_gives_identical_samples(tmp_path):
    model = TextModel(TextModelConfig(seq_len=12, temperature=1.0, backbone=TINY_DIT))
    train, _ = corpus.windows(corpus.stdlib_docstrings(("json",)), 12)
    fit(model, lambda i, g: model.loss(train[i], g), len(train), 5, 8, 1e-2, warmup=0)
    model.save_pretrained(tmp_path / "t")
    loaded = TextModel.from_pretrained(tmp_path / "t")
    assert model.generate(3, 5, "The", generator=gen(2)) == loaded.generate(3, 5, "The", generator=gen(2))
    with pytest.raises(DiffpolicyError, match="holds a text_model checkpoint, expected a image_model"):
        ImageModel.from_pretrained(tmp_path / "t")


def pusht_like_model(position="learned"):
    """An unconditional image model over 12 x 12 crops of the policies' 16 x 16 test images (its
    tokens hold 48 values, more than the DiT's 32 features: it predicts the clean image)."""
    return tiny_image_model("diffusion", num_classes=0, image_size=12, channels=3, patch_size=4, position=position,
                            prediction="sample")


def dit_encoder_config(init, freeze, position="learned"):
    return {"crop_shape": [12, 12], "image_feature_dim": 8,
            "image_backbone": {"type": "dit", "patch_size": 4, **TINY_DIT, "position": position, "init": init,
                               "freeze": freeze}}


@pytest.mark.parametrize("freeze, position", [(True, "learned"), (False, "learned"), (True, "both")])
def test_image_model_is_a_policy_perception_backbone(tmp_path, freeze, position):
    image_model = trained_a_little(pusht_like_model(position))
    image_model.save_pretrained(tmp_path / "pusht_dit")
    config = replace(make_config(images=True), encoder=dit_encoder_config(str(tmp_path / "pusht_dit"), freeze,
                                                                          position))
    policy = ChunkPolicy(config, make_normalizer(images=True))
    encoder = policy.obs_encoder.image_encoders[0]
    assert isinstance(encoder, DiTImageEncoder)
    for name, tensor in image_model.denoiser.state_dict().items():
        assert torch.equal(encoder.dit.state_dict()[name], tensor), name
    # the features are the image model's: the encoder runs its DiT at t = 0 on the crop's patches
    images = torch.randint(0, 256, (2, *IMAGE), dtype=torch.uint8, generator=gen(0))
    encoder.eval()
    crop = images[:, 2:14, 2:14].permute(0, 3, 1, 2).float() / 127.5 - 1
    tokens = patchify(crop, 4)
    expected, _ = image_model.denoiser.features(tokens, torch.zeros(2, 9), None)
    assert torch.allclose(encoder.projection(encoder.token_projection(expected).flatten(1)), encoder(images))
    # frozen: no gradient reaches the DiT; fine-tuned: it does
    policy.train()
    batch = {"obs": make_obs(images=True), "action": 150 + torch.zeros(4, 6, 2)}
    policy.compute_loss(batch, gen(0)).backward()
    dit_grads = [p.grad for p in encoder.dit.parameters()]
    assert all(g is None for g in dit_grads) if freeze else any(g is not None for g in dit_grads)
    assert encoder.projection.weight.grad is not None
    # the policy's checkpoint holds every weight: it loads after the image model is gone
    policy.save_pretrained(tmp_path / "policy")
    shutil.rmtree(tmp_path / "pusht_dit")
    loaded = ChunkPolicy.from_pretrained(tmp_path / "policy")
    obs = make_obs(batch=2, images=True)
    assert torch.equal(policy.eval().sample(obs, generator=gen(1)), loaded.sample(obs, generator=gen(1)))


def test_perception_backbone_bad_config(tmp_path):
    with pytest.raises(MissingFileError, match="has no model.safetensors"):
        ChunkPolicy(replace(make_config(images=True), encoder=dit_encoder_config(str(tmp_path / "none"), True)),
                    make_normalizer(images=True))
    other = tiny_image_model("diffusion", num_classes=0, image_size=12, channels=3, patch_size=6, prediction="sample")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(NNConfigError, match="does not match this encoder's DiT"):
        ChunkPolicy(replace(make_config(images=True), encoder=dit_encoder_config(str(tmp_path / "other"), True)),
                    make_normalizer(images=True))
    pusht_like_model("rotary").save_pretrained(tmp_path / "rotary")  # read by an encoder of learned positions
    with pytest.raises(NNConfigError, match="does not match this encoder's DiT.*position 'learned'"):
        ChunkPolicy(replace(make_config(images=True), encoder=dit_encoder_config(str(tmp_path / "rotary"), True)),
                    make_normalizer(images=True))
    with pytest.raises(NNConfigError, match="image_backbone must be None"):
        ChunkPolicy(replace(make_config(images=True), encoder={"image_backbone": {"type": "vit"}}), make_normalizer(images=True))
    with pytest.raises(NNConfigError, match="patch_size must be an int >= 1 dividing the crop side 12"):
        DiTImageEncoder(IMAGE, (12, 12), patch_size=5)


def test_bad_input_raises_clear_errors():
    model = tiny_image_model()
    with pytest.raises(DiffpolicyError, match=r"class ids in 0..9"):
        model.generate(torch.tensor([3, 10]))
    with pytest.raises(DiffpolicyError, match=r"images must be float \(B, C, H, W\) = \(B, 1, 8, 8\)"):
        model.loss(torch.zeros(2, 1, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(DiffpolicyError, match=r"labels must be a 1-D tensor"):
        model.generate(torch.tensor(3))
    with pytest.raises(DiffpolicyError, match="give labels"):
        model.generate(None)
    with pytest.raises(DiffpolicyError, match="guidance needs a class-conditional model"):
        tiny_image_model(num_classes=0).generate(None, count=2, guidance_scale=2.0)
    with pytest.raises(DiffpolicyError, match="patch_size"):
        ImageModelConfig(image_size=16, patch_size=5)
    with pytest.raises(DiffpolicyError, match=r"config key 'process': expected one of \['diffusion', 'flow'\]"):
        ImageModelConfig(process="gan")
    # a DiT narrower than its tokens (32 < 3 x 4 x 4) can output a clean image but not the noise
    for process, prediction in (("flow", "v"), ("diffusion", "epsilon"), ("diffusion", "v")):
        with pytest.raises(DiffpolicyError, match=r"'backbone.hidden_dim': 32 is below the token size 48 \(3 x 4 x 4\)"):
            ImageModelConfig(image_size=12, channels=3, patch_size=4, process=process, prediction=prediction,
                             backbone=TINY_DIT)
    ImageModelConfig(image_size=12, channels=3, patch_size=4, process="diffusion", prediction="sample", backbone=TINY_DIT)
    text = TextModel(TextModelConfig(seq_len=8, backbone=TINY_DIT))
    with pytest.raises(DiffpolicyError, match="must be shorter than seq_len = 8"):
        text.generate(1, 2, prompt="x" * 8)
    with pytest.raises(DiffpolicyError, match="outside printable ASCII"):
        text.generate(1, 2, prompt="é")
    with pytest.raises(DiffpolicyError, match=r"integer ids \(B, L = 8\)"):
        text.loss(torch.zeros(2, 8))
    with pytest.raises(DiffpolicyError, match="time_input"):
        TextModelConfig(backbone={"time_input": True})


def test_generate_command_trains_writes_a_png_grid_and_samples_text(tmp_path, capsys):
    from PIL import Image

    from diffpolicy.cli import main
    small = ["--hidden-dim", "32", "--depth", "1", "--batch-size", "8"]
    assert main(["generate", "image", "--model", str(tmp_path / "img"), "--train-steps", "2", "--steps", "2",
                 "--per-class", "3", "--out", str(tmp_path / "grid.png"), *small]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * (16 * 4 + 1) + 1, 10 * (16 * 4 + 1) + 1)
    capsys.readouterr()
    assert main(["generate", "image", "--model", str(tmp_path / "img"), "--train-steps", "2"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["generate", "image", "--model", str(tmp_path / "flow_x0"), "--train-steps", "2", "--process", "flow",
                 "--prediction", "sample"]) == 2
    assert "--prediction is for --process diffusion" in capsys.readouterr().err
    assert main(["generate", "image", "--model", str(tmp_path / "dev"), "--train-steps", "2", "--device", "gpu0"]) == 2
    assert "expected 'auto', 'cpu', 'cuda'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "image", "--model", str(tmp_path / "dev"), "--train-steps", "2",
                     "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["generate", "text", "--model", str(tmp_path / "none")]) == 2
    assert "holds no model; train one with --train-steps N" in capsys.readouterr().err
    assert main(["generate", "text", "--model", str(tmp_path / "txt"), "--train-steps", "2", "--steps", "4",
                 "--count", "2", "--prompt", "Return", *small]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert all(line.startswith("Return") and len(line) == 64 for line in lines)


def test_model_directory_errors_name_the_file(tmp_path):
    with pytest.raises(MissingFileError, match="no config.json; save a image_model there first"):
        ImageModel.from_pretrained(tmp_path / "none")
    model = tiny_image_model()
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    with pytest.raises(DiffpolicyError, match="sha256 differs"):
        ImageModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(DiffpolicyError, match="not valid JSON"):
        ImageModel.from_pretrained(tmp_path / "m")
