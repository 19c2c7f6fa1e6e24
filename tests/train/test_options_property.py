"""train.run on drawn option values: exit 0, or exit 2 with one ``error:`` line naming the option; never a traceback.

Hypothesis draws values for the options `train.options.specs(TrainConfig)` declares, from each one's declared type,
range and choices, so an option added to `TrainConfig` is drawn without a change here. A value goes in as a flag
(``--flag value`` or ``--flag=value``) or as a key of a ``--config`` YAML file, where YAML's own types (``.nan``,
``null``, lists, mappings) reach the checks too. Bad values are refused before any model loads, so most examples
are bad ones and cost nothing; valid draws train the offline demo for two steps, a few per default run (more
under ``-m slow``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import traceback

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from train import options as opt
from train import run
from train.config import MODES, WANDA_STRATEGIES, TrainConfig

SPECS = opt.specs(TrainConfig)
# Options whose valid values start work beyond one short offline run (a hub download, another task's data, a
# multi-process rendezvous, a mesh of other devices) or bound its cost: their valid values stay fixed, their bad
# ones are drawn like any other's.
FIXED = {
    "model", "task", "data_dir", "train_file", "output_dir", "resume", "max_steps", "epochs",
    "batch_size", "eval_batch_size", "limit_train", "limit_eval", "max_length", "eval_every", "save_every", "mesh",
    "coordinator_address", "num_processes", "process_id", "heartbeat_timeout", "attention", "remat",
    "calibration_batches", "print_sharding", "grad_accum", "eval_only",
}  # fmt: skip
# Every valid run: two steps of the demo on a few short examples.
CHEAP = ["--max-steps", "2", "--batch-size", "2", "--max-length", "8", "--limit-train", "4", "--limit-eval", "2"]
WORDS = ["", " ", "many", "1,000", "0x10", "one", "3 4", "[1]", "None", "null", "-", "--", "\u00e9t\u00e9", "\x00"]
NON_FINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400"]


def names_option(message: str, name: str) -> bool:
    """The message names the option: its flag, an alias, or "unknown <option> ..." (``unknown task 'x'``)."""
    spellings = (opt.flag(name), *SPECS[name].aliases, f"unknown {name.replace('_', ' ')} ")
    return any(s in message for s in spellings)


def text(value) -> str:
    """A number as a user types it (repr keeps every digit of a float)."""
    return repr(value) if isinstance(value, float) else str(value)


def is_number_text(value: str) -> bool:
    try:
        float(value.strip())
    except ValueError:
        return False
    return True


def outside(spec: opt.Spec, integral: bool) -> st.SearchStrategy:
    """Finite numbers outside ``spec.range``."""
    low, high = spec.range.low, spec.range.high
    parts = []
    if low is not None:
        if integral:  # integer options have integer bounds
            parts.append(st.integers(max_value=int(low) - (0 if spec.range.low_open else 1)))
        else:
            parts.append(st.floats(max_value=low, exclude_max=not spec.range.low_open, allow_nan=False,
                                   allow_infinity=False))  # fmt: skip
    if high is not None:
        if integral:
            parts.append(st.integers(min_value=int(high) + (0 if spec.range.high_open else 1)))
        else:
            parts.append(st.floats(min_value=high, exclude_min=not spec.range.high_open, allow_nan=False,
                                   allow_infinity=False))  # fmt: skip
    return st.one_of(parts)


def bad_flag_values(name: str) -> st.SearchStrategy | None:
    """Text that ``--<name>`` must refuse, from the option's declared type, range and choices alone."""
    spec = SPECS[name]
    junk = st.sampled_from(WORDS) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
    if spec.kind is bool:  # argparse drops a value "--" of a flag whose value is optional: the flag alone is true
        return junk.filter(lambda v: v.lower() not in ("true", "1", "yes", "false", "0", "no", "--"))
    if spec.kind in (int, float, opt.NUMBER):
        parts = [junk.filter(lambda v: not is_number_text(v)), st.sampled_from(NON_FINITE)]
        if spec.kind is int:
            fractions = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: not x.is_integer())
            parts.append(fractions.map(text))
        if spec.range is not None:
            parts.append(outside(spec, spec.kind is int).map(text))
        if name == "rank":  # rows or columns: a positive integer (the default mode is row)
            parts += [st.integers(max_value=0).map(str), st.floats(0.01, 50).filter(lambda x: x % 1).map(text)]
        return st.one_of(parts)
    if spec.choices is not None:
        return junk.filter(lambda v: v not in spec.choices) | st.sampled_from(spec.choices).map(str.upper).filter(
            lambda v: v not in spec.choices
        )
    if name == "mesh":
        axis = st.sampled_from(["data", "fsdp", "tensor"])
        return st.one_of(
            st.sampled_from(["gpu=2", "data", "data=", "data=-1", "data=x", "=2", "data=2=2", "Data=2"]),
            st.tuples(axis, st.sampled_from(["0", "00", "1.5", " 2", "two"])).map("=".join),
            st.tuples(axis, st.integers(1, 4)).map(lambda a: f"{a[0]}={a[1]},{a[0]}={a[1]}"),
        )
    if name == "task":
        return st.sampled_from(["mnli2", "glue", "sst-3", "", "boolq2", "arc"])
    if name in ("output_dir", "compile_cache"):  # directories: one must be named
        return st.sampled_from(["", " ", "\t"])
    return None  # paths and addresses (--model, --data-dir, ...) are checked where they are used


