"""Generative benchmark on CPU: images and text on the shared core, and the image model as perception.

Images: a class-conditional `ImageModel` per process (diffusion, flow) is trained on scikit-learn's
digits upsampled to 16 x 16 (cached under --out). A classifier of real digits (scikit-learn's
MLPClassifier, one hidden layer of 64, trained on 80 % of the real digits; its accuracy on the other
20 % is the reference) scores 50 generated images per class:

    acc     share of generated digits the classifier recognises as the requested class (chance 0.10)
    FD      Frechet distance between the classifier's hidden features of the generated digits and of
            the held-out real digits (lower is closer; `real` row: training vs held-out real digits)

vs sampling steps (1, 2, 4, 10, 50), with guidance w = 1 (none) and w = 3.

Text: a `TextModel` (masked diffusion, DiT without time input, rotary positions) on the docstrings
of Python's standard library (cached); on the held-out last 10 % of the windows, the likelihood bound in bits per
character, continuous-time and as the K-step bound of K-step random-order unmasking, and one
confidence-ordered sample per K.

Perception: reads the PushT-image runs `PERCEPTION_RUNS` of `benchmarks/generative_perception.sh`
(the same policy trained for the same steps with the ResNet-18 encoder from scratch and with a
PushT image model's DiT, frozen or fine-tuned): training CPU seconds per step from the bash `time`
report in `runs/perception_NAME.log`, the last validation loss from its `log.jsonl`, held-out success
from the run's evaluation `summary.json`.

    python benchmarks/generative.py [--train-steps 1500] [--text-steps 1500] [--out runs/gen/bench]
    python benchmarks/generative.py --only images --image-position rotary   # axial rotary image models
    python benchmarks/generative.py --only text --text-steps N --text-width W --text-depth D --text-batch B \\
        --text-lr LR --text-cosine --text-position learned   # another text model (cached under its own name)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from diffpolicy.generative import ImageModel, ImageModelConfig, TextModel, TextModelConfig, corpus, fit
from diffpolicy.generative.data import digits

SAMPLING_STEPS = (1, 2, 4, 10, 50)
GUIDANCE = (1.0, 3.0)
PER_CLASS = 50
TEXT_STEPS = (1, 4, 16, 64)
IMAGE_BACKBONE = {"hidden_dim": 64, "depth": 2, "num_heads": 4, "time_embed_dim": 64}
TEXT_DEFAULTS = (96, 3, 64, 2e-3, False, "rotary")  # width, depth, batch, lr, cosine decay, DiT position


# ---------------------------------------------------------------------------- images
def digit_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    """An MLP on 80 % of the real digits -> (classifier, held-out images, held-out labels, train images)."""
    from sklearn.neural_network import MLPClassifier

    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(images))
    train, held = order[:split], order[split:]
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
    clf.fit(images[train].flatten(1).numpy(), labels[train].numpy())
    return clf, images[held], labels[held], images[train]


def hidden_features(clf, images: torch.Tensor) -> np.ndarray:
    """The classifier's hidden ReLU activations `(N, 64)`."""
    return np.maximum(images.flatten(1).numpy() @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets `(N, F)`."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # dead hidden units make the covariances singular; sqrtm still converges
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * np.real(root)))


def image_model(kind: str, position: str, images, labels, steps: int, out: Path) -> tuple[ImageModel, float]:
    """Train (or load the cached) digits model of `kind` with the DiT's `position`; -> (model, training seconds)."""
    path = out / (f"digits_{kind}_{steps}" if position == "learned" else f"digits_{kind}_{position}_{steps}")
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = ImageModel(ImageModelConfig(process=kind, backbone={**IMAGE_BACKBONE, "position": position}))
        result = fit(model, lambda i, g: model.loss(images[i], labels[i], g), len(images), steps, 64, 3e-3,
                     warmup=100, seed=0)
        model.save_pretrained(path, {"train_seconds": result.seconds, "train_steps": steps})
    model = ImageModel.from_pretrained(path)
    return model, float(model.metadata["train_seconds"])


