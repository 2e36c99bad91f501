"""Front ends: ONNX files and PyTorch modules, both producing onnx_ir models."""
