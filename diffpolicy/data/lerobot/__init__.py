"""LeRobot dataset (v3.0) interop: `import_lerobot(src, out_zarr)` and `export_lerobot(buffer, out_dir)`.

Written with pyarrow and PyAV only (the `lerobot` package pulls a torchvision that does not load
beside this torch). The layout is documented in `diffpolicy.data.lerobot.layout`.
"""

from diffpolicy.data.lerobot.export import VIDEO_TOLERANCE, export_lerobot
from diffpolicy.data.lerobot.importer import import_lerobot

__all__ = ["VIDEO_TOLERANCE", "export_lerobot", "import_lerobot"]
