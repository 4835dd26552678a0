"""Generation side of the factory: MAUGen, prompts (FACS grammar, LLM expansion, parser), the puppet domain."""
