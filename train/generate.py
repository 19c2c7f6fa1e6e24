"""Evaluation by generation, as LLM-Adapters scores it (its commonsense_evaluate.py and evaluate.py).

Each test record's instruction goes into the evaluation prompt (`llm_data.format_eval_prompt`; the
reference output never does). Prompts are left-padded into batches and continued by greedy or beam search,
never sampling, with HF Flax ``generate`` and its KV cache, run through the method's own layers (the
sliced matmul for RoCoFT), as in training: no merged copy of the weights is made, which at 7B would be
another 13 GB. The decoded prompt plus generation goes through `llm_data.extract_answer` and
`llm_data.is_correct`.

Prompts are padded to a power-of-two length bucket, so ``generate`` compiles once per bucket and is reused
by later evaluations. Each process feeds its rows of every global batch and receives all generations; with
several processes every batch takes the largest bucket, so all agree on one shape, compiled before they
meet. Only process 0 writes predictions.jsonl.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm
from transformers import GenerationConfig

import rocoft_jax
from train import distributed, strict_json
from train import input_pipeline as pipeline
from train.errors import DataError
from train.llm_data import LlmTask, extract_answer, format_eval_prompt, is_correct

PREDICTIONS_FILE = "predictions.jsonl"


def max_positions(model_config) -> int | None:
    """Positions the model can attend over (prompt plus generation); None for ALiBi (Bloom)."""
    return getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)


class Generator:
    """Answers a task's test records with one model and method; compiled programs persist across evaluations."""

    def __init__(
        self,
        model,
        method,
        tokenizer,
        task: LlmTask,
        *,
        max_new_tokens: int,
        num_beams: int,
        batch_size: int,
        batch_sharding: NamedSharding,
    ):
        self.model, self.method, self.tokenizer, self.task = model, method, tokenizer, task
        self.max_new_tokens, self.num_beams, self.batch_size = max_new_tokens, num_beams, batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.batch_sharding = batch_sharding
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        self._generate = jax.jit(self._continue, out_shardings=NamedSharding(batch_sharding.mesh, PartitionSpec()))
        self._compiled: dict[int, object] = {}
        self.compile_seconds = 0.0

    def _continue(self, trainable, frozen, input_ids, attention_mask):
        """The generated tokens after each left-padded prompt; pad after EOS."""
        with self.method.layers(trainable):
            out = self.model.generate(
                input_ids,
                generation_config=self.config,
                attention_mask=attention_mask,
                params=rocoft_jax.with_trained_leaves(frozen, trainable),
            )
        return out.sequences[:, input_ids.shape[1] :]

    def check_positions(self, prompts: list[list[int]]) -> None:
        """Each prompt plus its generation must fit the model's positions."""
        limit = max_positions(self.model.config)
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        if limit is not None and len(prompts[longest]) + self.max_new_tokens > limit:
            raise DataError(
                f"test example {longest} has a {len(prompts[longest])}-token prompt; with "
                f"--max-new-tokens {self.max_new_tokens} it exceeds the model's {limit} positions; "
                "lower --max-new-tokens or use a model with more positions"
            )

    def _compiled_for(self, trainable, frozen, ids, mask):
        """The program for this prompt length, compiled on first use; processes meet after compiling."""
        length = ids.shape[1]
        if length not in self._compiled:
            start = time.perf_counter()
            self._compiled[length] = self._generate.lower(trainable, frozen, ids, mask).compile()
            self.compile_seconds += time.perf_counter() - start
            distributed.barrier(f"generate_{length}")
        return self._compiled[length]

    def evaluate(self, trainable, frozen, records: list[dict], output_dir: Path | None) -> tuple[dict, dict]:
        """``({"accuracy"}, stats)`` over ``records``; writes predictions.jsonl when ``output_dir`` is given."""
        prompts = encode_prompts(self.tokenizer, records)
        self.check_positions(prompts)
        buckets = pipeline.bucket_lengths(max(len(p) for p in prompts))
        if jax.process_count() > 1:
            buckets = buckets[-1:]
        lines, generated, start, compiling = [], 0, time.perf_counter(), self.compile_seconds
        bar = tqdm(
            total=len(records),
            desc=f"generate {self.task.name}",
            unit="ex",
            dynamic_ncols=True,
            disable=output_dir is None,
        )
        for rows, weights in pipeline.eval_rows(len(records), self.batch_size):
            length = pipeline.fit_bucket(buckets, max(len(prompts[i]) for i in rows))
            mine = pipeline.shard_for_process(rows, jax.process_index(), jax.process_count())
            batch = distributed.batch_to_global(
                left_pad([prompts[i] for i in mine], length, self.pad_id), self.batch_sharding, len(rows)
            )
            args = (trainable, frozen, batch["input_ids"], batch["attention_mask"])
            tokens = np.asarray(self._compiled_for(*args)(*args))
            for i, new in zip(rows[weights > 0], tokens[weights > 0]):
                line, n_new = self.score(int(i), records[i], prompts[i], new.tolist())
                lines.append(line)
                generated += n_new
            bar.update(int(weights.sum()))
            bar.set_postfix(
                tok_s=f"{generated / (time.perf_counter() - start):.0f}",
                acc=f"{sum(line['correct'] for line in lines) / len(lines):.3f}",
            )
        bar.close()
        if output_dir is not None:
            with open(Path(output_dir) / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
                f.writelines(strict_json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        stats = {
            "examples": len(records),
            "generated_tokens": generated,
            "seconds": round(time.perf_counter() - start, 3),
            "compile_seconds": round(self.compile_seconds - compiling, 3),
        }
        return {"accuracy": sum(line["correct"] for line in lines) / len(records)}, stats

    def score(self, index: int, record: dict, prompt: list[int], new: list[int]) -> tuple[dict, int]:
        """A predictions.jsonl line and its count of generated tokens before EOS.

        The answer is read from the decoded prompt plus generation, as the originals do.
        """
        stop = new.index(self.eos_id) if self.eos_id in new else len(new)
        text = self.tokenizer.decode(prompt + new[:stop], skip_special_tokens=True)
        prediction = extract_answer(self.task.name, text)
        line = {
            "index": index,
            "instruction": record["instruction"],
            "generation": self.tokenizer.decode(new[:stop], skip_special_tokens=True),
            "prediction": None if prediction == math.inf else prediction,  # math without any number
            "answer": record["answer"],
            "correct": bool(is_correct(self.task.name, prediction, record["answer"])),
        }
        return line, stop


def encode_prompts(tokenizer, records: list[dict]) -> list[list[int]]:
    """Token ids of each record's evaluation prompt: its instruction (and input), never its output."""
    return tokenizer([format_eval_prompt(r["instruction"], r["input"]) for r in records])["input_ids"]


def left_pad(prompts: list[list[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Prompts right-aligned in ``(len(prompts), length)`` int32 arrays, as decoder-only generation needs."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
