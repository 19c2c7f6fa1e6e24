"""The tasks `train.run` can train, and the one place that maps a task name to its kind.

The kinds, one module each, all behind the `Job` protocol (`train.tasks.base`):

- ``glue`` (`train.tasks.glue`): the GLUE benchmark, classification or STS-B regression, scored from logits;
- ``llm`` (`train.tasks.llm`): the LLM-Adapters commonsense and math sets, trained as a causal LM and scored
  by generation;
- ``qa`` (`train.tasks.qa`): extractive question answering on SQuAD v1.1 and v2.0, scored by Exact Match and F1;
- ``summarization`` (`train.tasks.summarization`): XSum and CNN/DailyMail, trained as a seq2seq LM and scored
  by ROUGE on generated summaries;
- ``demo`` (`train.tasks.demo`): a sentiment task generated offline, so the project trains with no download.

`lookup` accepts every spelling the data registries accept (``SST-2``, ``ARC-Challenge``) and returns the
canonical name; an unknown name is a `DataError` listing every task. The kind also picks the config file,
``configs/<kind>/<name>.yaml`` (``configs/demo.yaml`` for the demo). The trainer asks the job what it needs,
never the task name or the job's class. This module imports no JAX, so option parsing stays fast.
"""

from __future__ import annotations

import importlib

from train import glue as glue_data  # not `glue`: the submodule train.tasks.glue takes that name here
from train import llm_data, squad, summarization_data
from train.errors import DataError

KINDS = ("glue", "llm", "demo", "qa", "summarization")


def lookup(task: str) -> tuple[str, str]:
    """``(kind, canonical_name)`` of ``task``, kind in `KINDS`; an unknown name is an error listing every task."""
    for kind, registry in (
        ("glue", glue_data),
        ("llm", llm_data),
        ("qa", squad),
        ("summarization", summarization_data),
    ):
        try:
            name = registry.get_task(task).name
        except DataError:
            continue
        return ("demo" if name == "demo" else kind), name
    raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(names())}")


def names() -> list[str]:
    """Every canonical task name: the GLUE tasks, the demo, the LLM tasks, SQuAD, then summarization."""
    return [*glue_data.TASKS, *llm_data.TASKS, *squad.TASKS, *summarization_data.TASKS]


_JOBS = {
    "glue": ("train.tasks.glue", "GlueJob"),
    "llm": ("train.tasks.llm", "LlmJob"),
    "demo": ("train.tasks.demo", "DemoJob"),
    "qa": ("train.tasks.qa", "QaJob"),
    "summarization": ("train.tasks.summarization", "SummarizationJob"),
}


def job_class(task: str):
    """The `Job` class that trains ``task``; imported on demand, since the jobs import JAX."""
    module, name = _JOBS[lookup(task)[0]]
    return getattr(importlib.import_module(module), name)


def make_job(config):
    """The job of ``config.task``, its options checked."""
    return job_class(config.task)(config)


def load_model_and_tokenizer(config):
    """``(model, params, tokenizer)`` for ``config.task``, weights loaded, without reading its data (for
    `train.export` and `train.serve`)."""
    source = job_class(config.task).model_source(config)
    return source.model, source.load(), source.tokenizer
