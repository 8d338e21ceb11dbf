"""llmkd: distil a 16-bit LLM into its own 4-bit (NF4) copy with LoRA and a cached top-k teacher."""

__version__ = "0.1.0"
