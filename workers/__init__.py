"""Inference workers: ONNX Runtime sessions fed from shared memory."""
