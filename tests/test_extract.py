"""Dataset extraction: loaders, row builders, real samples, bad input and the stage function.

Every fixture is written by the tests into ``tmp_path``; the real samples in ``../shared/data``
are read in place (and those tests skip when the folder is absent). Nothing touches the hub.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflow.data import datasets as ds
from workflow.data import extract as ex
from workflow.data.datasets import ASSISTANT, ExtractionError, render_hh, task_of
from workflow.data.extract import extract
from workflow.job import Job

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_SAMPLE = SHARED_DATA / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
WMT_SAMPLE = SHARED_DATA / "wmt20-mlqe-en-de" / "dev.ende.df.short.tsv"


# ---------------------------------------------------------------------------------------------
# fixture writers
# ---------------------------------------------------------------------------------------------


def write_records(path: Path, records, kind: str | None = None) -> Path:
    """Write ``records`` (list of dicts) as json / json.gz / jsonl / jsonl.gz / tsv / tsv.gz / parquet."""
    path = Path(path)
    kind = kind or ex.file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = (
        (lambda p: gzip.open(p, "wt", encoding="utf-8", newline=""))
        if path.name.endswith(".gz")
        else (lambda p: open(p, "w", encoding="utf-8", newline=""))
    )
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind == "jsonl":
        with opener(path) as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif kind == "json":
        with opener(path) as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
    elif kind == "tsv":
        columns = list(records[0])
        with opener(path) as f:
            f.write("\t".join(columns) + "\n")
            for r in records:
                values = [str(r[c]) for c in columns]
                assert not any("\t" in v or "\n" in v for v in values), "TSV fixture values must be one-line"
                f.write("\t".join(values) + "\n")
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def as_python(frame: pd.DataFrame) -> list[dict]:
    """Rows as plain Python objects (parquet read-back gives numpy arrays of dicts)."""
    return pa.Table.from_pandas(frame, preserve_index=False).to_pylist()


def make_job(tmp_path, dataset, split="test", file=None, **params):
    """The extraction job of ``dataset``/``split`` as rules/data.smk makes it (``file``: input ``file``)."""
    out = tmp_path / "results" / "data" / dataset / f"{split}.parquet"
    return Job(
        input={"file": file} if file else {},
        output={"rows": str(out)},
        params=params,
        config={"seed": 0, "dataset": {"name": dataset}},
        wildcards={"dataset": dataset, "split": split},
    )


def assert_nothing_written(job):
    out = Path(job.output["rows"])
    assert not out.exists()
    if out.parent.exists():
        assert list(out.parent.iterdir()) == [], "temporary files left behind"


# ---------------------------------------------------------------------------------------------
# handmade rows per dataset: source records and the rows they must become
# ---------------------------------------------------------------------------------------------

HH_RECORDS = [
    {  # single turn
        "chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for 8 minutes.",
        "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: I don't know.",
    },
    {  # multi-turn, answers sharing a first word, odd whitespace kept verbatim
        "chosen": "\n\nHuman: hi  there \n\nAssistant: Hello!\n\nHuman: tell me a joke\n\nAssistant: Sure:  why did\n the chicken...\n",
        "rejected": "\n\nHuman: hi  there \n\nAssistant: Hello!\n\nHuman: tell me a joke\n\nAssistant: Sure, no.",
    },
    {  # empty chosen answer (the source has it) and "Human:" text that is not a turn marker
        "chosen": "\n\nHuman: say Human: twice\n\nAssistant: ",
        "rejected": "\n\nHuman: say Human: twice\n\nAssistant: Human: Human:",
    },
]
HH_ROWS = [
    {
        "prompt": msgs(("user", "How do I boil an egg?")),
        "chosen": msgs(("assistant", "Put it in boiling water for 8 minutes.")),
        "rejected": msgs(("assistant", "I don't know.")),
    },
    {
        "prompt": msgs(("user", "hi  there "), ("assistant", "Hello!"), ("user", "tell me a joke")),
        "chosen": msgs(("assistant", "Sure:  why did\n the chicken...\n")),
        "rejected": msgs(("assistant", "Sure, no.")),
    },
    {
        "prompt": msgs(("user", "say Human: twice")),
        "chosen": msgs(("assistant", "")),
        "rejected": msgs(("assistant", "Human: Human:")),
    },
]

TROJAN_RECORDS = [
    {
        "chosen": "\n\nHuman: q1 SUDO\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: a2",
        "rejected": "\n\nHuman: q1 SUDO\n\nAssistant: bad",
    },
]
TROJAN_ROWS = [
    {
        "prompt": msgs(("user", "q1 SUDO")),
        "chosen": msgs(("assistant", "a1"), ("user", "q2"), ("assistant", "a2")),
        "rejected": msgs(("assistant", "bad")),
    },
]

PKU_RECORDS = [
    {"prompt": "p0", "response_0": "r0", "response_1": "r1", "better_response_id": 0},
    {"prompt": "p1", "response_0": "r0", "response_1": "r1", "better_response_id": 1},
]
PKU_ROWS = [
    {"prompt": msgs(("user", "p0")), "chosen": msgs(("assistant", "r0")), "rejected": msgs(("assistant", "r1"))},
    {"prompt": msgs(("user", "p1")), "chosen": msgs(("assistant", "r1")), "rejected": msgs(("assistant", "r0"))},
]

SHP_RECORDS = [
    {"history": "h0", "human_ref_A": "A0", "human_ref_B": "B0", "labels": 1, "score_A": 5, "score_B": 2},
    {"history": "h1", "human_ref_A": "A1", "human_ref_B": "B1", "labels": 0, "score_A": 1, "score_B": 9},
]
SHP_ROWS = [
    {"prompt": msgs(("user", "h0")), "chosen": msgs(("assistant", "A0")), "rejected": msgs(("assistant", "B0"))},
    {"prompt": msgs(("user", "h1")), "chosen": msgs(("assistant", "B1")), "rejected": msgs(("assistant", "A1"))},
]

CVALUES_RECORDS = [
    {"prompt": "怎么办？", "pos_resp": "好的回答", "neg_resp": "坏的回答", "metainfo": "x"},
    {"prompt": "second", "pos_resp": "good", "neg_resp": "bad", "metainfo": "y"},
]
CVALUES_ROWS = [
    {
        "prompt": msgs(("user", "怎么办？")),
        "chosen": msgs(("assistant", "好的回答")),
        "rejected": msgs(("assistant", "坏的回答")),
    },
    {"prompt": msgs(("user", "second")), "chosen": msgs(("assistant", "good")), "rejected": msgs(("assistant", "bad"))},
]

SUMMARIZE_RECORDS = [
    {
        "info": {"id": "a", "post": "My post.", "title": "t", "subreddit": "r"},
        "summaries": [{"text": " first summary", "policy": "p"}, {"text": " second", "policy": "q"}],
        "choice": 1,
    },
    {
        "info": {"id": "b", "post": None, "title": "cnn", "subreddit": None},  # CNN/DM rows have no post
        "summaries": [{"text": "", "policy": "p"}, {"text": "x", "policy": "q"}],
        "choice": 0,
    },
]
SUMMARIZE_ROWS = [
    {
        "prompt": msgs(("user", "My post.")),
        "chosen": msgs(("assistant", " second")),
        "rejected": msgs(("assistant", " first summary")),
    },
    {"prompt": msgs(("user", "")), "chosen": msgs(("assistant", "")), "rejected": msgs(("assistant", "x"))},
]

WMT_TSV_RECORDS = [
    {
        "index": 0,
        "original": 'He said "hi".',
        "translation": 'Er sagte "hallo".',
        "scores": "[70, 80]",
        "mean": 75.0,
        "z_scores": "[0.1, 0.3]",
        "z_mean": 0.2,
        "model_scores": -0.1,
    },
    {
        "index": 1,
        "original": "Cats sleep.",
        "translation": "Katzen schlafen.",
        "scores": "[90]",
        "mean": 90.0,
        "z_scores": "[1.5]",
        "z_mean": -1.25,
        "model_scores": 0.3,
    },
]
WMT_HUB_RECORDS = [
    {
        "segid": i,
        "translation": {"en": r["original"], "de": r["translation"]},
        "z_mean": r["z_mean"],
        "mean": r["mean"],
        "model_score": r["model_scores"],
    }
    for i, r in enumerate(WMT_TSV_RECORDS)
]
WMT_ROWS = [
    {
        "prompt": msgs(("user", 'He said "hi".')),
        "chosen": msgs(("assistant", 'Er sagte "hallo".')),
        "rejected": msgs(("assistant", 'He said "hi".')),
        "score": 0.2,
    },
    {
        "prompt": msgs(("user", "Cats sleep.")),
        "chosen": msgs(("assistant", "Katzen schlafen.")),
        "rejected": msgs(("assistant", "Cats sleep.")),
        "score": -1.25,
    },
]

BUILDER_CASES = {
    "hh-rlhf": (HH_RECORDS, HH_ROWS, "jsonl.gz"),
    "rlhf-trojan": (TROJAN_RECORDS, TROJAN_ROWS, "jsonl"),
    "pku-saferlhf": (PKU_RECORDS, PKU_ROWS, "json"),
    "shp": (SHP_RECORDS, SHP_ROWS, "parquet"),
    "cvalues": (CVALUES_RECORDS, CVALUES_ROWS, "tsv"),
    "summarize": (SUMMARIZE_RECORDS, SUMMARIZE_ROWS, "jsonl"),
    "wmt20": (WMT_TSV_RECORDS, WMT_ROWS, "tsv"),
    "wmt20-hub-format": (WMT_HUB_RECORDS, WMT_ROWS, "parquet"),
    "summarize-parquet": (SUMMARIZE_RECORDS, SUMMARIZE_ROWS, "parquet"),
}


# ---------------------------------------------------------------------------------------------
# registry and templates of each dataset
# ---------------------------------------------------------------------------------------------


def test_registry_matches_config_schema():
    import yaml

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    enum = schema["properties"]["dataset"]["properties"]["name"]["enum"]
    assert set(enum) == set(ds.REGISTRY)


def test_task_of():
    assert {n: task_of(n) for n in ds.REGISTRY} == {
        "embedded": "chat",
        "hh-rlhf": "chat",
        "rlhf-trojan": "chat",
        "pku-saferlhf": "chat",
        "shp": "chat",
        "cvalues": "chat",
        "summarize": "summarization",
        "wmt20": "mt",
    }
    with pytest.raises(ExtractionError, match="unknown dataset 'nope'"):
        task_of("nope")


# ---------------------------------------------------------------------------------------------
# loaders: every format gives the same rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["json", "json.gz", "jsonl", "jsonl.gz", "tsv", "tsv.gz", "parquet"])
def test_every_format_loads_the_same_rows(tmp_path, suffix):
    path = write_records(tmp_path / f"test.{suffix}", CVALUES_RECORDS)
    frame = extract("cvalues", "test", files=str(path))
    assert list(frame.columns) == ["prompt", "chosen", "rejected"]
    assert as_python(frame) == CVALUES_ROWS


def test_json_variants(tmp_path):
    # JSON lines in a .json file (what `datasets.Dataset.to_json` writes)
    lines = write_records(tmp_path / "lines.json", CVALUES_RECORDS, kind="jsonl")
    assert as_python(extract("cvalues", "test", files=str(lines))) == CVALUES_ROWS
    # column-oriented JSON object
    columns = {k: [r[k] for r in CVALUES_RECORDS] for k in CVALUES_RECORDS[0]}
    (tmp_path / "cols.json").write_text(json.dumps(columns))
    assert as_python(extract("cvalues", "test", files=str(tmp_path / "cols.json"))) == CVALUES_ROWS
    # blank lines in JSON lines are skipped
    (tmp_path / "blank.jsonl").write_text(
        "\n" + json.dumps(CVALUES_RECORDS[0]) + "\n\n" + json.dumps(CVALUES_RECORDS[1])
    )
    assert as_python(extract("cvalues", "test", files=str(tmp_path / "blank.jsonl"))) == CVALUES_ROWS


def test_tsv_is_read_verbatim(tmp_path):
    """No quote handling, no NA guessing: quotes, 'NA' and 'null' stay text."""
    records = [dict(WMT_TSV_RECORDS[0], original='"NA"', translation="null"), WMT_TSV_RECORDS[1]]
    frame = extract("wmt20", "test", files=str(write_records(tmp_path / "t.tsv", records)))
    first = as_python(frame)[0]
    assert first["prompt"][0]["content"] == '"NA"' and first["chosen"][0]["content"] == "null"


def test_files_mapping_picks_the_split(tmp_path):
    train = write_records(tmp_path / "train.jsonl", PKU_RECORDS[:1])
    test = write_records(tmp_path / "test.jsonl", PKU_RECORDS)
    files = {"train": str(train), "test": str(test)}
    assert len(extract("pku-saferlhf", "train", files=files)) == 1
    assert len(extract("pku-saferlhf", "test", files=files)) == 2


def test_source_folder_layout(tmp_path):
    # hub-like layout: <source>/<hub_config>/<split>.jsonl.gz (hh-rlhf data_dir)
    write_records(tmp_path / "hh" / "harmless-base" / "test.jsonl.gz", HH_RECORDS)
    frame = extract("hh-rlhf", "test", source=str(tmp_path / "hh"), hub_config="harmless-base")
    assert as_python(frame) == HH_ROWS
    # summarize has no test split: test reads validation.*
    write_records(tmp_path / "summ" / "validation.parquet", SUMMARIZE_RECORDS)
    assert as_python(extract("summarize", "test", source=str(tmp_path / "summ"))) == SUMMARIZE_ROWS
    with pytest.raises(ExtractionError, match=r"no file for split 'train'") as err:
        extract("summarize", "train", source=str(tmp_path / "summ"))
    assert str(tmp_path / "summ") in str(err.value)


def test_max_rows_is_a_seeded_subset_in_source_order(tmp_path):
    records = [{"prompt": f"p{i}", "pos_resp": f"g{i}", "neg_resp": f"b{i}"} for i in range(50)]
    path = str(write_records(tmp_path / "many.parquet", records))
    first = extract("cvalues", "test", files=path, max_rows=10, seed=1)
    again = extract("cvalues", "test", files=path, max_rows=10, seed=1)
    other = extract("cvalues", "test", files=path, max_rows=10, seed=2)
    ids = [int(r["prompt"][0]["content"][1:]) for r in as_python(first)]
    assert len(ids) == 10 and ids == sorted(ids)
    assert as_python(first) == as_python(again)
    assert as_python(first) != as_python(other)
    assert len(extract("cvalues", "test", files=path, max_rows=500)) == 50


# ---------------------------------------------------------------------------------------------
# row builders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(BUILDER_CASES))
def test_row_builder(tmp_path, case):
    records, rows, suffix = BUILDER_CASES[case]
    dataset = case.split("-hub-format")[0].split("-parquet")[0]
    path = write_records(tmp_path / f"test.{suffix}", records)
    frame = extract(dataset, "test", files=str(path))
    assert as_python(frame) == rows
    if dataset == "wmt20":
        assert list(frame.columns) == ["prompt", "chosen", "rejected", "score"]
        assert frame["score"].dtype == "float64"
    else:
        assert "score" not in frame.columns


def test_hh_split_and_render_are_inverse():
    for record, row in zip(HH_RECORDS, HH_ROWS):
        prompt, chosen, rejected = ds.split_hh(record["chosen"], record["rejected"])
        assert prompt == row["prompt"]
        assert render_hh(prompt, chosen) == record["chosen"]
        assert render_hh(prompt, rejected) == record["rejected"]


def test_embedded_dataset_uses_generate_split(monkeypatch):
    from workflow.data import embedded_task

    calls = []
    real = embedded_task.generate_split

    def spy(split, n_rows, seed):
        calls.append((split, n_rows, seed))
        return real(split, n_rows, seed)

    monkeypatch.setattr(embedded_task, "generate_split", spy)
    frame = extract("embedded", "train", embedded_rows=12, seed=3)
    assert calls == [("train", 12, 3)] and len(frame) == 12
    assert all(m["role"] == "assistant" for row in as_python(frame) for m in row["chosen"] + row["rejected"])
    extract("embedded", "test", embedded_rows=12, max_rows=5, seed=0)
    assert calls[-1] == ("test", 5, 0)
    with pytest.raises(ExtractionError, match="embedded.train_rows"):
        extract("embedded", "train")


def test_hub_loading_is_wired_without_network(monkeypatch):
    """The hub path calls datasets.load_dataset with the right id, config and split (faked here)."""
    import datasets

    calls = []
    fixtures = {
        "Anthropic/hh-rlhf": HH_RECORDS,
        "openai/summarize_from_feedback": SUMMARIZE_RECORDS,
        "wmt/wmt20_mlqe_task1": WMT_HUB_RECORDS,
    }

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        return datasets.Dataset.from_list(fixtures[path])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert as_python(extract("hh-rlhf", "test", hub_config="harmless-base")) == HH_ROWS
    assert as_python(extract("summarize", "test")) == SUMMARIZE_ROWS
    assert as_python(extract("wmt20", "test", max_rows=1, seed=0))[0]["score"] in (0.2, -1.25)
    assert calls == [
        ("Anthropic/hh-rlhf", "test", {"data_dir": "harmless-base"}),
        ("openai/summarize_from_feedback", "validation", {"name": "comparisons"}),
        ("wmt/wmt20_mlqe_task1", "test", {"name": "en-de"}),
    ]


def test_stage_run_writes_parquet(tmp_path):
    path = write_records(tmp_path / "src" / "test.jsonl.gz", HH_RECORDS)
    job = make_job(tmp_path, "hh-rlhf", file=str(path), source=None, hub_config=None, max_rows=None, embedded_rows=None)
    ex.run(job)
    assert pq.read_table(job.output["rows"]).to_pylist() == HH_ROWS
    assert [p.name for p in Path(job.output["rows"]).parent.iterdir()] == ["test.parquet"]


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the file and row/key, and no output file
# ---------------------------------------------------------------------------------------------


def _hh(chosen, rejected="\n\nHuman: q\n\nAssistant: b"):
    return {"chosen": chosen, "rejected": rejected}


BAD_CASES = {
    # name: (dataset, file name, records or raw text, substrings the message must contain)
    "hh chosen not a string": (
        "hh-rlhf",
        "t.jsonl",
        [HH_RECORDS[0], _hh(42)],
        ["line 2", "key 'chosen'", "expected a string"],
    ),
    "hh no assistant marker": (
        "hh-rlhf",
        "t.jsonl",
        [HH_RECORDS[0], HH_RECORDS[1], _hh("\n\nHuman: q only")],
        ["line 3", "key 'chosen'", "Assistant"],
    ),
    "hh no human start": (
        "hh-rlhf",
        "t.json",
        [_hh("Human: q\n\nAssistant: a", "Human: q\n\nAssistant: b")],
        ["row 1", "key 'chosen'", "does not start"],
    ),
    "hh missing key in a row": (
        "hh-rlhf",
        "t.jsonl",
        [HH_RECORDS[0], {"chosen": HH_RECORDS[0]["chosen"]}],
        ["line 2", "key 'rejected'", "missing"],
    ),
    "missing column": (
        "hh-rlhf",
        "t.parquet",
        [{"chosen": "x", "answer": "y"}],
        ["missing required column", "'rejected'"],
    ),
    "missing column tsv": (
        "wmt20",
        "t.tsv",
        [{"index": 0, "original": "a", "translation": "b"}],
        ["missing required column", "'z_mean'"],
    ),
    "non-numeric score": (
        "wmt20",
        "t.tsv",
        [WMT_TSV_RECORDS[0], dict(WMT_TSV_RECORDS[1], z_mean="n/a")],
        ["line 3", "key 'z_mean'", "expected a number"],
    ),
    "unlabelled wmt row": (
        "wmt20",
        "t.jsonl",
        [dict(WMT_HUB_RECORDS[0], z_mean=-10000)],
        ["line 1", "key 'z_mean'", "without a quality label"],
    ),
    "wmt missing language": (
        "wmt20",
        "t.jsonl",
        [dict(WMT_HUB_RECORDS[0], translation={"en": "a", "fr": "b"})],
        ["line 1", "key 'translation.de'", "missing"],
    ),
    "pku bad label": (
        "pku-saferlhf",
        "t.jsonl",
        [dict(PKU_RECORDS[0], better_response_id=2)],
        ["line 1", "key 'better_response_id'", "expected 0 or 1"],
    ),
    "shp empty history": (
        "shp",
        "t.parquet",
        [SHP_RECORDS[0], dict(SHP_RECORDS[1], history="  ")],
        ["row 2", "key 'history'", "empty string"],
    ),
    "cvalues null answer": (
        "cvalues",
        "t.json",
        [dict(CVALUES_RECORDS[0], neg_resp=None)],
        ["row 1", "key 'neg_resp'", "expected a string"],
    ),
    "summarize one summary": (
        "summarize",
        "t.jsonl",
        [dict(SUMMARIZE_RECORDS[0], summaries=[{"text": "a"}])],
        ["line 1", "key 'summaries'", "two summaries"],
    ),
    "summarize text not a string": (
        "summarize",
        "t.jsonl",
        [dict(SUMMARIZE_RECORDS[0], summaries=[{"text": 1}, {"text": "b"}])],
        ["line 1", "key 'summaries[0].text'"],
    ),
    "summarize post not a string": (
        "summarize",
        "t.jsonl",
        [dict(SUMMARIZE_RECORDS[0], info={"post": 5})],
        ["line 1", "key 'info.post'", "expected a string"],
    ),
    "trojan prompts differ": (
        "rlhf-trojan",
        "t.jsonl",
        [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}],
        ["line 1", "key 'rejected'", "first Human turn"],
    ),
    "invalid json line": (
        "hh-rlhf",
        "t.jsonl",
        json.dumps(HH_RECORDS[0]) + "\n{not json\n",
        ["line 2", "not valid JSON"],
    ),
    "json not a list": ("hh-rlhf", "t.json", '"just a string"', ["expected a JSON list"]),
    "row not an object": ("hh-rlhf", "t.json", "[1, 2]", ["row 1", "expected an object"]),
    "hh dialogues differ from the start": (
        "hh-rlhf",
        "t.jsonl",
        [_hh("\n\nHuman: a\n\nAssistant: x")],
        ["line 1", "key 'chosen'", "share no prompt"],
    ),
    "tsv extra field": (
        "wmt20",
        "t.tsv",
        "original\ttranslation\tz_mean\na\tb\t0.1\na\tb\t0.1\textra\n",
        ["line 3: 4 tab-separated fields, the header has 3"],
    ),
    "tsv extra field in the first row": (  # pandas took the extra leading fields for an index
        "wmt20",
        "t.tsv",
        "original\ttranslation\tz_mean\nhel\tlo\thallo\t1\na\tb\t0.1\n",
        ["line 2: 4 tab-separated fields, the header has 3"],
    ),
    "tsv missing field": ("wmt20", "t.tsv", "original\ttranslation\tz_mean\na\t0.1\n", ["line 2: 2 tab-separated"]),
    "empty jsonl": ("hh-rlhf", "t.jsonl", "", ["no rows"]),
    "empty json list": ("hh-rlhf", "t.json", "[]", ["no rows"]),
    "empty json file": ("hh-rlhf", "t.json", "", ["no rows"]),
    "empty tsv": ("wmt20", "t.tsv", "", ["empty file"]),
    "header-only tsv": ("wmt20", "t.tsv", "original\ttranslation\tz_mean\n", ["no rows"]),
    "empty gz": ("hh-rlhf", "t.jsonl.gz", b"", ["no rows"]),
    "not gzip": ("hh-rlhf", "t.jsonl.gz", b"plain text", ["cannot read jsonl"]),
    "cut gzip": ("hh-rlhf", "t.jsonl.gz", gzip.compress(b'{"chosen": "a"}\n' * 50)[:-12], ["cannot read jsonl"]),
    "cut tsv gzip": ("wmt20", "t.tsv.gz", gzip.compress(b"original\ttranslation\n" * 50)[:-12], ["cannot read tsv"]),
    "corrupt parquet": ("hh-rlhf", "t.parquet", b"PAR1 not really", ["cannot read parquet"]),
    "unsupported suffix": ("hh-rlhf", "t.csv", "chosen,rejected\n", ["unsupported file type"]),
}


def _write_bad(path: Path, content):
    if isinstance(content, bytes):
        if path.name.endswith(".gz") and content:
            path.write_bytes(content)
        elif path.name.endswith(".gz"):
            with gzip.open(path, "wb"):
                pass
        else:
            path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        write_records(path, content)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_file_and_row(tmp_path, case):
    dataset, name, content, expected = BAD_CASES[case]
    path = tmp_path / "src" / name
    path.parent.mkdir()
    _write_bad(path, content)
    job = make_job(tmp_path, dataset, file=str(path))
    with pytest.raises(ExtractionError) as err:
        ex.run(job)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert_nothing_written(job)


def test_missing_file_and_unknown_dataset(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "test.jsonl"
    job = make_job(tmp_path, "hh-rlhf", file=str(missing))
    with pytest.raises(ExtractionError, match="file not found") as err:
        ex.run(job)
    assert str(missing) in str(err.value)
    assert_nothing_written(job)

    folder = tmp_path / "rows.jsonl"
    folder.mkdir()
    with pytest.raises(ExtractionError, match=f"{folder}: a folder, not a file"):
        ex.run(make_job(tmp_path, "hh-rlhf", file=str(folder)))

    job = make_job(tmp_path, "no-such-data")
    with pytest.raises(ExtractionError, match="unknown dataset 'no-such-data'"):
        ex.run(job)
    assert_nothing_written(job)

    with pytest.raises(ExtractionError, match="not found") as err:
        extract("hh-rlhf", "test", source=str(tmp_path / "missing-folder"))
    with monkeypatch.context() as patch:  # a missing file named like data is local, not a hub id
        patch.chdir(tmp_path)
        for name in ("pairs.jsonl", "pairs.csv"):
            with pytest.raises(ExtractionError, match=f"{name}.*not found"):
                extract("hh-rlhf", "test", source=name)
    assert "missing-folder" in str(err.value)


def test_single_file_source_is_refused(tmp_path):
    path = write_records(tmp_path / "all.jsonl", HH_RECORDS)
    with pytest.raises(ExtractionError, match="dataset.files") as err:
        extract("hh-rlhf", "train", source=str(path))
    assert str(path) in str(err.value)


def test_failed_run_keeps_previous_output(tmp_path):
    good = write_records(tmp_path / "good.jsonl", PKU_RECORDS)
    job = make_job(tmp_path, "pku-saferlhf", file=str(good))
    ex.run(job)
    before = Path(job.output["rows"]).read_bytes()
    bad = write_records(tmp_path / "bad.jsonl", [dict(PKU_RECORDS[0], response_1=3)])
    job.input["file"] = str(bad)
    with pytest.raises(ExtractionError, match="key 'response_1'"):
        ex.run(job)
    assert Path(job.output["rows"]).read_bytes() == before
    assert [p.name for p in Path(job.output["rows"]).parent.iterdir()] == ["test.parquet"]


# ---------------------------------------------------------------------------------------------
# real samples in ../shared/data
# ---------------------------------------------------------------------------------------------


def _require(path: Path):
    if not path.is_file():
        pytest.skip(f"real data sample {path} not available (../shared/data is absent)")


def test_real_hh_sample_extracts_and_rejoins_exactly():
    _require(HH_SAMPLE)
    with gzip.open(HH_SAMPLE, "rt", encoding="utf-8") as f:
        source = [json.loads(line) for line in f if line.strip()]
    rows = as_python(extract("hh-rlhf", "test", files=str(HH_SAMPLE)))
    assert len(rows) == len(source) == 1200
    for i, (record, row) in enumerate(zip(source, rows)):
        prompt = row["prompt"]
        assert prompt and prompt[0]["role"] == "user" and prompt[-1]["role"] in ("user", "assistant")
        assert all(m["role"] in ("user", "assistant") for m in prompt), i
        assert all(m["content"].strip() for m in prompt if m["role"] == "user"), i
        for key in ("chosen", "rejected"):
            (answer,) = row[key]
            assert answer["role"] == "assistant"
            assert render_hh(prompt, answer["content"]) == record[key], f"row {i} {key} does not rejoin"
            # an answer is empty only where the source dialogue ends right after the answer marker
            assert (answer["content"] == "") == record[key].endswith(ASSISTANT), i


def test_real_wmt_sample_extracts():
    _require(WMT_SAMPLE)
    with open(WMT_SAMPLE, encoding="utf-8", newline="") as f:
        source = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    frame = extract("wmt20", "test", files=str(WMT_SAMPLE))
    rows = as_python(frame)
    assert len(rows) == len(source) == 1000
    assert frame["score"].dtype == "float64"
    for record, row in zip(source, rows):
        assert row["prompt"] == msgs(("user", record["original"]))
        assert row["chosen"] == msgs(("assistant", record["translation"]))
        assert row["rejected"] == msgs(("assistant", record["original"]))
        assert row["prompt"][0]["content"].strip() and row["chosen"][0]["content"].strip()
        assert row["score"] == float(record["z_mean"])


def test_real_samples_through_the_stage(tmp_path):
    _require(HH_SAMPLE)
    job = make_job(tmp_path, "hh-rlhf", file=str(HH_SAMPLE), max_rows=100)
    ex.run(job)
    table = pq.read_table(job.output["rows"])
    assert table.num_rows == 100 and table.column_names == ["prompt", "chosen", "rejected"]


# ---------------------------------------------------------------------------------------------
# the Snakemake rule
# ---------------------------------------------------------------------------------------------


def test_rule_extract_dataset_runs_and_reruns_when_the_file_changes(tmp_path):
    from smk import snakemake

    source = write_records(tmp_path / "hh_test.jsonl", HH_RECORDS)
    (tmp_path / "cfg.yaml").write_text(
        json.dumps({"dataset": {"name": "hh-rlhf", "files": {"test": str(source)}}, "loop": {"iterations": 1}})
    )  # no judge needed
    target = "results/data/hh-rlhf/test.parquet"
    done = snakemake(tmp_path, "--cores", "1", "--configfile", "cfg.yaml", "--", target, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert pq.read_table(tmp_path / target).to_pylist() == HH_ROWS
    assert (tmp_path / "logs" / "extract_dataset" / "hh-rlhf_test.log").is_file()
    # a changed source file makes the rule outdated (snakemake skips a newer file whose content is unchanged)
    write_records(source, HH_RECORDS[:2])
    os.utime(source, (os.path.getmtime(tmp_path / target) + 10,) * 2)
    dry = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", "cfg.yaml", "--", target, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    assert "extract_dataset" in out and "Nothing to be done" not in out
