"""`convert to-gguf`: a model of this project as one GGUF file that llama.cpp (and so Ollama,
LM Studio, llama-cpp-python) runs, written with llama.cpp's own `gguf` package; and llama.cpp's
logits and greedy tokens of such a file, for comparing an export with the model it came from.

Only models that llama.cpp's `llama` architecture computes exactly are written: rotary, RMSNorm,
a SiLU-gated FFN (swiglu), no task prompts. The weights are those of the Llama export
(hf/mapping.py: CPM-Ant's 1/sqrt(d_in) and embedding scales folded into plain weights, segment 0
folded into the input embedding), with one difference: q and k keep this model's row order.
This model turns adjacent pairs (x[2i], x[2i+1]) as Meta's Llama does, and so does llama.cpp's
`llama` rotary (its converter permutes Hugging Face's rotate-half rows back to that order).
The tokenizer (a SentencePiece model) is in the file. Weights stream one tensor at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpm_lightning.checkpoint.modeldir import StoredModel
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import CpmAntTokenizer, SentencePieceTokenizer, Tokenizer
from cpm_lightning.inference.hf.mapping import Llama, Target
from cpm_lightning.inference.hf.tokenizer_files import check_vocab
from cpm_lightning.model import ArchConfig

ARCH = "llama"  # llama.cpp's architecture name, and the prefix of its hyper-parameter keys


@dataclass(frozen=True)
class WeightType:
    """How the matrices of a GGUF file are stored (norms are always F32, as llama.cpp writes them)."""

    ggml: str
    """The GGMLQuantizationType of each matrix."""
    file_type: str
    """The LlamaFileType recorded as general.file_type."""
    output: str | None = None
    """The type of the output embedding instead, when it is not `ggml`: llama.cpp's own
    quantizer keeps it at more bits than 4 (q6_K, which `gguf` cannot write; q8_0 here)."""


WEIGHT_TYPES: dict[str, WeightType] = {
    "float32": WeightType("F32", "ALL_F32"),
    "float16": WeightType("F16", "MOSTLY_F16"),
    "bfloat16": WeightType("BF16", "MOSTLY_BF16"),
    "q8_0": WeightType("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": WeightType("Q4_0", "MOSTLY_Q4_0", output="Q8_0"),
}
DTYPES, QUANTIZATIONS = ("float32", "float16", "bfloat16"), ("q8_0", "q4_0")
QUANT_BLOCK = 32  # inputs per block of q8_0 and q4_0: a quantized matrix's rows are a multiple of it
PAD_SCORE = -1000.0  # the score llama.cpp's converter gives the filler tokens past the tokenizer's


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF needs llama.cpp's gguf package; install cpm-lightning[gguf]") from None
    return gguf


class _AdjacentPairs(Llama):
    """The Llama export's weights with q and k in this model's (and llama.cpp's) row order."""

    architecture = "llama.cpp's llama architecture"  # what the Llama export's refusals name

    def to_theirs(self, suffix: str, t: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
        return Target.to_theirs(self, suffix, t, arch)  # the folded scale, without Llama's rotate-half rows


def weights_of(dtype: str | None, quantize: str | None) -> str:
    """The WEIGHT_TYPES name that `--dtype` or `--quantize` (at most one of them) asks for;
    neither: float32, the model's own weights."""
    for flag, value, valid in (("--dtype", dtype, DTYPES), ("--quantize", quantize, QUANTIZATIONS)):
        if value is not None and value not in valid:
            raise UserError(f"{flag} {value!r}: expected one of {', '.join(valid)}")
    if dtype and quantize:
        raise UserError(f"--dtype {dtype} and --quantize {quantize}: give one; a GGUF file's matrices are either "
                        "floats or quantized blocks (llama.cpp chooses the precision it computes in)")
    return quantize or dtype or "float32"


def check_gguf(arch: dict, tokenizer: Tokenizer, weights: str, where: str) -> ArchConfig:
    """The resolved architecture; a UserError naming what llama.cpp lacks when it cannot run the
    model, or when `weights` (a WEIGHT_TYPES name) cannot store its matrices."""
    cfg = ArchConfig(**arch).resolved()
    if cfg.position != "rotary":
        raise UserError(f"{where}: model.arch.position is {cfg.position}: llama.cpp has no T5-style relative position "
                        "buckets with segment biases (CPM-Ant's); only rotary models convert to GGUF (convert to-hf "
                        "writes this one as CpmAntForCausalLM)")
    try:
        _AdjacentPairs().refuse(cfg)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if cfg.ffn != "swiglu":
        raise UserError(f"{where}: model.arch.ffn is {cfg.ffn}: llama.cpp's llama architecture gates its FFN with "
                        "SiLU only (swiglu), and its GeLU-gated architectures use the tanh approximation, not the exact "
                        "GeLU this model computes")
    if isinstance(tokenizer, CpmAntTokenizer):
        raise UserError(f"{where}: the tokenizer is CPM-Ant's vocab.txt: llama.cpp has no tokenizer for it (it "
                        "reads SentencePiece, BPE and WordPiece vocabularies); only a SentencePiece model converts")
    check_vocab(tokenizer, cfg.vocab_size, where)
    if weights in QUANTIZATIONS:
        for field in ("dim", "ff_dim"):
            if getattr(cfg, field) % QUANT_BLOCK:
                raise UserError(f"{where}: model.arch.{field} is {getattr(cfg, field)}, not a multiple of "
                                f"{QUANT_BLOCK}: llama.cpp's {weights} stores rows in blocks of {QUANT_BLOCK}")
        if cfg.num_heads * cfg.head_dim % QUANT_BLOCK:
            raise UserError(f"{where}: num_heads x head_dim is {cfg.num_heads * cfg.head_dim}, not a multiple of "
                            f"{QUANT_BLOCK}: llama.cpp's {weights} stores rows in blocks of {QUANT_BLOCK}")
    return cfg


def write_gguf(stored: StoredModel, out: Path, weights: str = "float32") -> list[tuple[str, str]]:
    """Write `stored` as the GGUF file `out`, its matrices as `weights` (a WEIGHT_TYPES name);
    each tensor is made, converted and written before the next is read. Returns (GGUF name,
    type) of each tensor."""
    gguf = require_gguf()
    if stored.precision is not None:
        raise UserError(f"{stored.where}: its weights are stored as {stored.precision}; convert the float weights "
                        "(a release's float32 variant) and choose the GGUF file's with --quantize")
    tokenizer = stored.require_tokenizer()  # a GGUF file carries its tokenizer
    cfg = check_gguf(stored.arch, tokenizer, weights, stored.where)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    _, specs, make = _AdjacentPairs().plan(cfg, stored.read, set(stored.shapes))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_blocks)
    kind = WEIGHT_TYPES[weights]
    tied = Llama.HEAD not in make

    writer = gguf.GGUFWriter(out, ARCH)
    _hyperparameters(writer, gguf, cfg, Path(stored.where).name, kind)
    _tokenizer(writer, gguf, tokenizer, cfg.vocab_size)
    plan = []
    for spec in specs:
        name = names.get_name(spec.name, try_suffixes=(".weight",))
        # The output embedding is the input one when tied: then that one takes the output's type.
        is_output = spec.name == Llama.HEAD or (tied and spec.name == Llama.EMBEDDING)
        qtype = gguf.GGMLQuantizationType["F32" if len(spec.shape) == 1 else
                                          (kind.output if is_output and kind.output else kind.ggml)]
        shape = tuple(spec.shape)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        plan.append((spec.name, name, qtype))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for ours, _, qtype in plan:
            writer.write_tensor_data(gguf.quants.quantize(make[ours]().float().contiguous().numpy(), qtype))
    finally:
        writer.close()
    return [(name, qtype.name) for _, name, qtype in plan]


def _hyperparameters(writer, gguf, cfg: ArchConfig, name: str, kind: WeightType) -> None:
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[kind.file_type])
    if kind.ggml not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.num_blocks)
    writer.add_feed_forward_length(cfg.ff_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    # CPM-Ant's head width is its own (not dim / num_heads): llama.cpp reads it from these keys.
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def _tokenizer(writer, gguf, tokenizer: SentencePieceTokenizer, vocab_size: int) -> None:
    """llama.cpp's SentencePiece ("llama") tokenizer: every piece, its score and type (the GGUF
    token types number as SentencePiece's piece types do), fillers up to the model's vocab_size
    (llama.cpp needs one token per embedding row), the special ids; no BOS added, as generate
    encodes."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model_bytes)
    norm = proto.normalizer_spec
    # llama.cpp applies no normalization rule and keeps whitespace runs, as `tokenizer train` makes them.
    if norm.name != "identity" or norm.remove_extra_whitespaces:
        raise UserError(f"{tokenizer.source}: a SentencePiece model with normalization {norm.name!r}"
                        f"{' that removes extra whitespace' if norm.remove_extra_whitespaces else ''}: llama.cpp "
                        "applies no normalization rules; expected one as `cpm-lightning tokenizer train` makes it")
    fill = range(len(proto.pieces), vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece.encode() for p in proto.pieces] + [f"[PAD{i}]".encode() for i in fill])
    writer.add_token_scores([p.score for p in proto.pieces] + [PAD_SCORE] * len(fill))
    writer.add_token_types([int(p.type) for p in proto.pieces] + [int(gguf.TokenType.UNUSED)] * len(fill))
    sp = tokenizer.sp
    for add, token_id in ((writer.add_bos_token_id, sp.bos_id()), (writer.add_eos_token_id, sp.eos_id()),
                          (writer.add_unk_token_id, sp.unk_id()), (writer.add_pad_token_id, sp.pad_id())):
        if token_id >= 0:  # SentencePiece's -1: the model has no such token
            add(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(norm.add_dummy_prefix)


@contextlib.contextmanager
def staged_file(out: Path, force: bool) -> Iterator[Path]:
    """A new file beside `out`, which becomes `out` when the context ends without an error and is
    removed otherwise: nothing half-written is ever left at `out`."""
    if out.is_dir():
        raise UserError(f"{out}: is a directory; expected the path of the .gguf file to write")
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"{out}: exists; expected a new file (--force replaces it)")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory; expected an existing directory for {out.name}")
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp's file is private; the result is an ordinary file
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


# -- llama.cpp ---------------------------------------------------------------------------------
class LlamaCpp:
    """A GGUF file run by llama.cpp, through llama-cpp-python's bindings of its C API: the
    logits of the last token evaluated, from an empty cache or continuing it.

    Loaded without llama.cpp's extra CPU buffer types (`llama-cli --no-repack`): on a CPU with
    AMX, as this project's machines have, its AMX matrix product crashes on q8_0 and q4_0 weights
    (llama.cpp issue 20824, in the llama.cpp of llama-cpp-python 0.3.36)."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise UserError("running a GGUF file needs llama-cpp-python (pip install llama-cpp-python==0.3.36, which "
                            "builds llama.cpp)") from None
        self.lib = llama_cpp
        # llama.cpp logs every load at length; what Llama(verbose=False) does to its logger.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise UserError(f"{path}: llama.cpp cannot load it")
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = context.n_batch = context.n_ubatch = n_ctx
        context.n_threads = context.n_threads_batch = threads or os.cpu_count()
        self.ctx = llama_cpp.llama_init_from_model(self.model, context)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise UserError(f"{path}: llama.cpp cannot make a context of {n_ctx} tokens for it")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def eval(self, ids: Sequence[int], fresh: bool = False) -> np.ndarray:
        """The logits [vocab] after `ids`, which continue the cache (`fresh`: an empty one)."""
        if fresh:
            self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        tokens = (self.lib.llama_token * len(ids))(*ids)
        if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, len(ids))) != 0:
            raise UserError(f"llama.cpp could not evaluate {len(ids)} tokens (beyond its context?)")
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def sequence_logits(self, ids: Sequence[int]) -> np.ndarray:
        """The logits [len(ids), vocab] at every position of `ids`, from an empty cache (one token
        at a time: the C API's batch keeps the logits of its last token only)."""
        return np.stack([self.eval(ids[:1], fresh=True)] + [self.eval([t]) for t in ids[1:]])

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


