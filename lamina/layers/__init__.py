"""Building blocks of the LLaMA decoder layer: linear, norm, rotary, activation, attention."""
