"""What runs on top of the core: evaluation, tuning, explanation, generation, the demo."""
