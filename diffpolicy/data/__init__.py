"""Episode data: zarr replay buffer (Diffusion Policy layout), training windows, robomimic HDF5.

numpy / zarr / h5py only; the optional torch adapter lives in `diffpolicy.data.torch_dataset`
and LeRobot v3 interop (pyarrow, PyAV) in `diffpolicy.data.lerobot`; neither is imported here.
"""

from diffpolicy.data.errors import DataFormatError, EpisodeError
from diffpolicy.data.replay_buffer import ReplayBuffer, StepArray, is_image_array
from diffpolicy.data.robomimic_hdf5 import export_robomimic, import_robomimic
from diffpolicy.data.sequence_sampler import SequenceSampler, split_episodes, window_index

__all__ = [
    "DataFormatError",
    "EpisodeError",
    "ReplayBuffer",
    "SequenceSampler",
    "StepArray",
    "export_robomimic",
    "import_robomimic",
    "is_image_array",
    "split_episodes",
    "window_index",
]
