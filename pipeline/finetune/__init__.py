"""Stage 3, `make finetune`: augmented end-to-end fine-tuning, warm-started from the stage-2 head."""
