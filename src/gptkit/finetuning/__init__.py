"""Fine-tuning: instruction data, LoRA and prompt tuning, plugged into the one trainer."""
