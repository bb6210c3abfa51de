"""Reading and writing quantized checkpoints (safetensors, HF config.json)."""

from lowbit.io.header import TensorInfo, model_tensor_infos, read_safetensors_header
from lowbit.io.load import load
from lowbit.io.save import SaveResult, save

__all__ = [
    "SaveResult", "TensorInfo", "load", "model_tensor_infos", "read_safetensors_header", "save",
]
