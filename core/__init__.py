"""The small shared core every package may import: the AU schema (`core.facs`, numpy only) and the
identity encoder architecture (`core.identity_net`, torch). It imports none of factory, pipelines or
detectors (tests/test_layering.py checks the whole import graph)."""
