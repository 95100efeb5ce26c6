"""Model definitions. One class covers the LLaMA family through config switches."""
