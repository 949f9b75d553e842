"""The model directory: what `checkpoint consolidate`, `release` and `convert from-hf` write and
what `generate`, `pull`, `convert to-hf` and the MLflow model load (docs/ARCHITECTURE.md,
"Releases").

    model.safetensors   the weights (keys as in CPMAnt.state_dict())
    config.json         the architecture (ArchConfig fields)
    tokenizer.model     the tokenizer's file: a SentencePiece model, or CPM-Ant's vocab.txt
      or vocab.txt
    MODEL_CARD.md       releases only: facts about the release, ending with the sha256 of every
                        other file (for `sha256sum -c` and to catch damage on disk; a pulled
                        release is trusted for its manifest, cpm_lightning/tracking/integrity.py)

The directory verifies itself: model.safetensors carries, in its header's metadata, an integrity
record of its own bytes (core/file_hashes.py `seal`) and the sha256 of config.json and the
tokenizer, so a copied or renamed directory verifies and a flipped byte is one error line. A
directory with neither a card nor a record (another tool's) is read only under --trust-unverified.

One place for the format: file names, writing, verifying, the check that weights fit an
architecture, and safetensors read and written one tensor at a time (a 10B model is never two
copies in memory). No Lightning, no MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cpm_lightning.core.errors import UserError, closest
from cpm_lightning.core.file_hashes import (
    DIGEST_LEN,
    check_links_inside,
    check_sealed,
    record_text,
    seal,
    sha256,
    unverified,
)
from cpm_lightning.core.precision import QUANTIZATION_KEY, Precision
from cpm_lightning.core.strict_yaml import INT64_MAX
from cpm_lightning.core.tokenizer import CpmAntTokenizer, SentencePieceTokenizer, Tokenizer
from cpm_lightning.model import ArchConfig, CPMAnt, quantize
from cpm_lightning.model.config import MAX_PARAMS
from cpm_lightning.model.quantize import stored_shapes
from cpm_lightning.model.stats import param_count

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "MODEL_CARD.md"
TOKENIZER_FILES = (SentencePieceTokenizer.file_name, CpmAntTokenizer.file_name)
# The card lists hashes in `sha256sum` format, so `sha256sum -c` can check a download too.
HASH_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$", re.M)
RECORD_KEY, FILES_KEY = "cpm-lightning-integrity", "cpm-lightning-files"  # in the safetensors metadata
REMEDY = "restore it from a copy, or write the model directory again"


# -- safetensors, one tensor at a time ----------------------------------------------------------
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """The tensors of a .safetensors file, each read from disk when asked for (plain reads, not
    a memory map, so what was read is freed with the tensor)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                if size > self.path.stat().st_size - 8:  # f.read(size) would first allocate it
                    raise UserError(f"{path}: not a readable safetensors file (its header length, {size} bytes, is "
                                    "more than the file holds)")
                self.raw_header = f.read(size)
                header = json.loads(self.raw_header)
        except (OSError, struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
        metadata = header.pop("__metadata__", None)
        self.metadata: dict = metadata if isinstance(metadata, dict) else {}
        """The header's string metadata (safetensors' `__metadata__`)."""
        self.start = 8 + size
        self.entries = header
        for name, e in header.items():
            if not (isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list)
                    and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2):
                raise UserError(f"{path}: not a readable safetensors file (its entry {name!r} lacks a known dtype, "
                                "a shape or data offsets)")
        end = self.start + max((e["data_offsets"][1] for e in header.values()), default=0)
        actual = self.path.stat().st_size
        if actual < end:  # read() would fill the missing bytes with zeros
            raise UserError(f"{path}: not a readable safetensors file (truncated: {actual} bytes, its header "
                            f"describes {end})")

    def verify(self) -> None:
        """A UserError unless the file matches the integrity record in its header (unverified()
        for a file without one)."""
        record = self.metadata.get(RECORD_KEY)
        if not isinstance(record, str):
            unverified(self.path, "the model directory's weights file")
            return
        check_sealed(self.path, record, 8 + self.raw_header.find(record.encode()), REMEDY)

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {name: e["shape"] for name, e in self.entries.items()}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: DTYPES[e["dtype"]] for name, e in self.entries.items()}

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        with self.path.open("rb") as f:
            f.seek(self.start + begin)
            f.readinto(buf)
        if not buf:
            return torch.empty(e["shape"], dtype=DTYPES[e["dtype"]])
        return torch.frombuffer(buf, dtype=DTYPES[e["dtype"]]).reshape(e["shape"])


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape and dtype, known before its values."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def write_safetensors(path: Path, specs: Sequence[TensorSpec], tensors: Iterable[torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (one per spec, in order, produced one at a time) as a safetensors file:
    the header first, from the specs, then each tensor's bytes as it comes; then seal it (the
    integrity record in the header's metadata, with `metadata`)."""
    tensors_header, offset = {}, 0
    for s in specs:
        tensors_header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                                  "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes

    def header(size: int) -> bytes:  # the same length for any size: the record is fixed width
        meta = {"format": "pt", **(metadata or {}), RECORD_KEY: record_text(size)}
        text = json.dumps({"__metadata__": meta, **tensors_header}, separators=(",", ":")).encode()
        return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    size = 8 + len(header(0)) + offset
    text, record = header(size), record_text(size).encode()
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for spec, t in zip(specs, tensors, strict=True):
            if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                raise ValueError(f"{spec.name}: got {tuple(t.shape)} {t.dtype}, expected {spec.shape} {spec.dtype}")
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    seal(path, 8 + text.index(record) + len(record) - DIGEST_LEN)


