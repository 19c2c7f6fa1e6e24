"""Score a JSON-lines file with several adapters of one base model, mixing them within each batch.

    python -m train.serve --adapter sst2=exported/sst2 --adapter rte=exported/rte --input requests.jsonl
    python -m train.serve --adapter boolq=exported/boolq --input prompts.jsonl --output answers.jsonl

Each adapter is a directory written by ``python -m train.export --format adapter``, named ``NAME=DIR`` (or by
the directory's name). Every input line is a JSON object naming its adapter in ``task``:

- encoders (GLUE-style heads): ``{"task": "rte", "text": "...", "text_pair": "..."}`` (``text_pair``
  optional) gives ``{"task", "logits", "prediction"}``; a regression head (one output) gives ``score``;
- causal LMs: ``{"task": "boolq", "prompt": "..."}`` gives ``{"task", "generation"}``, by greedy decoding
  of ``--max-new-tokens`` tokens.

The base model is loaded once, as the first adapter's run loaded it (``--model`` overrides where it lives);
every adapter is checked against it (family, shapes, fingerprint). Lines are batched in file order,
whatever their task, and each row runs its own adapter (`rocoft_jax.mixed`). Output lines follow the input
order, to ``--output`` or stdout. Bad input (an adapter for another base, adapters of different families, a
corrupt adapter, a malformed line) is one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from train import options as opt
from train import strict_json, third_party
from train.errors import ConfigError, DataError, UserError


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` (or ``DIR``, named by its last part) -> {name: dir}; names must be unique."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise ConfigError(f"--adapter {spec!r}: write NAME=DIR")
        if name in named:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is given twice; name each adapter NAME=DIR")
        named[name] = Path(path)
    return named


def read_requests(path: Path, names: tuple[str, ...], field: str) -> list[dict[str, Any]]:
    """The lines of ``path``, each a JSON object with a known ``task`` and a string ``field``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"--input {path}: {err.strerror}") from err
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"--input {path} line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or record.get("task") not in names:
            task = record.get("task") if isinstance(record, dict) else None
            raise DataError(
                f"--input {path} line {number}: 'task' is {task!r}; name one of the adapters: {', '.join(names)}"
            )
        if not isinstance(record.get(field), str):
            raise DataError(f"--input {path} line {number}: needs a string {field!r}")
        if "text_pair" in record and not isinstance(record["text_pair"], str):
            raise DataError(f"--input {path} line {number}: 'text_pair' must be a string")
        requests.append(record)
    if not requests:
        raise DataError(f"--input {path} holds no request")
    return requests


def base_config(adapter, model: str | None):
    """The `TrainConfig` that loads the adapter's base model (``model`` replaces where it lives)."""
    from train.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    recorded = adapter.config.get("extra", {}).get("config", {})
    config = TrainConfig(**{k: v for k, v in recorded.items() if k in known})
    return dataclasses.replace(config, model=model or config.model, adapter=None)


def encode(tokenizer, requests, max_length: int) -> dict[str, np.ndarray]:
    """Each request's text (and text pair) tokenized on its own, as its task's run did, right-padded."""
    rows = [tokenizer(r["text"], r.get("text_pair"), truncation=True, max_length=max_length) for r in requests]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    out = {}
    for key in (k for k in pad if k in rows[0]):
        array = np.full((len(rows), max_length), pad[key], np.int32)
        for i, row in enumerate(rows):
            array[i, : len(row[key])] = row[key]
        out[key] = array
    return out


def score(requests, model, params, tokenizer, stacked, kind: str, args) -> list[dict[str, Any]]:
    """One output record per request, in order; batches of ``args.batch_size`` rows mix adapters."""
    from rocoft_jax import mixed

    out = []
    for start in range(0, len(requests), args.batch_size):
        chunk = requests[start : start + args.batch_size]
        ids = np.array([stacked.index(r["task"]) for r in chunk], np.int32)
        fill = args.batch_size - len(chunk)  # a full batch always: one compiled program
        ids = np.concatenate([ids, np.zeros(fill, np.int32)])
        if kind == "encoder":
            inputs = encode(tokenizer, chunk + [chunk[0]] * fill, args.max_length)
            logits = np.asarray(mixed.logits(model, params, stacked, inputs, ids))
            for row, request in enumerate(chunk):
                size = stacked.num_outputs[ids[row]] if stacked.num_outputs else logits.shape[-1]
                values = logits[row, :size].astype(float).tolist()
                result = {"task": request["task"], "logits": values}
                result.update({"score": values[0]} if size == 1 else {"prediction": int(np.argmax(values))})
                out.append(result)
        else:
            from train import generate as generate_lib
            from train.input_pipeline import bucket_lengths, fit_bucket

            prompts = tokenizer([r["prompt"] for r in chunk])["input_ids"]
            prompts += [prompts[0]] * fill
            longest = max(len(p) for p in prompts)
            batch = generate_lib.left_pad(prompts, fit_bucket(bucket_lengths(longest), longest), args.pad_id)
            tokens = np.asarray(
                mixed.generate(
                    model,
                    params,
                    stacked,
                    batch["input_ids"],
                    batch["attention_mask"],
                    ids,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=args.pad_id,
                )
            )
            for row, request in enumerate(chunk):
                new = tokens[row].tolist()
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id)]
                out.append({"task": request["task"], "generation": tokenizer.decode(new, skip_special_tokens=True)})
    return out


def serve(args) -> list[dict[str, Any]]:
    """Loads the adapters and their base, scores ``args.input``; returns the output records."""
    from rocoft_jax import mixed
    from train import adapters as adapters_cli
    from train import tasks
    from train.errors import CheckpointError

    loaded = {name: adapters_cli.read(path) for name, path in parse_adapters(args.adapter).items()}
    first = next(iter(loaded.values()))
    config = base_config(first, args.model)
    task_kind = tasks.lookup(config.task)[0]
    if task_kind not in ("glue", "demo", "llm"):
        raise ConfigError(
            f"adapter {first.source} is for task {config.task}; train.serve scores classification and regression "
            "heads (GLUE) and generates with causal LMs"
        )
    kind = "causal-lm" if task_kind == "llm" else "encoder"
    requests = read_requests(args.input, tuple(loaded), "prompt" if kind == "causal-lm" else "text")
    model, params, tokenizer = tasks.load_model_and_tokenizer(config)
    try:
        stacked = mixed.stack(params, loaded)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    args.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return score(requests, model, params, tokenizer, stacked, kind, args)


def main(argv=None) -> int:
    third_party.quiet()
    parser = opt.new_parser("python -m train.serve", __doc__)
    parser.add_argument("--adapter", action="append", required=True, help="NAME=DIR of an adapter (repeat for each)")
    parser.add_argument("--input", required=True, type=Path, help="JSON lines, each naming its adapter in 'task'")
    parser.add_argument("--output", type=Path, help="where the output lines go (default: stdout)")
    parser.add_argument("--model", help="where the base model lives, if not where the adapters' run found it")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    parser.add_argument("--max-length", type=int, default=128, help="encoders: tokens per text (default 128)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="causal LMs: tokens generated (default 32)")
    try:
        args = parser.parse_args(argv)
        for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
            if value < 1:
                raise ConfigError(f"{flag} {value}: must be at least 1")
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
        records = serve(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = "".join(strict_json.dumps(r) + "\n" for r in records)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
