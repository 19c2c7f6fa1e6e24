"""Fine-tune an HF Flax model with RoCoFT (or a baseline) on a GLUE task or an LLM-Adapters task.

    python -m train.run                                   # offline demo: tiny model, generated task
    python -m train.run --model roberta-large --task rte --rank 3
    python -m train.run --model meta-llama/Llama-2-7b-hf --task boolq --data-dir LLM-Adapters/dataset

Options come from configs/glue/<task>.yaml or configs/llm/<task>.yaml (the paper's
Table 10), overridden by flags. Outputs go to --output-dir: results.json,
metrics.jsonl, config.yaml, curves.png and checkpoints/ (LLM tasks, scored by
generation: also predictions.jsonl).
"""

from __future__ import annotations

import argparse
import sys

from train import checkpoint, config as config_lib, models
from train.errors import DataError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_lib.resolve(args)
        from train import distributed  # heavy imports after the arguments are checked

        try:
            distributed.initialize(config.coordinator_address, config.num_processes or None,
                                   None if config.process_id < 0 else config.process_id,
                                   config.heartbeat_timeout)
        except ValueError as err:
            raise config_lib.ConfigError(str(err)) from err
        from train.trainer import train_and_evaluate

        train_and_evaluate(config)
        distributed.finish()
    except (config_lib.ConfigError, DataError, models.ModelError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
