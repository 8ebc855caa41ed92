"""The serving rules: when ST-GridPool is active, what a request may change, video-token budgets, the
config rows the processor hands the model, and the metrics."""
