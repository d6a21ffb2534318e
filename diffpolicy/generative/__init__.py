"""diffpolicy.generative: image and text generators on the shared generative core.

Nothing here re-implements the core: the models are `nn.DiT` denoisers over tokens (image patches,
one-hot characters), trained with the core's processes and losses and sampled by the one
`core.sample` loop, as the policies' action chunks are.

- `ImageModel` (`image_model`): class-conditional diffusion / flow over patches, classifier-free
  guidance, few-step sampling; data in `data` (scikit-learn digits, PushT frames).
- `TextModel` (`text_model`): masked (absorbing-state) diffusion over characters with a DiT that
  takes no time input; corpus in `corpus` (docstrings of Python's standard library).
- `metrics`: a classifier of real digits, accuracy and Frechet distance of generated ones.
- An unconditional PushT `ImageModel`'s denoiser is a policy's image backbone through
  `nn.DiTImageEncoder` (encoder config `image_backbone: {type: dit, init: <model dir>, ...}`).
"""

from diffpolicy.generative.image_model import ImageModel, ImageModelConfig
from diffpolicy.generative.patches import patchify, unpatchify
from diffpolicy.generative.text_model import TextModel, TextModelConfig
from diffpolicy.generative.training import FitResult, fit

__all__ = ["FitResult", "ImageModel", "ImageModelConfig", "TextModel", "TextModelConfig", "fit", "patchify",
           "unpatchify"]
