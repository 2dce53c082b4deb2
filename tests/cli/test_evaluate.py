"""fatellm_flwr.cli.evaluate: the server's metrics code, and lm-eval on a local task."""

import json
import textwrap

import pytest

from fatellm_flwr.cli import evaluate, lm_eval
from fatellm_flwr.cli.main import main


@pytest.mark.parametrize("algorithm", ["homo", "fedkseed", "offsite"])
def test_evaluate_equals_the_servers_last_round(cli_runs, algorithm):
    run = cli_runs[algorithm]
    last = json.loads((run / "metrics.json").read_text())[-1]
    got = evaluate(run)
    assert got["examples"] == 15
    assert got["accuracy"] == pytest.approx(last["server_accuracy"], abs=1e-9)
    assert got["loss"] == pytest.approx(last["server_loss"], rel=1e-5)


def test_evaluate_another_dataset_all_rows(cli_runs, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"body": f"the team won the match {i}",
                                           "topic": "sport" if i % 2 else "tech"})
                               for i in range(10)))
    got = evaluate(cli_runs["homo"], dataset=str(other), split="all",
                   overrides={"text-column": "body", "label-column": "topic"})
    assert got["examples"] == 10 and 0.0 <= got["accuracy"] <= 1.0


def test_cli_evaluate_errors_on_a_non_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_lm_eval_on_a_local_task(cli_runs, tiny_classification_file, tmp_path):
    pytest.importorskip("lm_eval")  # the `test` extra installs it
    data = tmp_path / "task.jsonl"
    data.write_text("".join(tiny_classification_file.read_text().splitlines(True)[:9]))
    (tmp_path / "tiny_topics.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_topics
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{text}}}}\\nTopic:"
        doc_to_choice: ["sport", "business", "tech"]
        doc_to_target: "{{{{['sport', 'business', 'tech'].index(label)}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    res = lm_eval(cli_runs["homo"], ["tiny_topics"], include_path=tmp_path)
    assert res["tiny_topics"]["sample_len"] == 9
    assert 0.0 <= res["tiny_topics"]["acc,none"] <= 1.0
