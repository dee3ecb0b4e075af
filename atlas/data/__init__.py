"""Trajectory data: the trajectory model, file formats, per-step masks and the DataModule."""

from atlas.data.formats import FORMATS, DataFormatError, read_trajectories, write_trajectories
from atlas.data.masking import IGNORE_INDEX, Example, MaskingError, encode, tokenize_steps
from atlas.data.trajectory import Message, Step, Trajectory

__all__ = [
    "FORMATS", "DataFormatError", "read_trajectories", "write_trajectories", "IGNORE_INDEX",
    "Example", "MaskingError", "encode", "tokenize_steps", "Message", "Step", "Trajectory",
]
