"""Export of open_clip models into ONNX bundles, their verification and benchmarks.

The only package that imports open_clip's model-building code."""
