"""The puppet domain: procedural faces with exact AU ground truth (the project's test domain)."""

from pipelines.puppet.identity import AGE_GROUPS, SKIN_TONE_GROUPS, PuppetIdentity, sample_identity
from pipelines.puppet.renderer import PuppetRenderer

__all__ = ["AGE_GROUPS", "SKIN_TONE_GROUPS", "PuppetIdentity", "PuppetRenderer", "sample_identity"]
