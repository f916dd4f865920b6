"""batcher: a manifest of prompts in, a folder of images out."""
