"""attention-sweep: quality vs KV bytes per token of attention variants trained at a matched
parameter budget, and of conversions of the trained MHA model."""
