"""diffpolicy: diffusion and flow-matching action-chunk policies for robots.

Layers (imports point down only):
    commands/ (cli)  ->  train/ finetune/ control/  ->  policies/  ->  core/ nn/ data/ envs/
`core/` knows nothing about robots; `data/` and `envs/` know nothing about neural networks.
"""

__version__ = "0.1.0"
