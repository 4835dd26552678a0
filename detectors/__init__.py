"""AU detectors (ONNX Runtime), multi-detector consensus, realism discriminator, identity encoder."""
