"""Text in, model out: the ``seqmoe tokenizer train``, ``seqmoe export`` and ``seqmoe generate`` commands.

    seqmoe tokenizer train --config configs/tiny-cpu.toml --vocab-size 1024 --out tokenizer.json
    seqmoe train configs/tiny-cpu.toml --data.tokenizer=tokenizer.json --model.vocab_size=1024
    seqmoe export runs/tiny-cpu --out exported/
    seqmoe generate --export exported/ --prompt "def " --max-new-tokens 64

Each prints one line naming the problem and the fix on bad input (exit 2 for a bad option or
config, 1 for unusable files), never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from runtime.config import ConfigError, load_config

__all__ = ["register"]


def _fail(command: str, exc: Exception, code: int) -> int:
    print(f"seqmoe {command}: {exc}", file=sys.stderr)
    return code


def _cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from runtime.data import DataError, embedded_texts, jsonl_texts
    from runtime.tokenizer import train_bpe

    config = load_config(args.config, overrides)
    data = config.data
    try:
        if data.source == "embedded":
            texts, where = embedded_texts(), "the embedded corpus"
        elif data.source == "jsonl":
            texts, where = jsonl_texts(data.path, data.text_key), data.path
        else:
            raise ConfigError(
                "data.source='megatron' is already token ids; train the tokenizer on the text it was made from "
                "(data.source='jsonl' with data.path=...)"
            )
        trained = train_bpe(texts, args.vocab_size, args.out)
    except DataError as exc:
        return _fail("tokenizer train", exc, 1)
    vocab = trained.tokenizer.vocab_size
    print(
        f"trained a byte-level BPE of {vocab} tokens on {trained.documents} documents "
        f"({trained.bytes / 1e6:.1f} MB) of {where} in {trained.seconds:.1f} s; wrote {args.out}"
    )
    if vocab < args.vocab_size:
        print(f"(the data supports only {vocab} tokens, fewer than --vocab-size {args.vocab_size})")
    print(f"use it with: --data.tokenizer={args.out} --model.vocab_size={vocab}")
    return 0


def _cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from runtime.export import ExportError, export_checkpoint

    try:
        result = export_checkpoint(args.path, args.out)
    except ExportError as exc:
        return _fail("export", exc, 1)
    print(
        f"exported {result.checkpoint} (step {result.step}): {result.num_parameters:,} parameters in "
        f"{result.num_tensors} tensors -> {result.out_dir}/model.safetensors + config.json"
    )
    return 0


def _cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from runtime.export import ExportError, load_checkpoint_model, load_exported
    from runtime.generate import GenerateError, resolve_device, sample

    try:
        device = resolve_device(args.device)
        model, tokenizer, _ = load_exported(args.export) if args.export else load_checkpoint_model(args.checkpoint)
        prompt_ids = tokenizer.encode(args.prompt)
        new_ids = sample(
            model,
            prompt_ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            device=device,
        )
    except (ExportError, GenerateError) as exc:
        return _fail("generate", exc, 1 if isinstance(exc, ExportError) else 2)
    sys.stdout.write(tokenizer.decode(prompt_ids + new_ids) + "\n")
    return 0


def register(sub, add_config_args) -> None:
    """Add the tokenizer, export and generate subcommands to the ``seqmoe`` parser's subparsers."""
    tokenizer = sub.add_parser("tokenizer", help="train a BPE tokenizer on the config's data (text in)")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = tok_sub.add_parser(
        "train",
        help="fit a byte-level BPE on data.source (embedded corpus or JSONL) and write a tokenizer.json",
        description="Fit a byte-level BPE (every string round-trips exactly) on the config's data; use the result "
        "with --data.tokenizer=PATH --model.vocab_size=N.",
    )
    add_config_args(train)
    train.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size (> 256)")
    train.add_argument("--out", required=True, metavar="PATH", help="where to write tokenizer.json")
    train.set_defaults(handler=_cmd_tokenizer_train, takes_overrides=True)

    export = sub.add_parser(
        "export",
        help="write a checkpoint as one model.safetensors + config.json (any ZeRO stage, any ep_size)",
        description="Consolidate a training checkpoint (experts gathered from their per-expert files) into "
        "DIR/model.safetensors and DIR/config.json, loadable in one process at ep_size 1.",
    )
    export.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run folder (newest checkpoint) or a step_* folder")
    export.add_argument("--out", required=True, metavar="DIR", help="output folder")
    export.set_defaults(handler=_cmd_export, takes_overrides=False)

    generate = sub.add_parser(
        "generate",
        help="sample text from a checkpoint or an export, in one process (CPU or GPU)",
        description="Sample a continuation of --prompt with full-sequence forwards (no KV cache).",
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder or a step_* folder")
    source.add_argument("--export", metavar="DIR", help="a folder written by seqmoe export")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add (default 64)")
    generate.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    generate.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest (0 = all)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    generate.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    generate.set_defaults(handler=_cmd_generate, takes_overrides=False)
