"""The edge client: loads an ONNX bundle, runs the frozen image encoder in onnxruntime, trains soft
prompts in torch through a frozen text tower, applies local DP and streams updates to the aggregator.

Never imports `aggregator`; shared pieces come from `fedprompt.common` and `protos`."""
