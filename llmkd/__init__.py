"""llmkd: distil a 16-bit LLM into its own quantised (NF4 by default) copy with LoRA and a cached top-k teacher."""

__version__ = "0.1.0"