# -- the model directory ------------------------------------------------------------------------
def check_arch(arch: dict, where: str, max_params: int = MAX_PARAMS) -> None:
    """A UserError naming `where` and the first key or value of an architecture stored as a dict
    (config.json, a checkpoint's `cpm` section) that ArchConfig cannot take, as for a proposal:
    a file written by another version, edited or crafted. Checks each value's type, the declared
    ranges and the size (`max_params`), so that torch never sees a shape it cannot build."""
    if not isinstance(arch, dict):
        raise UserError(f"{where}: the architecture is {type(arch).__name__}; expected a mapping of "
                        "model.arch fields")
    hints = typing.get_type_hints(ArchConfig)
    unknown = sorted(str(k) for k in arch.keys() - hints.keys())
    if unknown:
        raise UserError(f"{where}: unknown architecture key {unknown[0]!r}{closest(unknown[0], list(hints))}; "
                        f"expected: {', '.join(hints)}")
    for key, value in arch.items():
        if problem := _type_problem(value, hints[key]):
            raise UserError(f"{where}: {key} {problem}")
    try:
        config = ArchConfig(**arch)
    except UserError as e:  # an unknown preset or component, a value out of its range
        raise UserError(f"{where}: {e}") from None
    if (count := param_count(config)) > max_params:
        shown = f"{count:,}" if count < 10**18 else "more than 10^18"
        raise UserError(f"{where}: {shown} parameters, above the {max_params:,} the project builds from it")


def _type_problem(value, hint) -> str | None:
    """Why `value` is not of the type `hint` (int, float, str, bool, or a union of them with
    None), or None; integers beyond int64 are refused, as torch cannot hold them."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
        if ok and not -INT64_MAX - 1 <= value <= INT64_MAX:
            return "is beyond a 64-bit integer"
    else:
        ok = any(isinstance(value, t) for t in allowed if t in (float, str))
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    return None if ok else f"is {type(value).__name__} {_short(value)}; expected {names}"


def _short(value) -> str:
    text = repr(value) if isinstance(value, (str, int, float)) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def check_shapes(saved: Mapping[str, Sequence[int]], arch: dict | ArchConfig, where: str, expected_by: str,
                 precision: Precision | None = None) -> None:
    """A UserError naming the first weight that is missing from `saved`, has another shape than
    the model `arch` builds (stored at `precision`, when quantized), or is not in that model.
    `where` names the weights, `expected_by` what the architecture came from."""
    if precision is not None and precision.quantize:
        config = arch if isinstance(arch, ArchConfig) else ArchConfig(**arch)
        expected = {name: shape for name, (shape, _) in stored_shapes(config, precision).items()}
    else:
        expected = model_shapes(arch)
    for name, shape in expected.items():
        if name not in saved:
            raise UserError(f"{where}: {name} {shape} is missing; {expected_by} expects it")
        if list(saved[name]) != shape:
            raise UserError(f"{where}: {name} has shape {list(saved[name])}, but {expected_by} expects {shape}")
    extra = sorted(saved.keys() - expected.keys())
    if extra:
        raise UserError(f"{where}: {extra[0]} is not a weight of the model {expected_by} describes")


def model_shapes(arch: dict | ArchConfig) -> dict[str, list[int]]:
    """Name -> shape of every weight of the model `arch` describes, in state_dict order."""
    arch = arch if isinstance(arch, ArchConfig) else ArchConfig(**arch)
    with torch.device("meta"):
        return {name: list(t.shape) for name, t in CPMAnt(arch).state_dict().items()}


@dataclass(kw_only=True)
class StoredModel:
    """A model on disk (a model directory or a checkpoint), its weights read one at a time."""

    arch: dict
    """ArchConfig fields."""
    shapes: dict[str, list[int]]
    """Name -> shape of each weight (keys as in CPMAnt.state_dict())."""
    dtypes: dict[str, torch.dtype]
    """Name -> dtype of each weight."""
    read: Callable[[str], torch.Tensor]
    """Reads one weight from disk."""
    tokenizer: Tokenizer | None
    """The model's tokenizer, when it has one."""
    where: str
    """What the model was read from, for messages."""
    missing_tokenizer: str = "no tokenizer"
    """What the message says when there is no tokenizer, after `where`."""
    migrations: list[dict] = dataclasses.field(default_factory=list)
    """The migrations the model went through, with their steps (a checkpoint's cpm.migrations;
    model/migrate.py)."""
    precision: Precision | None = None
    """How the weights are stored, for a quantized model directory (a release's variant); None
    for float weights."""

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise UserError(f"{self.where}: {self.missing_tokenizer}")
        return self.tokenizer

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: self.read(name) for name in self.shapes}

    def build(self, device: str = "cpu", precision: Precision | None = None) -> CPMAnt:
        """The model in eval mode on `device` at `precision` (unset: as stored, float32 for float
        weights), its weights read and converted one at a time (model/quantize.py `build`)."""
        stored = self.precision
        if precision is None or (precision.quantize is None and precision.dtype is None):
            precision = stored or Precision()
        elif stored is not None and stored.quantize and precision.quantize != stored.quantize:
            raise UserError(f"{self.where}: its weights are stored as {stored}; it runs with --quantize "
                            f"{stored.quantize} or with no --quantize, not {_asked(precision)} (a release's float32 "
                            "variant can be quantized any way)")
        elif stored is not None and stored.quantize:
            precision = dataclasses.replace(precision, group_size=stored.group_size)
        config = ArchConfig(**self.arch)
        quantize.check(precision, config, self.where)
        check_shapes(self.shapes, config, self.where, "its architecture", stored)
        return quantize.build(config, self.read, precision, stored, device)


