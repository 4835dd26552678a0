"""AU detectors (ONNX Runtime), multi-detector consensus, realism discriminator, identity encoder, metrics.

Modules, one job each: `spec` (the YAML that describes an ONNX model), `runtime` (sessions and
pre-processing), `au` / `realism` / `identity` (the three model kinds), `consensus` (k-of-N
agreement), `metrics` (F1, ICC, MAE, Jaccard, Frechet distance), `models` + `data` + `train` (the
tiny puppet-domain models and the command that rebuilds them), `builtin` (where they live).
"""
