"""Per-stage ONNX / TensorRT export, parity gate and Triton repository writer (arrives with the export issue)."""
