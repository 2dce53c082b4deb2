"""fatellm_flwr.cli.generate: text from every algorithm's run."""

import pytest

from fatellm_flwr.cli import generate
from fatellm_flwr.cli.main import main


@pytest.mark.parametrize("algorithm", ["homo", "fedkseed", "offsite"])
def test_generate_gives_text(cli_runs, algorithm):
    outs = generate(cli_runs[algorithm], ["the team won the match", "shares rose"],
                    max_new_tokens=6)
    assert len(outs) == 2 and all(isinstance(o, str) and o.strip() for o in outs)


def test_sampling_is_seeded_and_differs_from_greedy(cli_runs):
    run = cli_runs["homo"]
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, seed=3)
    a = generate(run, ["the team won"], **kw)
    assert a == generate(run, ["the team won"], **kw)
    assert a != generate(run, ["the team won"], max_new_tokens=12)


def test_cli_generate_prints_completions(cli_runs, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the team won the match\n\nshares rose in trading\n")
    assert main(["generate", str(cli_runs["offsite"]), "--file", str(prompts),
                 "--max-new-tokens", "4", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and '"completion"' in lines[0]
