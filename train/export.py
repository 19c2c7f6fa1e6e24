"""Export a trained run as a merged, full HF model, or as an adapter of its base model.

    python -m train.export --checkpoint OUTPUT_DIR --out EXPORT_DIR [--format merged|adapter|peft]

The base model is reloaded as the run loaded it and checked against the
checkpoint's fingerprint; the slices (or adapters, or leaves) are merged in.
The result is written twice, from the same merged params: ``flax_model.msgpack``
(Flax's ``save_pretrained``) for the task's Flax auto class (sequence classification,
question answering, causal or seq2seq LM), and a PyTorch-layout ``model.safetensors``
for the matching PyTorch class, written with numpy alone, so exporting
needs no torch. (transformers 4.57 cannot load a Flax-format safetensors file
into PyTorch: its meta-device init drops the weights.)

``--format adapter`` writes only what the run trained (`rocoft_jax.adapters`: the slices, their indices and
the fully trained leaves, with the base's fingerprint) as ``adapter_model.safetensors`` and
``adapter_config.json``, for `rocoft_jax.adapters.load_adapter`, ``train.run --adapter`` and
``train.serve``. ``--format peft`` writes the same update as a peft LoRA adapter (`rocoft_jax.adapters.to_peft`),
for PyTorch's ``PeftModel.from_pretrained`` and other LoRA consumers; what LoRA cannot express exactly
(random entries, BitFit, LoRA or full runs) is refused in one line.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import rocoft_jax
from rocoft_jax import adapters as adapters_lib
from rocoft_jax.tree import flatten
from train import adapters, strict_json, third_party
from train import checkpoint as ckpt
from train import methods as methods_lib
from train import options as opt
from train.config import TrainConfig
from train.errors import CheckpointError, UserError

FORMATS = ("merged", "adapter", "peft")


def checkpoint_dir(path: Path) -> Path:
    """Accepts a run's output dir or its checkpoints/ dir."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_trained(path: Path):
    """``(model, method, trainable, frozen, tokenizer, meta)`` of a run's latest checkpoint."""
    from train.tasks import load_model_and_tokenizer

    meta, trainable = ckpt.load(checkpoint_dir(path))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in meta["config"].items() if k in known})  # options of any version
    model, params, tokenizer = load_model_and_tokenizer(config)
    method = methods_lib.restore_method(params, meta["selection"])
    _, frozen = method.split(params)
    if ckpt.fingerprint(frozen) != meta["fingerprint"]:
        raise ckpt.CheckpointError(
            f"the base weights of --model {config.model} no longer match the checkpoint's fingerprint "
            f"{meta['fingerprint']}; export needs the exact base model the run was trained from"
        )
    return model, method, trainable, frozen, tokenizer, meta


def torch_state_dict(params) -> dict[str, np.ndarray]:
    """HF PyTorch names and layouts: dots, ``weight`` for kernels (transposed), norm scales and embeddings."""
    out = {}
    for path, value in flatten(params).items():
        parts = path.split("/")
        value = np.asarray(value, np.float32)
        if parts[-1] == "kernel":
            parts[-1], value = "weight", value.T
        elif parts[-1] in ("scale", "embedding"):
            parts[-1] = "weight"
        out[".".join(parts)] = np.ascontiguousarray(value)
    return out


def export(path: Path, out: Path, fmt: str = "merged") -> Path:
    """Writes the run at ``path`` into ``out`` in format ``fmt`` (`FORMATS`); returns ``out``."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model, method, trainable, frozen, tokenizer, meta = load_trained(path)
    if fmt != "merged":
        adapter = adapters.of_run(method, trainable, meta, model)
        if fmt == "adapter":
            return adapters_lib.save_adapter(adapter, out)
        try:
            return adapters_lib.save_peft(adapter, rocoft_jax.with_trained_leaves(frozen, trainable), out)
        except ValueError as err:
            raise CheckpointError(f"--format peft: {err}") from err
    merged = method.merge(trainable, frozen)
    merged = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), merged)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, params=merged)
    safetensors.numpy.save_file(torch_state_dict(merged), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    provenance = {k: meta[k] for k in ("model", "fingerprint", "selection")}
    (out / "rocoft.json").write_text(strict_json.dumps(provenance) + "\n")
    return out


def main(argv=None) -> int:
    third_party.quiet()
    parser = opt.new_parser("python -m train.export", __doc__)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a train.run output dir or its checkpoints/")
    parser.add_argument("--out", required=True, type=Path, help="directory for the export")
    parser.add_argument(
        "--format",
        default="merged",
        choices=FORMATS,
        help="merged: the full HF model (Flax and PyTorch); adapter: the trained slices and leaves only; "
        "peft: the same update as a peft LoRA adapter",
    )
    try:
        args = parser.parse_args(argv)
        out = export(args.checkpoint, args.out, args.format)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "merged":
        print(f"exported the merged model to {out}")
    else:
        what = "adapter" if args.format == "adapter" else "peft LoRA adapter"
        print(f"exported the {what} ({adapters_lib.num_bytes(out):,} bytes) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
