"""`diffpolicy generate image|text`: train (optional) and sample the generative models.

    diffpolicy generate image --model runs/gen/digits_flow --train-steps 3000 --process flow
    diffpolicy generate image --model runs/gen/digits_flow --steps 4 --guidance 3 --out digits.png
    diffpolicy generate image --model runs/gen/pusht_dit --data pusht --train-steps 3000 --out pusht.png
    diffpolicy generate image --model runs/gen/pusht_dit --data pusht --train-steps 20000 --device cuda
    diffpolicy generate text --model runs/gen/text --train-steps 4000
    diffpolicy generate text --model runs/gen/text --steps 16 --prompt "Return the " --count 4

With `--train-steps N` a new model is trained into `--model` first (an existing model there is an
error unless `--overwrite`); without it the model is loaded from `--model`.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from diffpolicy.errors import ExistingFileError, MissingFileError, UsageError
from diffpolicy.fsutil import atomic_write_text
from diffpolicy.generative import ImageModel, ImageModelConfig, TextModel, TextModelConfig, corpus, fit
from diffpolicy.generative.data import digits, pusht_frames, random_crops
from diffpolicy.generative.grid import write_png_grid
from diffpolicy.generative.image_model import PREDICTIONS
from diffpolicy.nn.device import resolve_device

PUSHT_FRAMES = 2000  # rendered initial states the PushT image model trains on
PUSHT_CROP = 84      # the policies' crop of the 96 x 96 PushT image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("modality", choices=("image", "text"))
    parser.add_argument("--model", required=True, help="model directory (written by --train-steps, else read)")
    parser.add_argument("--train-steps", type=int, default=None, help="train a new model for N steps first")
    parser.add_argument("--overwrite", action="store_true", help="with --train-steps: replace an existing model")
    parser.add_argument("--data", choices=("digits", "pusht"), default="digits",
                        help="image data: scikit-learn digits (class-conditional) or PushT frames (unconditional)")
    parser.add_argument("--process", choices=("diffusion", "flow"), default=None,
                        help="image process (default: flow for digits; diffusion for PushT, whose 12 x 12 patches "
                             "hold 432 values, more than the DiT's width)")
    parser.add_argument("--prediction", choices=PREDICTIONS, default=None,
                        help="diffusion: what the network predicts (default: v for digits, the clean image for "
                             "PushT: a DiT narrower than its tokens can output the image but not the noise)")
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (text: unmasking steps)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (digits)")
    parser.add_argument("--per-class", type=int, default=8, help="digits: images per class in the grid")
    parser.add_argument("--count", type=int, default=16, help="PushT images / texts to generate")
    parser.add_argument("--prompt", default="", help="text: fixed beginning of every sample")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="text: 0 unmasks to the most likely character, 1 draws from the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="image: where training runs (cpu, cuda, auto); random draws stay on the CPU generator "
                             "and sampling runs on the CPU")
    parser.add_argument("--out", default=None, help="image: PNG grid (default <model>/samples.png); "
                                                    "text: also write the samples to this file")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model_dir = Path(args.model)
    if args.train_steps is not None:
        if args.train_steps < 1:
            raise UsageError(f"--train-steps must be >= 1, got {args.train_steps}")
        if model_dir.exists() and not args.overwrite:
            raise ExistingFileError(f"--model {model_dir} exists; pass --overwrite to train a new model there, or "
                                    f"leave out --train-steps to sample it")
    elif not (model_dir / "config.json").is_file():
        raise MissingFileError(f"--model {model_dir} holds no model; train one with --train-steps N")
    generator = torch.Generator().manual_seed(args.seed)
    return _image(args, model_dir, generator) if args.modality == "image" else _text(args, model_dir, generator)


def _backbone(args: argparse.Namespace) -> dict:
    return {"hidden_dim": args.hidden_dim, "depth": args.depth, "num_heads": 4, "time_embed_dim": args.hidden_dim}


def _image(args: argparse.Namespace, model_dir: Path, generator: torch.Generator) -> int:
    if args.train_steps is not None:
        device = resolve_device(args.device)
        process = args.process or ("flow" if args.data == "digits" else "diffusion")
        prediction = args.prediction or ("v" if args.data == "digits" else "sample")
        if args.prediction is not None and process == "flow":
            raise UsageError("--prediction is for --process diffusion (flow predicts the velocity)")
        if args.data == "digits":
            images, labels = digits(16)
            config = ImageModelConfig(process=process, prediction=prediction, backbone=_backbone(args))
            model = ImageModel(config).to(device)
            result = fit(model, lambda i, g: model.loss(images[i].to(device), labels[i], g), len(images),
                         args.train_steps, args.batch_size, args.lr, seed=args.seed)
        else:
            frames = pusht_frames(PUSHT_FRAMES, 96, seed=args.seed)
            config = ImageModelConfig(image_size=PUSHT_CROP, channels=3, patch_size=12, num_classes=0,
                                      process=process, prediction=prediction, backbone=_backbone(args))
            model = ImageModel(config).to(device)
            result = fit(model, lambda i, g: model.loss(random_crops(frames[i], PUSHT_CROP, g).to(device), None, g),
                         len(frames), args.train_steps, args.batch_size, args.lr, seed=args.seed)
        final_loss = sum(result.losses[-50:]) / len(result.losses[-50:])
        model.cpu().save_pretrained(model_dir, {"data": args.data, "train_steps": args.train_steps, "seed": args.seed,
                                                "train_seconds": round(result.seconds, 1), "device": str(device),
                                                "final_loss": final_loss})
        print(f"{model_dir}: trained {args.train_steps} steps in {result.seconds:.0f} s, final loss {final_loss:.4f}")
    model = ImageModel.from_pretrained(model_dir)
    if model.config.num_classes:
        labels = torch.arange(model.config.num_classes).repeat_interleave(args.per_class)
        images = model.generate(labels, args.steps, args.guidance, generator=generator)
        columns = args.per_class
    else:
        images = model.generate(None, args.steps, count=args.count, generator=generator)
        columns = min(args.count, 8)
    out = write_png_grid(images, args.out or model_dir / "samples.png", columns)
    print(f"wrote {out} ({len(images)} images, {args.steps} steps)")
    return 0


def _text(args: argparse.Namespace, model_dir: Path, generator: torch.Generator) -> int:
    if args.train_steps is not None:
        config = TextModelConfig(backbone={**_backbone(args), "position": "rotary"})
        train, _ = corpus.windows(corpus.stdlib_docstrings(), config.seq_len)
        model = TextModel(config)
        result = fit(model, lambda i, g: model.loss(train[i], g), len(train), args.train_steps, args.batch_size,
                     args.lr, seed=args.seed)
        model.save_pretrained(model_dir, {"corpus": f"stdlib docstrings, Python {platform.python_version()}",
                                          "train_steps": args.train_steps, "seed": args.seed,
                                          "train_seconds": round(result.seconds, 1)})
        print(f"{model_dir}: trained {args.train_steps} steps in {result.seconds:.0f} s")
    model = TextModel.from_pretrained(model_dir)
    texts = model.generate(args.count, args.steps, args.prompt, generator=generator, temperature=args.temperature)
    for text in texts:
        print(text)
    if args.out:
        atomic_write_text(args.out, "\n".join(texts) + "\n")
    return 0
