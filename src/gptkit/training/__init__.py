"""The one trainer: pre-training and fine-tuning share this loop."""
