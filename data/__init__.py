"""llavao1_data (installed from `data/`): the record formats and the shapes data world.

- `records`: LLaVA-CoT conversation JSONL and VLMEvalKit multiple-choice TSV, read and written.
- `shapes`: seeded 2-D scenes with four-stage questions about them (the shipped model's data).
- `cli`: `llavao1-data`.
"""
