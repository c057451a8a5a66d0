"""llavao1_models (installed from `models/`): the Hugging Face model families train/ and export/ share.

- `checkpoint`: what a local checkpoint folder holds, read without torch (config, processor stats).
- `llava`: LLaVA built from a small spec (SigLIP- or CLIP-style tower, MLP projector, Llama decoder),
  saved as a plain Hugging Face checkpoint, and its image prompt layout.

Importing it is cheap: torch and transformers load only inside the functions that build models.
"""
