"""Zero-shot evaluation through lm-evaluation-harness, offline, on a multiple-choice task the tests write
themselves: lm-eval's acc / acc_norm equal an independent log-likelihood scoring of every choice with the same
tiny model, missing task data is one ConfigError before any model loads, and a run records the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF, TINY_LM, TINY_VIT, compose_cfg
from omegaconf import OmegaConf

from permsparse.config import ConfigError, validate_config
from permsparse.models.tiny import CharTokenizer, tiny_llama, tiny_tokenizer
from permsparse.zeroshot import (
    PAPER_TASKS,
    ZeroShotSettings,
    check_tasks,
    describe,
    evaluate,
    export_task_data,
)

TASK = "permsparse_tiny_mc"
HUB_ID = "permsparse/tiny_mc"  # a made-up hub id: only <data_dir>/permsparse/tiny_mc/ holds its data
PROMPT = "Question: {q}\nAnswer:"
# questions with a known answer key; choices of different lengths, so acc and acc_norm can disagree
ROWS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "a large city"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five hundred"], "answer": 0},
    {"question": "The colour of a clear sky", "choices": ["green", "blue", "deep red"], "answer": 1},
    {"question": "The opposite of up", "choices": ["down", "sideways", "left"], "answer": 0},
    {"question": "The first letter of the alphabet", "choices": ["z", "a", "m"], "answer": 1},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk thread"], "answer": 0},
    {"question": "How many legs has a spider?", "choices": ["six", "eight", "twelve"], "answer": 1},
    {"question": "Water freezes at", "choices": ["zero degrees", "fifty degrees", "ten"], "answer": 0},
    {"question": "Who wrote Hamlet?", "choices": ["Dickens", "Shakespeare", "Austen"], "answer": 1},
    {"question": "The largest planet", "choices": ["Mars", "Venus", "Jupiter"], "answer": 2},
    {"question": "A baby cat is a", "choices": ["puppy", "kitten", "calf"], "answer": 1},
    {"question": "Ice is", "choices": ["cold", "hot", "boiling"], "answer": 0},
]
SHOTS = [
    {"question": "The sun rises in the", "choices": ["east", "west"], "answer": 0},
    {"question": "Snow is", "choices": ["black", "white"], "answer": 1},
]
TASK_YAML = f"""\
task: {TASK}
dataset_path: {HUB_ID}
output_type: multiple_choice
test_split: test
training_split: train
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def _write_task(root: Path, rows: list[dict] = ROWS) -> Path:
    """A task YAML and its test split, laid out as eval.lm_eval.data_dir expects."""
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML)
    data = root / HUB_ID
    data.mkdir(parents=True, exist_ok=True)
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SHOTS))  # the few-shot examples
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_task(tmp_path_factory.mktemp("lm_eval_data"))


@torch.no_grad()
def _expected(model: torch.nn.Module, rows: list[dict]) -> dict[str, float]:
    """acc and acc_norm scored by hand: the summed log-probability of " <choice>" after the prompt, the
    highest one (acc) or the highest per character of the choice (acc_norm) against the answer key."""
    tok = CharTokenizer()
    acc, acc_norm = [], []
    for row in rows:
        context = tok(PROMPT.format(q=row["question"]))["input_ids"]
        lls = []
        for choice in row["choices"]:
            continuation = tok(" " + choice)["input_ids"]
            ids = torch.tensor([context + continuation])
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation)))
        best = max(range(len(lls)), key=lls.__getitem__)
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(row["choices"][i]))
        acc.append(float(best == row["answer"]))
        acc_norm.append(float(best_norm == row["answer"]))

    def stderr(xs: list[float]) -> float:  # the sample standard deviation over sqrt(n), as lm-eval reports
        mu = sum(xs) / len(xs)
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    return {f"{TASK}/acc": sum(acc) / len(acc), f"{TASK}/acc_stderr": stderr(acc),
            f"{TASK}/acc_norm": sum(acc_norm) / len(acc_norm), f"{TASK}/acc_norm_stderr": stderr(acc_norm)}


