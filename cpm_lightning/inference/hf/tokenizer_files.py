"""The tokenizer files of a Hugging Face directory, both ways: files `AutoTokenizer` opens for each
of the project's two tokenizers, and the project's tokenizer from such a directory.

- SentencePiece: `tokenizer.json` (a `tokenizers` Unigram model that encodes id for id as the
  SentencePiece model, which is also written, as `tokenizer.model`, for readers like this one).
- CPM-Ant's vocab.txt: `vocab.txt` for `transformers`' CpmAntTokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import (
    CPM_ANT_NEWLINE,
    CPM_ANT_SPACE,
    CpmAntTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

CONFIG = "tokenizer_config.json"


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    if isinstance(tokenizer, CpmAntTokenizer):
        return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    sp = tokenizer.sp
    return {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}


def write_tokenizer_files(tokenizer: Tokenizer, out: Path) -> list[Path]:
    """Write the files AutoTokenizer.from_pretrained(out) loads `tokenizer` from."""
    if isinstance(tokenizer, CpmAntTokenizer):
        config = {"tokenizer_class": "CpmAntTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                  "unk_token": "<unk>", "line_token": CPM_ANT_NEWLINE, "space_token": CPM_ANT_SPACE,
                  "padding_side": "left"}
        files = {CpmAntTokenizer.file_name: tokenizer.model_bytes}
    else:
        fast = _fast_tokenizer(tokenizer)
        sp = tokenizer.sp
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": sp.id_to_piece(sp.bos_id()),
                  "eos_token": sp.id_to_piece(sp.eos_id()), "unk_token": sp.id_to_piece(sp.unk_id()),
                  "pad_token": sp.id_to_piece(sp.pad_id()), "clean_up_tokenization_spaces": False,
                  "model_input_names": ["input_ids", "attention_mask"]}
        files = {"tokenizer.json": fast.to_str().encode(), SentencePieceTokenizer.file_name: tokenizer.model_bytes}
    files[CONFIG] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return [out / name for name in files]


def _fast_tokenizer(tokenizer: SentencePieceTokenizer):
    """A `tokenizers` Tokenizer that encodes and decodes as the SentencePiece model does: the same
    pieces and scores in a Unigram model with byte fallback, SentencePiece's whitespace handling
    (a "▁" before the text and for each space) as the normalizer, and no pre-tokenization (so no
    piece boundary appears that SentencePiece would not make)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as Fast

    proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model_bytes)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    # What `tokenizer train` makes; any other SentencePiece model would need other rules.
    expected = {"model type": (trainer.model_type, trainer.UNIGRAM),
                "normalization": (norm.name, "identity"), "removing extra whitespace": (norm.remove_extra_whitespaces, False),
                "escaping whitespace": (norm.escape_whitespaces, True),
                "whitespace as suffix": (trainer.treat_whitespace_as_suffix, False)}
    for what, (value, wanted) in expected.items():
        if value != wanted:
            raise UserError(f"{tokenizer.source}: a SentencePiece model whose {what} is {value!r}; the Hugging Face "
                            f"tokenizer is written for models as `cpm-lightning tokenizer train` makes them ({wanted!r})")
    sp = tokenizer.sp
    fast = Fast(models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=sp.unk_id(),
                               byte_fallback=trainer.byte_fallback))
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    fast.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])])
    fast.add_special_tokens([AddedToken(sp.id_to_piece(i), normalized=False, special=True)
                             for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)])
    return fast


def read_tokenizer(hf_dir: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face directory: CPM-Ant's vocab.txt or a SentencePiece model."""
    for name in (CpmAntTokenizer.file_name, SentencePieceTokenizer.file_name):
        if (hf_dir / name).is_file():
            return Tokenizer.from_bytes((hf_dir / name).read_bytes(), str(hf_dir / name))
    found = ", ".join(sorted(p.name for p in hf_dir.glob("tokenizer*"))) or "none"
    raise UserError(f"{hf_dir}: no tokenizer cpm-lightning reads: expected {CpmAntTokenizer.file_name} (CPM-Ant) "
                    f"or {SentencePieceTokenizer.file_name} (SentencePiece); found {found}")


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """A UserError when the tokenizer makes ids the model has no embedding for."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{where}: the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens, more than "
                        f"the model's vocab_size {vocab_size}; expected the tokenizer the model was trained with")