@contextlib.contextmanager
def llama_cpp(path: Path, n_ctx: int, threads: int | None = None) -> Iterator[LlamaCpp]:
    model = LlamaCpp(path, n_ctx, threads)
    try:
        yield model
    finally:
        model.close()


def gguf_logits(path: Path, prompts: Sequence[Sequence[int]], threads: int | None = None) -> list[np.ndarray]:
    """llama.cpp's logits [vocab] at the last position of each token list, each run from an
    empty cache (a release compares them with its float32 model's)."""
    with llama_cpp(path, max(len(p) for p in prompts), threads) as model:
        return [model.eval(p, fresh=True) for p in prompts]


def gguf_greedy(path: Path, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None = None,
                threads: int | None = None) -> list[list[int]]:
    """llama.cpp's greedy continuation of each token list, up to `max_new_tokens` ids, stopping
    at `eos_id` (as `generate.sample` at temperature 0: the argmax of each step's logits)."""
    out = []
    with llama_cpp(path, max(len(p) for p in prompts) + max_new_tokens, threads) as model:
        for prompt in prompts:
            new: list[int] = []
            logits = model.eval(prompt, fresh=True)
            while len(new) < max_new_tokens:
                token = int(np.argmax(logits))
                if token == eos_id:
                    break
                new.append(token)
                if len(new) == max_new_tokens:
                    break
                logits = model.eval([token])
            out.append(new)
    return out