def test_the_hf_form_of_the_char_tokenizer_encodes_the_same_ids():
    text = "Question: Who wrote Hamlet?\nAnswer: Shakespeare\t(é ü)  \r\n"
    char, hf = CharTokenizer(), CharTokenizer().to_hf()
    assert hf(text, add_special_tokens=False)["input_ids"] == char(text)["input_ids"] == hf.encode(text)
    assert hf.decode(char(text)["input_ids"]) == char.decode(char(text)["input_ids"])
    assert hf.vocab_size == 128 and hf.eos_token_id == 0


def test_lm_eval_accuracy_equals_an_independent_scoring_of_every_choice(data_dir):
    model = tiny_llama(seed=3)
    settings = ZeroShotSettings.from_config({"tasks": [TASK], "data_dir": str(data_dir), "batch_size": 3})
    got = evaluate(model, tiny_tokenizer(), settings)
    expected = _expected(model, ROWS)
    assert expected[f"{TASK}/acc"] != expected[f"{TASK}/acc_norm"]  # the data tells the two metrics apart
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # a second model scores differently on the same key: the numbers come from the model, not the data
    other = evaluate(tiny_llama(seed=4), tiny_tokenizer(), settings)
    assert other == pytest.approx(_expected(tiny_llama(seed=4), ROWS))
    assert describe(settings)["tasks"][TASK] == {"num_fewshot": 0, "subtasks": 1,
                                                 "data": [f"local: {data_dir / HUB_ID}"], "images": False}


def test_a_task_without_its_data_fails_before_the_model_loads(data_dir, tmp_path):
    # arc_easy is lm-eval's own task; its dataset (allenai/ai2_arc, ARC-Easy) is not under data_dir
    cfg = compose_cfg([*TINY_LM, f"eval.lm_eval.tasks=[{TASK},arc_easy]", f"eval.lm_eval.data_dir={data_dir}"],
                      tmp_path)
    with pytest.raises(ConfigError, match=r"task arc_easy needs the dataset allenai/ai2_arc \(config ARC-Easy\)") as err:
        validate_config(cfg)
    assert "\n" not in str(err.value) and f"{data_dir}/allenai/ai2_arc/ARC-Easy/" in str(err.value)
    # a group names its first missing subtask and how many more lack data
    with pytest.raises(ConfigError, match=r"task mmlu_\w+ of mmlu \(and 56 more of its 57 tasks\) needs the dataset "
                                          r"cais/mmlu"):
        check_tasks(ZeroShotSettings.from_config({"tasks": ["mmlu"], "data_dir": str(data_dir)}))
    with pytest.raises(ConfigError, match="not an lm-eval task, group or tag.*did you mean arc_easy"):
        check_tasks(ZeroShotSettings.from_config({"tasks": ["arc_eazy"], "data_dir": str(data_dir)}))
    # a folder without a split the task reads (here the one its few-shot examples come from)
    partial = _write_task(tmp_path / "partial")
    (partial / HUB_ID / "train.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"task permsparse_tiny_mc reads the split\(s\) train of permsparse/tiny_mc, "
                                          r"but .* holds only test; add train.jsonl there"):
        check_tasks(ZeroShotSettings.from_config({"tasks": [TASK], "data_dir": str(partial)}))
    with pytest.raises(ConfigError, match="eval.lm_eval.data_dir=.* is not a folder"):
        check_tasks(ZeroShotSettings.from_config({"tasks": [TASK], "data_dir": str(tmp_path / "absent")}))


@pytest.mark.parametrize(("node", "message"), [
    ({"tasks": "arc_easy"}, r"eval.lm_eval.tasks='arc_easy' is invalid"),
    ({"tasks": ["boolq", "boolq"]}, "names a task twice"),
    ({"tasks": ["boolq"], "num_fewshot": {"mmlu": 5}}, r"num_fewshot.mmlu is set but mmlu is not in"),
    ({"tasks": ["mmlu"], "num_fewshot": {"mmlu": -1}}, r"num_fewshot.mmlu=-1 is invalid"),
    ({"tasks": ["boolq"], "limit": 0}, r"eval.lm_eval.limit=0 is invalid"),
    ({"tasks": ["boolq"], "batch_size": 0}, r"eval.lm_eval.batch_size=0 is invalid"),
    ({"tasks": ["boolq"], "hub": "yes"}, r"eval.lm_eval.hub='yes' is invalid"),
])
def test_bad_zero_shot_settings_are_config_errors(node, message):
    with pytest.raises(ConfigError, match=message):
        ZeroShotSettings.from_config(node)


