"""Other tools' model formats: hf.py (transformers' GPT-2 folders: export, and read as a checkpoint)."""