def _asked(precision: Precision) -> str:
    return f"--quantize {precision.quantize}" if precision.quantize else f"--dtype {precision.dtype}"


def write_model_dir(out: Path, weights: Mapping[str, torch.Tensor] | StoredModel, arch: dict, tokenizer: Tokenizer | None,
                    card_body: str | Callable[[], str] | None = None, beside: Callable[[Path], list[Path]] | None = None,
                    precision: Precision | None = None) -> list[Path]:
    """Write weights (a dict, or a StoredModel read one tensor at a time), config and tokenizer
    (when there is one) into `out`, then what `beside(out)` writes (a release's Hugging Face
    layout); with `card_body`, also the card: the body (a function is called once `beside` has
    written, so the card can report on it), then the sha256 of every file written.
    With `precision`, the float weights are stored at it, converted one at a time (a release's
    variant; model/quantize.py). Returns the files written."""
    out = Path(out)
    read = weights.read if isinstance(weights, StoredModel) else weights.__getitem__
    metadata = {}
    if precision is not None:
        config = ArchConfig(**arch)
        quantize.check(precision, config, str(out))
        specs = [TensorSpec(n, tuple(shape), dtype) for n, (shape, dtype) in stored_shapes(config, precision).items()]
        tensors = quantize.stored_tensors(config, read, precision)
        metadata[QUANTIZATION_KEY] = precision.metadata()
    else:
        specs = ([TensorSpec(n, tuple(s), weights.dtypes[n]) for n, s in weights.shapes.items()]
                 if isinstance(weights, StoredModel) else
                 [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in weights.items()])
        tensors = (read(s.name) for s in specs)
    files = {WEIGHTS: b"", CONFIG: (json.dumps(arch, indent=2) + "\n").encode()}
    if tokenizer is not None:
        files[tokenizer.file_name] = tokenizer.model_bytes
    digests = {name: hashlib.sha256(content).hexdigest() for name, content in files.items() if name != WEIGHTS}
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(out / WEIGHTS, specs, tensors, {FILES_KEY: json.dumps(digests), **metadata})
        for name, content in files.items():
            if name != WEIGHTS:
                (out / name).write_bytes(content)
        written = [out / name for name in files] + (beside(out) if beside else [])
        if card_body is not None:
            hashes = "\n".join(f"{sha256(path)}  {path.relative_to(out)}" for path in written)
            body = card_body() if callable(card_body) else card_body
            (out / CARD).write_text(f"{body.rstrip()}\n\n## Files (sha256)\n\n```\n{hashes}\n```\n")
            written.append(out / CARD)
    except OSError as e:
        raise UserError(f"cannot write the model directory {out}: {e.strerror or e}") from None
    return written