def image_table(args: argparse.Namespace) -> list[str]:
    images, labels = digits(16)
    clf, held, held_labels, train = digit_classifier(images, labels)
    real_acc = float((clf.predict(held.flatten(1).numpy()) == held_labels.numpy()).mean())
    held_features = hidden_features(clf, held)
    real_fd = frechet_distance(hidden_features(clf, train), held_features)
    lines = [f"Digits 16 x 16, DiT {IMAGE_BACKBONE['hidden_dim']} wide x {IMAGE_BACKBONE['depth']} blocks, "
             f"{args.image_position} positions, "
             f"{args.train_steps} training steps (batch 64); {PER_CLASS} samples per class. Classifier on "
             f"real held-out digits: acc {real_acc:.3f}; FD(real train, real held-out) = {real_fd:.2f}.",
             "", "| process | train s | guidance w | " + " | ".join(f"{k} steps acc / FD" for k in SAMPLING_STEPS)
             + " | sample ms/image @10 |", "|---|---|---|" + "---|" * (len(SAMPLING_STEPS) + 1)]
    want = torch.arange(10).repeat_interleave(PER_CLASS)
    for kind in ("diffusion", "flow"):
        model, seconds = image_model(kind, args.image_position, images, labels, args.train_steps, args.out)
        for w in GUIDANCE:
            cells, ms = [], float("nan")
            for steps in SAMPLING_STEPS:
                start = time.perf_counter()
                samples = model.generate(want, steps, w, generator=torch.Generator().manual_seed(1))
                if steps == 10:
                    ms = 1000 * (time.perf_counter() - start) / len(want)
                acc = float((clf.predict(samples.flatten(1).numpy()) == want.numpy()).mean())
                cells.append(f"{acc:.3f} / {frechet_distance(hidden_features(clf, samples), held_features):.1f}")
            lines.append(f"| {kind} | {seconds:.0f} | {w:g} | " + " | ".join(cells) + f" | {ms:.1f} |")
            print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------- text
def count_references(train: torch.Tensor, val: torch.Tensor) -> tuple[float, float]:
    """Bits per character of held-out windows `val (M, L)` under count models of the training windows
    `train (N, L)` (add-one smoothing): (unigram, bigram given the previous character, over positions 2..L)."""
    vocab, text = len(corpus.VOCAB), train.flatten()
    unigram = torch.bincount(text, minlength=vocab).double() + 1
    bigram = torch.ones(vocab, vocab, dtype=torch.double)
    bigram.index_put_((text[:-1], text[1:]), torch.ones(len(text) - 1, dtype=torch.double), accumulate=True)
    unigram, bigram = unigram / unigram.sum(), bigram / bigram.sum(1, keepdim=True)
    return (float(-torch.log2(unigram[val.flatten()]).mean()),
            float(-torch.log2(bigram[val[:, :-1], val[:, 1:]]).mean()))


def text_table(args: argparse.Namespace) -> list[str]:
    width, depth = args.text_width, args.text_depth
    backbone = {"hidden_dim": width, "depth": depth, "num_heads": 4, "time_embed_dim": width,
                "position": args.text_position}
    config = TextModelConfig(seq_len=64, backbone=backbone)
    train, val = corpus.windows(corpus.stdlib_docstrings(), config.seq_len)
    setting = (width, depth, args.text_batch, args.text_lr, args.text_cosine, args.text_position)
    path = args.out / (f"text_{args.text_position}_{args.text_steps}" if setting == TEXT_DEFAULTS else
                       f"text_{args.text_position}_{args.text_steps}_w{width}_d{depth}_b{args.text_batch}"
                       f"_lr{args.text_lr:g}" + ("_cos" if args.text_cosine else ""))
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = TextModel(config)
        result = fit(model, lambda i, g: model.loss(train[i], g), len(train), args.text_steps, args.text_batch,
                     args.text_lr, warmup=100, seed=0, cosine=args.text_cosine)
        model.save_pretrained(path, {"train_seconds": result.seconds, "train_steps": args.text_steps})
    model = TextModel.from_pretrained(path)
    val = val[:256]
    schedule = "cosine decay" if args.text_cosine else "constant rate"
    lines = [f"Character-level masked diffusion, L = 64, DiT {width} wide x {depth} blocks without time input, "
             f"{args.text_position} positions, {args.text_steps} training steps (batch {args.text_batch}, lr {args.text_lr:g}, {schedule}, "
             f"{model.metadata['train_seconds']:.0f} s); corpus: {len(train)} training / {len(val)} held-out "
             f"windows of stdlib docstrings (Python {platform.python_version()}); uniform = "
             f"{math.log2(95):.2f} bits/char; count models of the training text: unigram %.2f, bigram %.2f "
             "bits/char." % count_references(train, val), "",
             "| unmasking steps K | bound (bits/char), K-step | sample (confidence-ordered, K steps, temperature 1) |",
             "|---|---|---|"]
    bpc = model.bits_per_character(val, None, generator=torch.Generator().manual_seed(0))
    lines.append(f"| continuous (K -> inf) | {bpc:.3f} | |")
    for k in TEXT_STEPS:
        bpc = model.bits_per_character(val, k, generator=torch.Generator().manual_seed(0))
        text = model.generate(1, k, generator=torch.Generator().manual_seed(2), temperature=1.0)[0]
        text = text.replace("|", "/").replace("`", "'")
        lines.append(f"| {k} | {bpc:.3f} | `{text}` |")
        print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------- perception
