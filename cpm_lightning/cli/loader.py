"""One loader for every place a trained model can be: a checkpoint written by `fit` (sharded
or one file), a model directory (consolidated, released or imported), a release written by `pull`,
(whole, or one variant of it: `pull --variant`) or a `models:/` URI of the MLflow Model Registry. `generate` and `convert to-hf` use it; so can
any tool that needs a model and its tokenizer. With `--adapter DIR` (generate, evaluate, serve),
the model carries an adapter `tune` wrote, checked against its base (train/adapters.py)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.precision import Precision

if TYPE_CHECKING:  # torch: the verbs' parsers import this module for add_adapter_arguments
    from cpm_lightning.checkpoint.modeldir import StoredModel
    from cpm_lightning.core.tokenizer import Tokenizer
    from cpm_lightning.model import CPMAnt


@contextlib.contextmanager
def open_model(source: str) -> Iterator[StoredModel]:
    """The model at `source`, its weights read one at a time while the context lasts. Lightning
    and MLflow are imported only for the kinds of source that need them."""
    from cpm_lightning.checkpoint.modeldir import is_model_dir, open_model_dir

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


@contextlib.contextmanager
def model_directory(source: str) -> Iterator[Path]:
    """`source` as a model directory, while the context lasts (checkpoint.init_from reads one):
    itself, a pulled `models:/` URI's, or, for any other source, its weights written into a
    temporary one."""
    from cpm_lightning.checkpoint.modeldir import is_model_dir, write_model_dir

    if is_model_dir(Path(source)):
        yield Path(source)
    elif source.startswith("models:/"):
        from cpm_lightning.tracking.releases import pulled

        with pulled(source) as directory:
            yield Path(directory)
    else:
        with open_model(source) as stored, tempfile.TemporaryDirectory(prefix="cpm-base-") as tmp:
            write_model_dir(Path(tmp), stored, stored.arch, stored.tokenizer)
            yield Path(tmp)


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """--adapter and --merge, for the verbs that run a model (generate, evaluate, serve)."""
    parser.add_argument("--adapter", metavar="DIR", help="apply the adapter `cpm-lightning tune` wrote to DIR "
                        "(LoRA or prompt rows), or an adapter version models:/NAME/VERSION (`release --adapter`); "
                        "refused unless tuned on this model")
    parser.add_argument("--merge", action="store_true", help="fold --adapter's LoRA into the weights (as fast as "
                        "the base) instead of running it beside them")


def load_model(source: str, device: str = "cpu", precision: Precision | None = None, adapter: str | None = None,
               merge: bool = False) -> tuple[CPMAnt, Tokenizer]:
    """Model (eval mode, on `device`, at `precision`: unset, as stored) and tokenizer from `source`,
    with `adapter` (a directory `tune` wrote) applied, folded into the weights if `merge`."""
    check_device(device)
    if merge and not adapter:
        raise UserError("--merge folds an adapter into the weights; give --adapter DIR")
    if adapter and precision is not None and precision.quantize:
        raise UserError("--adapter applies to float weights; give --dtype, not --quantize")
    with open_model(source) as stored:
        if adapter and stored.precision is not None and stored.precision.quantize:
            raise UserError(f"--adapter applies to float weights; {stored.where} holds {stored.precision} (a release's "
                            "variant): give the float32 release")
        model = stored.build(device, precision)
        if adapter:
            from cpm_lightning.train.adapters import apply_adapter, base_sha256

            with adapter_directory(adapter) as directory:
                apply_adapter(model, directory, base_sha256(stored), merge)
        return model, stored.require_tokenizer()


@contextlib.contextmanager
def adapter_directory(adapter: str) -> Iterator[Path]:
    """--adapter as a directory while the context lasts: itself, or an adapter version of the
    Model Registry (`release --adapter`) pulled and verified."""
    if not adapter.startswith("models:/"):
        yield Path(adapter)
        return
    from cpm_lightning.tracking.releases import pulled_adapter

    with pulled_adapter(adapter) as directory:
        yield directory


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
