"""llavao1_train: the shapes data world and LLaVA-CoT fine-tuning (installed from `train/`).

Importing this package is cheap: torch and transformers load only inside the training code.
"""
