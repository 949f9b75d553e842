"""One loader for every place a trained model can be: a checkpoint written by `fit` (sharded
or one file), a model directory (consolidated, released or imported), a release written by `pull`,
(whole, or one variant of it: `pull --variant`) or a `models:/` URI of the MLflow Model Registry. `generate` and `convert to-hf` use it; so can
any tool that needs a model and its tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cpm_lightning.checkpoint.modeldir import StoredModel, is_model_dir, open_model_dir
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.precision import Precision
from cpm_lightning.core.tokenizer import Tokenizer
from cpm_lightning.model import CPMAnt


@contextlib.contextmanager
def open_model(source: str) -> Iterator[StoredModel]:
    """The model at `source`, its weights read one at a time while the context lasts. Lightning
    and MLflow are imported only for the kinds of source that need them."""
    path = Path(source)
    if source.startswith("models:/"):
        from cpm_lightning.tracking.releases import pulled

        with pulled(source) as directory:
            yield open_model_dir(directory)
    elif is_model_dir(path):
        yield open_model_dir(path)
    elif (path / "MLmodel").is_file():  # a release `pull` wrote: the MLflow model around a model directory
        from cpm_lightning.tracking.integrity import MODEL_DIR, VARIANTS_DIR, release_model_dir

        yield open_model_dir(release_model_dir(path / MODEL_DIR, path / VARIANTS_DIR))
    # A checkpoint file, a sharded checkpoint directory (meta.pt is Lightning's name), or a path
    # that does not exist (the checkpoint reader says so).
    elif path.is_file() or not path.exists() or (path / "meta.pt").is_file():
        from cpm_lightning.checkpoint.store import open_checkpoint

        yield open_checkpoint(path)[1]
    else:
        raise UserError(f"{source!r} is not a checkpoint file or model directory")


def load_model(source: str, device: str = "cpu", precision: Precision | None = None) -> tuple[CPMAnt, Tokenizer]:
    """Model (eval mode, on `device`, at `precision`: unset, as stored) and tokenizer from `source`."""
    check_device(device)
    with open_model(source) as stored:
        return stored.build(device, precision), stored.require_tokenizer()


def check_device(device: str) -> None:
    """A UserError unless `device` is the CPU or a CUDA device this machine has (checked before
    a checkpoint is read; torch's own error comes when the weights are moved)."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r}: expected cpu, cuda or cuda:N")
    count = torch.cuda.device_count()
    if parsed.type == "cuda" and count == 0:
        raise UserError(f"device {device!r}: this machine has no CUDA device; use cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= count:
        raise UserError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
