"""Orchestration of a MIFA build: CLI, config, plan, Ray job graph, shard writer, manifest, reports."""
