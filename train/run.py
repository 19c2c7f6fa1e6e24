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

import logging
import os
import sys
import warnings

from train import config as config_lib
from train.errors import ConfigError, NonFiniteError, UserError


def main(argv=None) -> int:
    quiet_third_party_warnings()
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


def quiet_third_party_warnings() -> None:
    """Keeps a refused run to its one ``error:`` line: drops warnings about things the run cannot act on, or
    that its own error line says better.

    - urllib3's warning that SOCKS proxies need PySocks. requests imports urllib3's SOCKS support on whichever
      thread imports it first (transformers' hub code, or tensorboardX on the reporting warm-up thread), and
      without PySocks urllib3 warns to stderr, about a proxy kind no run uses.
    - transformers' notice that its Flax classes go away in v5: the project pins transformers below 5 for them.
    - huggingface_hub's line for each failed hub request: a model that cannot be fetched is refused with the
      cause in its error line, and one fetched after a retry needs no warning.

    The log filters sit on the emitting loggers, so they hold whichever handler would print the record
    (the library's own, or the root logger's too: transformers propagates there when the environment sets CI).
    """
    warnings.filterwarnings("ignore", message="SOCKS support in urllib3 requires", module="urllib3")
    _print_each_record_once()
    logging.getLogger("transformers.modeling_flax_utils").addFilter(
        _DropMessages("TensorFlow and JAX classes are deprecated")
    )
    logging.getLogger("huggingface_hub.utils._http").addFilter(_DropMessages("thrown while requesting"))


def _print_each_record_once() -> None:
    """Gives the root logger a stderr handler that skips records a library's own handler already printed.

    absl's first log call (orbax logs one on import) gives the root logger a handler when it has none, and
    transformers and huggingface_hub both print with their own handler and propagate to the root: each of
    their warnings came out twice. Records of loggers without a handler of their own (JAX's) still print.
    """
    if any(isinstance(f, _NotPrintedYet) for h in logging.root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    handler.addFilter(_NotPrintedYet())
    logging.root.addHandler(handler)


class _NotPrintedYet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        while logger is not logging.root:
            if logger.handlers:
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


class _DropMessages(logging.Filter):
    """Drops the records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


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
