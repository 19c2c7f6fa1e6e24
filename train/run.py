"""Fine-tune an HF Flax model with RoCoFT (or a baseline) on GLUE, SQuAD, summarization or LLM-Adapters tasks.

    python -m train.run                                   # offline demo: tiny model, generated task
    python -m train.run --model roberta-large --task rte --rank 3
    python -m train.run --model roberta-base --task squad_v2 --rank 3
    python -m train.run --model facebook/bart-large --task xsum --rank 3
    python -m train.run --model meta-llama/Llama-2-7b-hf --task boolq --data-dir LLM-Adapters/dataset

Options come from configs/<kind>/<task>.yaml (the paper's Table 10), overridden by
flags. Outputs go to --output-dir: results.json, metrics.jsonl, config.yaml,
curves.png and checkpoints/ (tasks scored by generation or spans: also their
predictions). Exit codes: 0 when the run finished, 2 on bad
input, 3 when training diverged (a non-finite loss or gradient; see --on-nonfinite),
1 on anything else; 2 and 3 come with one line ``error: ...`` on stderr.
"""

from __future__ import annotations

import os
import sys

from train import config as config_lib
from train import third_party
from train.errors import ConfigError, NonFiniteError, UserError


def main(argv=None) -> int:
    third_party.quiet()
    try:
        config = config_lib.parse(argv, description=__doc__)
        from train import distributed  # heavy imports after the options are checked
        from train.trainer import train_and_evaluate

        try:
            distributed.initialize(
                config.coordinator_address,
                config.num_processes or None,
                None if config.process_id < 0 else config.process_id,
                config.heartbeat_timeout,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err
        train_and_evaluate(config)
        distributed.finish()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


def without_torch() -> None:
    """Tells transformers (and datasets) not to import PyTorch, unless the user's USE_TORCH says otherwise.

    Where PyTorch is installed their import pulls it in, and scikit-learn with it: 2-4 s of every run, which
    uses neither. A PyTorch checkpoint (pytorch_model.bin) still loads: HF's conversion imports torch itself.
    Only the CLI does this: a Python caller's process may want transformers' PyTorch classes.
    """
    os.environ.setdefault("USE_TORCH", "0")


if __name__ == "__main__":
    without_torch()
    sys.exit(main())
