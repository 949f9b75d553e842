"""Hugging Face interop (docs/ARCHITECTURE.md, "Hugging Face"): the weight and config mappings
(`mapping`), the tokenizer files (`tokenizer_files`) and the conversions (`convert`). Imports
neither Lightning nor MLflow; `transformers` only when writing."""
