"""Benchmark harness: this server vs Seldon MLServer vs raw ONNX Runtime (`python -m bench.run`).

Kept free of imports: MLServer's own virtualenv imports ``bench.mlserver_runtime``
through this package, and that environment has none of the project's packages.
"""