def bad_yaml_values(name: str) -> st.SearchStrategy:
    """Values of a YAML key ``<name>`` that must be refused: YAML's own types, and every bad flag text."""
    spec = SPECS[name]
    typed = [st.sampled_from([[1, 2], {"a": 1}, []])]
    if not spec.optional:
        typed.append(st.none())
    if spec.kind in (int, float, opt.NUMBER):
        typed += [st.sampled_from([math.nan, math.inf, -math.inf, True, False])]
        if spec.range is not None:
            typed.append(outside(spec, spec.kind is int))
    elif spec.kind is bool:
        typed.append(st.integers().filter(lambda v: v not in (0, 1)) | st.floats(allow_nan=False))
    flags = bad_flag_values(name)
    return st.one_of(typed + ([flags] if flags is not None else []))


BAD_BY_FLAG = {name: s for name in SPECS if (s := bad_flag_values(name)) is not None}


def valid_values(name: str) -> st.SearchStrategy:
    """Values of a drawn option that are valid on their own and keep a run short (numbers near the low bound)."""
    spec = SPECS[name]
    if spec.kind is bool:
        return st.sampled_from(["true", "false", "1", "0", "yes", "no", "TRUE"])
    if spec.choices is not None:
        return st.sampled_from(spec.choices)
    bounds = spec.range or opt.Range()
    low = bounds.low if bounds.low is not None else 0
    if spec.kind is int:
        return st.integers(int(low) + (1 if bounds.low_open else 0), int(low) + 4).map(str)
    high = min(bounds.high, low + 1) if bounds.high is not None else low + 1
    return st.floats(low, high, exclude_min=bounds.low_open, exclude_max=bounds.high_open).map(text)


@st.composite
def valid_options(draw) -> dict[str, str]:
    """A valid combination of every option not in FIXED: rows or columns with an integer rank and any strategy,
    or random entries with a probability and no Wanda strategy."""
    drawable = {n for n, s in SPECS.items() if s.kind in (bool, int, float) or s.choices}
    names = sorted(drawable - FIXED - {"mode", "rank", "probability", "strategy"})
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    values = {name: draw(valid_values(name)) for name in chosen}
    mode = draw(st.sampled_from(MODES))
    values["mode"] = mode
    if mode == "random":
        values["probability"] = draw(valid_values("probability"))
        strategies = [s for s in SPECS["strategy"].choices if s not in WANDA_STRATEGIES]
    else:
        values["rank"] = str(draw(st.integers(1, 4)))
        strategies = SPECS["strategy"].choices
    if draw(st.booleans()):
        values["strategy"] = draw(st.sampled_from(strategies))
    if values.get("strategy") in WANDA_STRATEGIES:
        values["calibration_batches"] = "1"
    return values