def cpu_seconds(path: Path) -> float | None:
    """user + sys seconds of the first bash `time` report in a log (the training command)."""
    if not path.is_file():
        return None
    found = {k: float(m) * 60 + float(s) for k, m, s in re.findall(r"^(user|sys)\s+(\d+)m([\d.]+)s", path.read_text(),
                                                                       re.MULTILINE)[:2]}
    return sum(found.values()) if len(found) == 2 else None


PERCEPTION_RUNS = ("resnet", "dit_velocity_frozen", "dit_sample_frozen", "dit_sample_finetuned")


def image_model_column(encoder: dict) -> str:
    """What the DiT backbone started from: the image model's process, output, steps and final loss."""
    init = (encoder.get("image_backbone") or {}).get("init")
    if not init:
        return "-"
    model = json.loads((Path(init) / "config.json").read_text())
    config, meta = model["config"], model["metadata"]
    output = "velocity" if config["process"] == "flow" else config["prediction"]
    return f"{config['process']}, predicts {output}, {meta['train_steps']} steps, loss {meta['final_loss']:.3f}"


def perception_table(args: argparse.Namespace) -> list[str]:
    lines = ["| encoder | image model (DiT start) | train steps | encoder params (trainable) | train CPU s/step "
             "| validation loss, end | held-out success |", "|---|---|---|---|---|---|---|"]
    for name in PERCEPTION_RUNS:
        run = Path("runs/gen") / f"policy_{name}"
        if not (run / "config.json").is_file():
            continue
        config = json.loads((run / "config.json").read_text())
        steps = config["train"]["steps"]
        start = image_model_column(config["policy"]["encoder"])
        val = [row["val_loss"] for row in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "val_loss" in row]
        cpu = cpu_seconds(Path(f"runs/perception_{name}.log"))
        summaries = sorted(run.glob("checkpoints/*/eval_*/summary.json"))
        success = "not evaluated"
        if summaries:
            s = json.loads(summaries[-1].read_text())
            rate = s["success_rate"]
            success = (f"{rate['rate']:.2f} [{rate['ci95_low']:.2f}, {rate['ci95_high']:.2f}] of "
                       f"{s['episodes']} (mean coverage {s['mean_coverage']:.3f})")
        from diffpolicy.policies import ChunkPolicy
        checkpoints = sorted((run / "checkpoints").glob("step_*"))
        params = "?"
        if checkpoints:
            policy = ChunkPolicy.from_pretrained(checkpoints[-1] / "policy")
            encoder = policy.obs_encoder.image_encoders
            total = sum(p.numel() for p in encoder.parameters())
            trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
            params = f"{total / 1e6:.2f} M ({trainable / 1e6:.2f} M)"
        per_step = f"{cpu / steps:.2f}" if cpu is not None else "?"
        val_loss = f"{val[-1]:.4f}" if val else "?"
        lines.append(f"| {name} | {start} | {steps} | {params} | {per_step} | {val_loss} | {success} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=1500, help="image model training steps")
    parser.add_argument("--image-position", choices=("learned", "rotary", "both"), default="learned",
                        help="image models: the DiT's position encoding (rotary: axial over the patch grid)")
    parser.add_argument("--text-steps", type=int, default=1500, help="text model training steps")
    width, depth, batch, lr, _, position = TEXT_DEFAULTS
    parser.add_argument("--text-width", type=int, default=width, help="text model DiT width")
    parser.add_argument("--text-depth", type=int, default=depth, help="text model DiT blocks")
    parser.add_argument("--text-batch", type=int, default=batch, help="text model batch size")
    parser.add_argument("--text-lr", type=float, default=lr, help="text model learning rate")
    parser.add_argument("--text-cosine", action="store_true", help="text model: cosine decay of the rate")
    parser.add_argument("--text-position", choices=("rotary", "learned"), default=position,
                        help="text model: the DiT's position encoding")
    parser.add_argument("--out", type=Path, default=Path("runs/gen/bench"), help="cache of trained models")
    parser.add_argument("--only", choices=("images", "text", "perception"), default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    tables = {"images": image_table, "text": text_table, "perception": perception_table}
    for name, table in tables.items():
        if args.only in (None, name):
            print(f"\n## {name}\n" + "\n".join(table(args)), flush=True)


if __name__ == "__main__":
    main()