def verify_model_dir(path: Path) -> None:
    """A UserError unless every file the card lists is there with its recorded sha256."""
    card = path / CARD
    if not card.is_file():
        raise UserError(f"{path}: no {CARD}; expected a model directory written by `cpm-lightning release`")
    recorded = HASH_LINE.findall(card.read_text())
    if not recorded:
        raise UserError(f"{card}: no sha256 lines; expected '<sha256>  <file>' lines under 'Files (sha256)'")
    for digest, name in recorded:
        file = path / name
        if not file.is_file():
            raise UserError(f"{file}: missing; {CARD} lists it")
        actual = sha256(file)
        if actual != digest:
            raise UserError(f"{file}: sha256 {actual[:16]}... does not match {digest[:16]}... recorded in "
                            f"{CARD}; the file is damaged or was changed")


@contextlib.contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """A new directory to fill, which becomes `out` when the context ends without an error and
    is removed otherwise: nothing half-written is ever left in `out`. An `out` that exists and
    is not empty is an error, unless `force` (then it is replaced)."""
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not empty; expected a new or empty directory (--force replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _ordinary_modes(tmp)
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    os.replace(tmp, out)


def _ordinary_modes(root: Path) -> None:
    """Give a staged directory and its files the modes the user's umask gives new ones: mkdtemp
    makes the directory private and safetensors writes its files 0600, so a model or adapter
    directory shared on a machine could not be read by anyone else."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def is_model_dir(path: Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() or (Path(path) / CARD).is_file()  # a release is verified by its card


def open_model_dir(path: str | Path) -> StoredModel:
    """A model directory's architecture, tokenizer and weights (read when asked for), verified
    first: a released one (with a card) against the card's hashes, any other against the record
    in its weights file."""
    root = Path(path)
    check_links_inside(root, "the model directory")
    if (root / CARD).is_file():
        verify_model_dir(root)
    if not (root / CONFIG).is_file():
        raise UserError(f"{path}: the model directory has no {CONFIG}")
    tokenizers = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
    if not tokenizers:
        raise UserError(f"{path}: the model directory has no {' or '.join(TOKENIZER_FILES)}")
    try:
        arch = json.loads((root / CONFIG).read_bytes())
    except ValueError as e:  # not UTF-8 or not JSON
        raise UserError(f"{root / CONFIG}: not JSON ({e}); expected the architecture as a JSON object") from None
    except RecursionError:
        raise UserError(f"{root / CONFIG}: nested too deeply to read; expected the architecture as a JSON object of "
                        "plain values") from None
    check_arch(arch, str(root / CONFIG))  # a crafted config.json is refused as such, before its bytes are checked
    weights = SafetensorsFile(root / WEIGHTS)  # shapes from the header, before any tensor is read
    if not (root / CARD).is_file():  # a release: verified by its card
        weights.verify()
        _check_listed(root, weights.metadata.get(FILES_KEY))
    stored = weights.metadata.get(QUANTIZATION_KEY)
    precision = Precision.from_metadata(stored, str(root / WEIGHTS)) if stored is not None else None
    check_shapes(weights.shapes, arch, str(root / WEIGHTS), CONFIG, precision)
    tokenizer = Tokenizer.from_bytes(tokenizers[0].read_bytes(), str(tokenizers[0]))
    return StoredModel(arch=arch, shapes=weights.shapes, dtypes=weights.dtypes, read=weights.read, tokenizer=tokenizer,
                       where=str(root), precision=precision)


def _check_listed(root: Path, listed: str | None) -> None:
    """A UserError unless each file that the weights' record lists (config.json, the tokenizer)
    has the sha256 it lists."""
    try:
        digests = json.loads(listed) if listed is not None else {}
    except ValueError:
        digests = None
    if not isinstance(digests, dict):
        raise UserError(f"{root / WEIGHTS} is damaged: its list of the directory's files is not readable; {REMEDY}")
    for name, digest in sorted(digests.items()):
        file = root / str(name)
        if Path(name).name != name or not file.is_file():
            raise UserError(f"{file}: missing; {root / WEIGHTS} lists it")
        if sha256(file) != digest:
            raise UserError(f"{file} is damaged: its sha256 does not match the one recorded in {root / WEIGHTS} "
                            f"when it was written; {REMEDY}")


def load_model_dir(path: str | Path, device: str = "cpu", precision: Precision | None = None) -> tuple[CPMAnt, Tokenizer]:
    """Model and tokenizer from a model directory (see open_model_dir)."""
    stored = open_model_dir(path)
    return stored.build(device, precision), stored.require_tokenizer()
