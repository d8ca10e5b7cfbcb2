"""Reports are pure functions of result files (results.json, metrics.jsonl): no model, no training."""
