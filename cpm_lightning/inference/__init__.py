"""Using a trained model (docs/ARCHITECTURE.md, "Evaluation", "Hugging Face"): sampling and
prompting (generate), scores (evaluation), the registry's prompt book and applications list
(book), and the Hugging Face formats (hf/). Imports neither Lightning nor MLflow."""
