"""Reading and writing quantized checkpoints (safetensors, HF config.json)."""

from lowbit.io.header import TensorInfo, model_tensor_infos, read_safetensors_header

__all__ = ["TensorInfo", "model_tensor_infos", "read_safetensors_header"]
