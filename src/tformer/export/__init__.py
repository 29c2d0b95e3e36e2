"""Writing checkpoints in other ecosystems' formats (ONNX)."""
