"""One loader for every place a trained model can be: a checkpoint written by `fit` (sharded
or one file), a model directory (consolidated or released), a release written by `pull`, or a
`models:/` URI of the MLflow Model Registry. `generate` uses it; so can any tool that needs
(model, tokenizer)."""

from __future__ import annotations

from pathlib import Path

from cpm_lightning.errors import UserError
from cpm_lightning.model import CPMAnt
from cpm_lightning.modeldir import CARD, WEIGHTS, load_model_dir, model_from_state
from cpm_lightning.tokenizer import Tokenizer


def load_model(source: str, device: str = "cpu") -> tuple[CPMAnt, Tokenizer]:
    """Model (eval mode, on `device`) and tokenizer from `source`. Lightning and MLflow are
    imported only for the kinds of source that need them."""
    path = Path(source)
    if source.startswith("models:/"):
        from cpm_lightning.tracking.releases import load_registered

        return load_registered(source, device)
    if (path / WEIGHTS).is_file() or (path / CARD).is_file():  # a released one is checked against its card
        return load_model_dir(path, device)
    if (path / "MLmodel").is_file():  # a release `pull` wrote: the MLflow model around a model directory
        from cpm_lightning.tracking.integrity import MODEL_DIR

        return load_model_dir(path / MODEL_DIR, device)
    # A checkpoint file, a sharded checkpoint directory (meta.pt is Lightning's name), or a path
    # that does not exist (the checkpoint reader says so).
    if path.is_file() or not path.exists() or (path / "meta.pt").is_file():
        from cpm_lightning.checkpoint import trained_model

        trained = trained_model(path)
        tokenizer = Tokenizer(trained.require_tokenizer(), source)
        return model_from_state(trained.arch, trained.weights, source, device), tokenizer
    raise UserError(f"{source!r} is not a checkpoint file or model directory")
