"""`diffpolicy compare`: McNemar's exact test against scipy's binomial test, seed pairing, bad input."""

import json

import pytest
from scipy.stats import binomtest

from diffpolicy.cli import main as cli_main
from diffpolicy.evaluation.compare import compare, load_outcomes, mcnemar_exact


@pytest.mark.parametrize("gained,lost", [(0, 0), (1, 0), (0, 5), (11, 1), (10, 5), (7, 7), (3, 9), (40, 25)])
def test_mcnemar_exact_is_the_two_sided_binomial_test_of_the_discordant_pairs(gained, lost):
    expected = 1.0 if gained + lost == 0 else binomtest(gained, gained + lost, 0.5).pvalue
    assert mcnemar_exact(gained, lost) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(gained, lost) == mcnemar_exact(lost, gained)


@pytest.mark.parametrize("gained,lost", [(-1, 2), (1.5, 2), (True, 2), (2, "3")])
def test_mcnemar_exact_refuses_counts_that_are_not_counts(gained, lost):
    with pytest.raises(ValueError, match=r"must be an integer >= 0"):
        mcnemar_exact(gained, lost)


def write_eval(directory, outcomes: dict[int, bool]):
    directory.mkdir(parents=True)
    episodes = [{"index": i, "seed": seed, "success": ok, "episode_return": float(ok), "length": 10}
                for i, (seed, ok) in enumerate(outcomes.items())]
    (directory / "episodes.json").write_text(json.dumps(episodes))
    return directory


def test_outcomes_of_several_evaluations_are_paired_by_seed(tmp_path):
    # A: seeds 0-5 in two calls; B: seeds 2-7. Shared 2-5: A solves 2, 3, 4; B solves 3, 4, 5.
    a1 = write_eval(tmp_path / "a1", {0: True, 1: False, 2: True})
    a2 = write_eval(tmp_path / "a2", {3: True, 4: True, 5: False})
    b = write_eval(tmp_path / "b", {2: False, 3: True, 4: True, 5: True, 6: True, 7: False})
    result = compare(load_outcomes([a1, a2 / "episodes.json"]), load_outcomes([b]))
    assert (result.a.successes, result.a.n, result.b.successes, result.b.n) == (4, 6, 4, 6)
    assert (result.shared, result.a_shared, result.b_shared, result.gained, result.lost) == (4, 3, 3, 1, 1)
    assert result.p == 1.0
    assert "B gained 1, lost 1" in str(result)


def test_the_command_prints_the_comparison_as_json(tmp_path, capsys):
    a = write_eval(tmp_path / "a", {s: s % 10 != 0 for s in range(100)})   # fails seeds 0, 10, ..., 90
    b = write_eval(tmp_path / "b", {s: s not in (5, 10) for s in range(100)})
    assert cli_main(["compare", "--a", str(a), "--b", str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["a"]["successes"], out["b"]["successes"], out["gained"], out["lost"]) == (90, 98, 9, 1)
    assert out["mcnemar_p"] == pytest.approx(binomtest(1, 10, 0.5).pvalue)


def test_evaluations_without_a_common_seed_say_there_is_no_paired_test(tmp_path):
    result = compare(load_outcomes([write_eval(tmp_path / "a", {0: True})]),
                     load_outcomes([write_eval(tmp_path / "b", {1: False})]))
    assert result.shared == 0 and "no seed in common" in str(result)


def test_bad_evaluations_are_named(tmp_path, capsys):
    a = write_eval(tmp_path / "a", {0: True, 1: True})
    again = write_eval(tmp_path / "again", {1: False})
    with pytest.raises(ValueError, match=r"seed 1 appears twice: in .*a/episodes.json and in .*again/episodes.json"):
        load_outcomes([a, again])
    with pytest.raises(FileNotFoundError, match=r"nowhere: expected an evaluation directory holding episodes.json"):
        load_outcomes([tmp_path / "nowhere"])
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"broken.json: not JSON"):
        load_outcomes([tmp_path / "broken.json"])
    (tmp_path / "dict.json").write_text(json.dumps({"seed": 0}))
    with pytest.raises(TypeError, match=r"dict.json: expected a list of episodes, got dict"):
        load_outcomes([tmp_path / "dict.json"])
    (tmp_path / "no_success.json").write_text(json.dumps([{"seed": 0, "success": True}, {"seed": 1}]))
    with pytest.raises(ValueError, match=r"no_success.json: episode 1: expected an object with an integer 'seed' "
                                         r"and a boolean 'success'"):
        load_outcomes([tmp_path / "no_success.json"])
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match=r"no episodes in"):
        load_outcomes([tmp_path / "empty.json"])
    assert cli_main(["compare", "--a", str(a), "--b", str(tmp_path / "nowhere")]) == 2
    assert "diffpolicy compare: error: " in capsys.readouterr().err
