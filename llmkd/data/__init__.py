"""GSM8K data, the prompt format and answer extraction: shared by builder, trainer and evaluator."""
