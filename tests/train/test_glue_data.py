"""GLUE registry and loaders: real files where present, exact-layout fixtures otherwise."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from train.errors import DataError
from train.glue import GLUE_TASKS, get_task, load_glue, load_task
from train.tasks.demo import NEGATIVE, POSITIVE, make_demo_task

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
GLUE = DATA / "glue"
PARQUET = DATA / "glue_parquet"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives beside the repo)")
    return path


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("alias, name", [("sst-2", "sst2"), ("SST-2", "sst2"), ("sts-b", "stsb"), ("STS-B", "stsb"),
                                         ("MNLI", "mnli"), ("CoLA", "cola"), ("demo", "demo")])  # fmt: skip
def test_get_task_accepts_aliases(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(
        DataError, match="unknown task 'sst3'; valid tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte"
    ):
        get_task("sst3")


def test_registry_matches_glue_conventions():
    assert GLUE_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("mnli").metric_names == ("accuracy", "accuracy_mm")
    assert get_task("cola").main_metric == "matthews_correlation"
    assert get_task("qqp").metric_names == ("accuracy", "f1")
    for name in GLUE_TASKS:
        spec = get_task(name)
        assert spec.main_metric in spec.metric_names and 1 <= len(spec.text_keys) <= 2


# ---------------------------------------------------------------- real files


@pytest.mark.parametrize("folder, train, dev", [("RTE", 2490, 277), ("SST-2", 67349, 872), ("STS-B", 5749, 1500)])
def test_real_tsv_row_counts(folder, train, dev):
    root = need(GLUE / folder).parent
    for data_dir in (root, root / folder):  # the GLUE root or the task folder
        data = load_glue(folder, data_dir)
        assert set(data) == {"train", "validation"}
        assert [len(data[s]["label"]) for s in ("train", "validation")] == [train, dev]
        for split in data.values():
            assert len({len(col) for col in split.values()}) == 1


def test_real_label_conventions():
    rte = load_glue("rte", need(GLUE / "RTE"))
    assert rte["train"]["sentence2"][0] == "Weapons of Mass Destruction Found in Iraq."
    assert rte["train"]["label"][:2] == [1, 0]  # not_entailment, entailment
    sst = load_glue("sst2", need(GLUE / "SST-2"))
    assert sst["validation"]["sentence"][:2] == [
        "it 's a charming and often affecting journey . ",
        "unflinchingly bleak and desperate ",
    ]
    assert sst["validation"]["label"][:2] == [1, 0]  # 1 = positive
    stsb = load_glue("stsb", need(GLUE / "STS-B"))
    assert stsb["train"]["label"][:2] == [5.0, 3.8]
    assert all(isinstance(v, float) and 0.0 <= v <= 5.0 for v in stsb["validation"]["label"])


def test_rte_tsv_equals_parquet_row_for_row():
    tsv = load_glue("rte", need(GLUE / "RTE"))
    for data_dir in (need(PARQUET), PARQUET / "rte"):
        assert load_glue("RTE", data_dir) == tsv


# ---------------------------------------------------------------- fixture layouts

BOM = "\ufeff"


def tsv(*rows: tuple[str, ...]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


MRPC_HEAD = (BOM + "Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")  # the BOM sticks to the first name
QQP_HEAD = ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
QNLI_HEAD = ("index", "question", "sentence", "label")
MNLI_HEAD = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2")  # fmt: skip


def mnli_row(i: int, *labels: str) -> tuple[str, ...]:
    parses = ("( ( a ) )", "( ( b ) )", "(ROOT (S a))", "(ROOT (S b))")
    return (str(i), "31193", "31193n", "government", *parses, f"Premise {i} .", f"Hypothesis {i} .", *labels)


FIXTURES = {
    "CoLA": {  # no header: source, label, original label, sentence
        "train.tsv": tsv(
            ("gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."),
            ("gj04", "0", "*", "They drank the pub."),
        ),
        "dev.tsv": tsv(
            ("clc95", "1", "", "The sailors rode the breeze clear of the rocks."),
            ("clc95", "0", "*", 'The more you "read, the less.'),
        ),
    },
    "MRPC": {
        "train.tsv": tsv(
            MRPC_HEAD,
            (
                "1",
                "702876",
                "702977",
                'Amrozi accused his brother , whom he called " the witness " , of distorting .',
                'Referring to him as only " the witness " , Amrozi accused his brother .',
            ),
            ("0", "2108705", "2108831", "Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's in 1995 ."),
        ),  # fmt: skip
        "dev.tsv": tsv(MRPC_HEAD, ("1", "1355540", "1355592", "He said .", "He stated .")),
    },
    "QQP": {
        "train.tsv": tsv(
            QQP_HEAD,
            ("133273", "213221", "213222", "How is the life of a math student?", "Which level is enough?", "0"),
            ("402555", "536040", "536041", "How do I control my emotions?", "How do you control yours?", "1"),
            ("1", "2", "3", "A malformed row with too few fields"),
        ),
        "dev.tsv": tsv(QQP_HEAD, ("201359", "303345", "303346", "Why?", "Why not?", "0")),
    },
    "QNLI": {
        "train.tsv": tsv(
            QNLI_HEAD,
            (
                "0",
                "When did the third Digimon series begin?",
                "Unlike the two before it, it is darker.",
                "not_entailment",
            ),
            ("1", "Which missile batteries have launchers?", "The missile batteries have launchers.", "entailment"),
        ),
        "dev.tsv": tsv(QNLI_HEAD, ("0", "What came into force?", "The law came into force.", "entailment")),
    },
    "MNLI": {  # train has one annotator label, dev has five; gold_label is last in both
        "train.tsv": tsv(
            (*MNLI_HEAD, "label1", "gold_label"),
            *(mnli_row(i, g, g) for i, g in enumerate(["neutral", "entailment", "contradiction"])),
        ),
        **{
            name: tsv(
                (*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label"),
                mnli_row(9, "neutral", "contradiction", "contradiction", "neutral", "contradiction", "contradiction"),
            )
            for name in ("dev_matched.tsv", "dev_mismatched.tsv")
        },
    },
}


def write_glue_root(root: Path) -> Path:
    for folder, files in FIXTURES.items():
        (root / folder).mkdir(parents=True)
        for name, text in files.items():
            (root / folder / name).write_text(text, encoding="utf-8")
    return root


def test_cola_without_header(tmp_path):
    data = load_glue("cola", write_glue_root(tmp_path))
    assert data["train"] == {
        "sentence": ["Our friends won't buy this analysis, let alone the next one we propose.", "They drank the pub."],
        "label": [1, 0],
    }
    assert data["validation"]["sentence"][1] == 'The more you "read, the less.'  # quotes are text


def test_mrpc_bom_and_columns(tmp_path):
    data = load_glue("MRPC", write_glue_root(tmp_path) / "MRPC")
    assert data["train"]["label"] == [1, 0]
    assert (
        data["train"]["sentence1"][0] == 'Amrozi accused his brother , whom he called " the witness " , of distorting .'
    )
    assert data["train"]["sentence2"][1] == "Yucaipa bought Dominick 's in 1995 ."
    assert data["validation"] == {"sentence1": ["He said ."], "sentence2": ["He stated ."], "label": [1]}


def test_qqp_skips_malformed_rows(tmp_path):
    data = load_glue("qqp", write_glue_root(tmp_path))
    assert data["train"]["label"] == [0, 1]
    assert data["train"]["question2"][1] == "How do you control yours?"


def test_qnli_text_labels(tmp_path):
    data = load_glue("qnli", write_glue_root(tmp_path))
    assert data["train"]["label"] == [1, 0]  # 0 = entailment
    assert set(data["validation"]) == {"question", "sentence", "label"}


def test_mnli_splits_and_labels(tmp_path):
    data = load_glue("mnli", write_glue_root(tmp_path))
    assert set(data) == {"train", "validation_matched", "validation_mismatched"}
    assert data["train"]["label"] == [1, 0, 2]  # entailment 0, neutral 1, contradiction 2
    assert data["train"]["premise"][0] == "Premise 0 ." and data["train"]["hypothesis"][2] == "Hypothesis 2 ."
    assert data["validation_mismatched"]["label"] == [2]  # gold_label, the last column


def test_mnli_parquet_splits(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "mnli").mkdir()
    for split, n in [("train", 3), ("validation_matched", 2), ("validation_mismatched", 1)]:
        for shard in range(2):
            table = pa.table(
                {"premise": [f"p{shard}"] * n, "hypothesis": ["h"] * n, "label": [shard] * n, "idx": list(range(n))}
            )
            pq.write_table(table, tmp_path / "mnli" / f"{split}-0000{shard}-of-00002.parquet")
    data = load_glue("mnli", tmp_path)
    assert data["train"] == {"premise": ["p0"] * 3 + ["p1"] * 3, "hypothesis": ["h"] * 6, "label": [0] * 3 + [1] * 3}
    assert len(data["validation_mismatched"]["label"]) == 2


def test_hub_source_converts_dataset_dict(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        split = {"sentence1": ["a"], "sentence2": ["b"], "label": [1], "idx": [0]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(split) for s in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_glue("RTE") == {
        s: {"sentence1": ["a"], "sentence2": ["b"], "label": [1]} for s in ("train", "validation")
    }
    assert calls == [("nyu-mll/glue", "rte")]


# ---------------------------------------------------------------- errors


def test_empty_dir_error_names_expected_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_glue("rte", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "RTE" / "train.tsv") in msg and "train-*.parquet" in msg and "--data-dir" in msg


def test_missing_dev_file_is_named(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine .\t1\n")
    with pytest.raises(DataError, match=r"expected .*dev\.tsv"):
        load_glue("sst2", tmp_path)


def test_missing_column_is_named(tmp_path):
    (tmp_path / "train.tsv").write_text("index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(DataError, match="lacks column 'sentence2'"):
        load_glue("rte", tmp_path)


def test_bad_label_names_file_and_line(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood .\t1\nbad .\tpositive\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: cannot read label 'positive'"):
        load_glue("sst2", tmp_path)


# ---------------------------------------------------------------- demo task and configs


def test_demo_task_is_deterministic_balanced_and_tie_free():
    data = load_task("demo")
    assert data == make_demo_task(seed=0) and data != make_demo_task(seed=1)
    assert set(data) == {"train", *get_task("demo").eval_splits}
    for split in data.values():
        assert abs(np.mean(split["label"]) - 0.5) <= 0.10
        for sentence, label in zip(split["sentence"], split["label"], strict=True):
            words = sentence.split()
            margin = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
            assert 8 <= len(words) <= 20 and margin != 0 and label == int(margin > 0)


def test_demo_rejects_data_dir(tmp_path):
    with pytest.raises(DataError, match="demo task is generated"):
        load_task("demo", tmp_path)


CONFIG_KEYS = {"task", "method", "mode", "strategy", "rank", "lr", "epochs", "batch_size", "max_length",
               "warmup_steps", "weight_decay", "dropout", "train_bias", "lr_schedule"}  # fmt: skip


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_glue_configs_parse_with_numeric_types(name):
    path = REPO / "configs" / "glue" / f"{name}.yaml"
    assert path.read_text().startswith("# RoCoFT paper, Table 10")
    from train.config import TrainConfig
    from train.config_files import load_file

    cfg, _ = load_file(path, TrainConfig)  # the task's file with its base resolved
    assert set(cfg) == CONFIG_KEYS and get_task(cfg["task"]).name == name
    assert all(isinstance(cfg[k], float) for k in ("lr", "weight_decay", "dropout"))  # 2e-4 would be a string
    assert cfg["rank"] == 3 and cfg["max_length"] == 128 and isinstance(cfg["train_bias"], bool)


def test_demo_config():
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert set(cfg) == CONFIG_KEYS | {"model"} and get_task(cfg["task"]).name == "demo"
    assert isinstance(cfg["lr"], float) and cfg["model"] == "tiny"
