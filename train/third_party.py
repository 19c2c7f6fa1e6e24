"""What the CLIs change of third-party libraries' process-wide output: warnings and log records.

Each CLI's ``main`` calls `quiet` first. Library code never does: a Python caller's process keeps its own
warnings filters and logging.
"""

from __future__ import annotations

import logging
import warnings


def quiet() -> None:
    """Keeps a refused command to its one ``error:`` line: drops warnings about things the run cannot act on, or
    that its own error line says better.

    - urllib3's warning that SOCKS proxies need PySocks. requests imports urllib3's SOCKS support on whichever
      thread imports it first (transformers' hub code, or tensorboardX on the reporting warm-up thread), and
      without PySocks urllib3 warns to stderr, about a proxy kind no run uses.
    - transformers' notice that its Flax classes go away in v5: the project pins transformers below 5 for them.
    - huggingface_hub's line for each failed hub request: a model that cannot be fetched is refused with the
      cause in its error line, and one fetched after a retry needs no warning.
    - transformers' advice to upcast a checkpoint stored in float16 or bfloat16 (Llama-2's hub weights), which
      lists every weight: a run casts the weights to its ``--dtype`` itself.

    The log filters sit on the emitting loggers, so they hold whichever handler would print the record
    (the library's own, or the root logger's too: transformers propagates there when the environment sets CI).
    """
    warnings.filterwarnings("ignore", message="SOCKS support in urllib3 requires", module="urllib3")
    _print_each_record_once()
    logging.getLogger("transformers.modeling_flax_utils").addFilter(_FLAX_NOTICE)  # the same filter: added once
    logging.getLogger("transformers.modeling_flax_utils").addFilter(_HALF_PRECISION_ADVICE)
    logging.getLogger("huggingface_hub.utils._http").addFilter(_HUB_REQUEST_ERROR)


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
    """Passes a record unless a logger between its own and the root has a handler that prints (a
    ``NullHandler``, which libraries such as urllib3 add, does not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        while logger is not logging.root:
            if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
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


_FLAX_NOTICE = _DropMessages("TensorFlow and JAX classes are deprecated")
_HUB_REQUEST_ERROR = _DropMessages("thrown while requesting")
_HALF_PRECISION_ADVICE = _DropMessages("You should probably UPCAST the model weights")