def invoke(argv: list[str]) -> tuple[int, str]:
    """``train.run.main(argv)``'s exit code and stderr; an exception escaping ``main`` fails the test with its
    traceback (the CLI would have printed it)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run.main(argv)
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt escaping main are failures too
        pytest.fail(f"train.run {argv} raised instead of exiting:\n{traceback.format_exc()}")
    return code, err.getvalue()


def as_argv(values: dict[str, str], use_equals: bool) -> list[str]:
    """Flags as ``--flag value`` or ``--flag=value``; a true/false flag takes no separate value that starts
    with "-" (argparse reads it as the next flag, and the flag alone as true)."""
    argv = []
    for name, value in values.items():
        joined = use_equals or (SPECS[name].kind is bool and value.startswith("-"))
        argv += [f"{opt.flag(name)}={value}"] if joined else [opt.flag(name), value]
    return argv


@st.composite
def bad_case(draw) -> tuple[str, dict, str, object, bool]:
    """``(bad option, other valid flags, "flag" or "yaml", its value, --flag=value form)``."""
    where = draw(st.sampled_from(["flag", "flag", "yaml"]))
    # --output-dir is always a flag here, and a flag overrides the file
    name = draw(st.sampled_from(sorted(BAD_BY_FLAG if where == "flag" else set(SPECS) - {"output_dir"})))
    value = draw(BAD_BY_FLAG[name] if where == "flag" else bad_yaml_values(name))
    others = {k: v for k, v in draw(valid_options()).items() if k != name}
    if name in ("mode", "rank", "probability", "strategy"):
        others = {}  # these options tie together: the bad one alone
    return name, others, where, value, draw(st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bad_case())
@example(case=("lr", {}, "yaml", None, False))  # ``lr:`` left empty in a file: null, not a number
@example(case=("seed", {}, "flag", "1e30", False))  # beyond any RNG seed
@example(case=("max_length", {}, "flag", "1e30", False))  # beyond what a padded batch can hold
@example(case=("output_dir", {}, "flag", "", True))  # no directory, so never the current one
@example(case=("batch_size", {}, "flag", "0", False))
@example(case=("lr", {}, "flag", "nan", False))
def test_bad_value_exits_2_with_one_line_naming_it(tmp_path_factory, case):
    name, others, where, value, use_equals = case
    out = tmp_path_factory.mktemp("bad") / "out"
    argv = ["--output-dir", str(out), *as_argv(others, use_equals)]
    if where == "flag":  # "--lr -inf" is a flag without its value to argparse: refused as such, naming --lr
        argv += as_argv({name: value}, use_equals)
    else:
        path = out.parent / "options.yaml"
        path.write_text(yaml.safe_dump({name: value}))
        argv += ["--config", str(path)]
    code, err = invoke(argv)
    assert code == 2, (argv, err)
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert names_option(err, name), err
    assert "Traceback" not in err
    assert not out.exists()  # refused before any work


def check_valid_run(tmp_path_factory, values: dict[str, str], use_equals: bool) -> None:
    out = tmp_path_factory.mktemp("valid") / "out"
    argv = [*CHEAP, "--output-dir", str(out), *as_argv(values, use_equals)]
    code, err = invoke(argv)
    assert code == 0, (argv, err)
    assert "Traceback" not in err and "error:" not in err, err
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and (out / "config.yaml").is_file()


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=valid_options(), use_equals=st.booleans())
def test_valid_values_train(tmp_path_factory, values, use_equals):
    check_valid_run(tmp_path_factory, values, use_equals)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=valid_options(), use_equals=st.booleans())
def test_valid_values_train_many(tmp_path_factory, values, use_equals):
    check_valid_run(tmp_path_factory, values, use_equals)


def test_every_checked_option_has_bad_values():
    """An option declared with a type, range or choices gets bad values drawn, whatever its name."""
    checked = {n for n, s in SPECS.items() if s.kind is not str or s.choices or s.check or s.range}
    assert checked <= set(BAD_BY_FLAG), sorted(checked - set(BAD_BY_FLAG))
