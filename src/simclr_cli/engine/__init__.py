"""The one training loop (on HF Accelerate) shared by every stage, its tasks, logging and signals."""
