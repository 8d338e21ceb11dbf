"""Speed-ups that give the same numbers as the plain library calls, behind one switch (`fast_paths`).

- `shared_prefix`: a prompt prefix common to every row (system turn, instruction, k-shot
  exemplars) runs once per model, and every row attends to its keys and values (generation,
  the builder's teacher targets, fidelity).
- `dequantized_once`: on the CPU, each 4-bit or HQQ weight dequantized once for a block of work
  instead of in every forward and backward, where the library itself would dequantize then matmul.

Each one checks that it applies (the model's attention, the installed transformers, what
the quantizer does on this CPU) and otherwise leaves the plain path; tests compare both ways.
"""

from llmkd.fastpath.dequantize import dequantized_once

__all__ = ["dequantized_once"]
