"""llavao1_export: HF LLaVA checkpoints to GGUF (text + mmproj) and ONNX, quantization, verification."""
