"""Speculative decoding: proposers guess a sequence's next tokens cheaply, and the target model
verifies them in the same batched forward pass as everything else (engine/output_processor.py).

`config.SpeculativeConfig` is what the user asks for; `proposer.Proposer` is the seam (n-gram
prompt lookup ships, `ngram.py`); `speculator.Speculator` decides, each step, which running
sequences speculate and with how many tokens, and keeps the acceptance statistics.
"""