def test_zero_shot_tasks_need_a_language_model(tmp_path):
    cfg = compose_cfg([*TINY_VIT, "eval.lm_eval.tasks=[arc_easy]"], tmp_path)
    with pytest.raises(ConfigError, match="needs a language model, but model=tiny_vit is a image_classification"):
        validate_config(cfg)


def test_the_default_config_runs_no_zero_shot_task_and_paper_lists_the_papers_seven():
    assert ZeroShotSettings.from_config(OmegaConf.select(compose_cfg(TINY_LM, Path(".")), "eval.lm_eval")).tasks == ()
    paper = compose_cfg([*TINY_LM, "eval/lm_eval=paper"], Path(".")).eval.lm_eval
    settings = ZeroShotSettings.from_config(paper)
    assert {t: settings.fewshot(t) for t in settings.tasks} == PAPER_TASKS
    assert (CONF / "eval" / "lm_eval" / "paper.yaml").is_file()


def test_a_run_records_zero_shot_accuracy_of_every_phase_and_prunes_as_without_it(data_dir, tmp_path):
    from permsparse.run import train

    base = [*TINY_LM, "perm=ria", "pruner=wanda"]
    plain = train(compose_cfg(base, tmp_path / "plain"))
    results = train(compose_cfg([*base, f"eval.lm_eval.tasks=[{TASK}]", f"eval.lm_eval.data_dir={data_dir}",
                                 f"eval.lm_eval.num_fewshot={{{TASK}:2}}"], tmp_path / "zs"))
    written = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert written["metrics"] == results["metrics"]
    for phase in ("dense", "identity", "pruned"):
        metrics = written["metrics"][phase]
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert 0.0 <= metrics[f"{TASK}/{key}"] <= 1.0
        # the perplexities are those of the run without zero-shot evaluation
        assert {k: v for k, v in metrics.items() if not k.startswith(TASK)} == plain["metrics"][phase]
        assert f"zeroshot_{phase}" in written["timings"]
    assert written["efficacy"] == plain["efficacy"]
    assert written["versions"]["lm-eval"] == "0.4.13"
    protocol = written["protocol"]["lm_eval"]
    assert protocol["harness"] == "lm-eval 0.4.13"
    assert protocol["tasks"][TASK]["num_fewshot"] == 2


def test_export_writes_the_layout_that_data_dir_reads(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML)
    calls = []

    def fake_hub(path, name=None, *args, **kwargs):  # stands in for the hub: the only network call of the export
        calls.append((path, name))
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS), "train": datasets.Dataset.from_list(SHOTS)})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert export_task_data([TASK], tmp_path / "out", include=tmp_path / "tasks") == [tmp_path / "out" / HUB_ID]
    assert calls == [(HUB_ID, None)]
    for split, rows in (("test", ROWS), ("train", SHOTS)):
        lines = (tmp_path / "out" / HUB_ID / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows


def test_the_next_line_task_builds_offline_with_a_correct_answer_key_and_runs(tmp_path):
    import json
    import sys as _sys

    from conftest import ROOT

    from permsparse.data.text import load_corpus

    _sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import next_line_task
    finally:
        _sys.path.remove(str(ROOT / "scripts"))
    root = next_line_task.write_task(tmp_path / "nl", "pydoc", n=6, seed=1)
    rows = [json.loads(line) for line in (root / next_line_task.HUB_ID / "test.jsonl").read_text().splitlines()]
    assert rows == next_line_task.questions("pydoc", 8, 1)[:6]  # seeded: the same questions every time
    lines = [line.strip() for line in load_corpus("pydoc").splitlines()]
    follows = {(a, b) for a, b in zip(lines, lines[1:], strict=False)}
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert (r["context"], r["choices"][r["answer"]]) in follows  # the key is the line that follows
    assert len({r["answer"] for r in rows}) > 1  # the true line is not always in one place
    name = next_line_task.TASK
    settings = ZeroShotSettings.from_config({"tasks": [name], "data_dir": str(root), "batch_size": 4})
    got = evaluate(tiny_llama(seed=3), tiny_tokenizer(), settings)
    assert 0.0 <= got[f"{name}/acc"] <= 1.0 and got[f"{name}/acc"] * 6 == pytest.approx(round(got[f"{name}/acc"] * 6))
