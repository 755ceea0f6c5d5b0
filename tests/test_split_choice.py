"""Defaults by device and the measured split: candidates, the trial in the real pipeline, the kept choice."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_weights, final_state, reference_state, run_pipeline, small_config

from fdg_dist import models
from fdg_dist.config import Config
from fdg_dist.run import devices, split_trial
from fdg_dist.split import choice
from fdg_dist.split.pace import BlockTime
from fdg_dist.split.partition import split_points


def test_auto_settings_become_the_fastest_for_the_device_and_explicit_ones_stay() -> None:
    cfg = Config()
    assert (cfg.trainer.channels_last, cfg.pipeline.cost) == ("auto", "auto")
    lines = devices.resolve(cfg, torch.device("cpu"))
    assert (cfg.trainer.channels_last, cfg.pipeline.cost) == (True, "counted")
    assert [line.split(" (")[0] for line in lines] == ["trainer.channels_last=auto -> true on cpu",
                                                       "pipeline.cost=auto -> counted on cpu"]
    cfg = Config()
    assert devices.resolve(cfg, torch.device("cpu"), convolutions=False)[0].startswith("pipeline.cost=auto")  # no NHWC line
    assert cfg.trainer.channels_last is True  # still resolved: the run needs a value
    cfg = Config()
    cfg.trainer.channels_last, cfg.pipeline.cost = False, "flops"
    assert devices.resolve(cfg, torch.device("cuda", 0)) == []
    assert (cfg.trainer.channels_last, cfg.pipeline.cost) == (False, "flops")
    assert devices.fastest("trainer.channels_last", "cuda") is True
    with pytest.raises(ValueError, match="resolve 'auto'"):
        models.memory_format("auto")


def test_candidates_are_the_balanced_split_and_its_neighbours_fastest_predicted_first() -> None:
    times = [BlockTime(0.1, 0.2, 0.0)] * 4 + [BlockTime(0.05, 0.1, 0.0)] * 8  # a costly first half
    ranked = choice.rank_candidates(times, 2, "fdg", recompute=False)
    balanced = split_points([t.total for t in times], 2, "auto")
    assert ranked[0][0] == balanced
    assert sorted(b[1] for b, _ in ranked) == [balanced[1] + d for d in range(-2, 3)]
    periods = [p for _, p in ranked]
    assert periods == sorted(periods) and ranked[0][1] == pytest.approx(max(0.3 * 4 - 0.0, 0.15 * 8) / 1.0, rel=0.2)
    three = choice.rank_candidates(times, 3, "fdg", recompute=False)
    assert all(0 < b[1] < b[2] < 12 for b, _ in three) and len(three) <= 25


def test_candidates_start_modules_only_where_a_module_has_weights_to_train() -> None:
    """With ``starts`` (``partition.weighted_starts``) no candidate puts a boundary elsewhere, even when a
    neighbour of the balanced split would be predicted faster."""
    times = [BlockTime(0.1, 0.2, 0.0)] * 12
    starts = [2, 4, 6, 8, 10]
    ranked = choice.rank_candidates(times, 2, "fdg", recompute=False, starts=starts)
    assert ranked and all(b[1] in starts for b, _ in ranked)
    assert sorted(b[1] for b, _ in ranked) == [4, 6, 8]  # the balanced split 6 and its allowed neighbours


def test_trial_batches_of_a_language_model_are_tokens_with_a_label_per_token() -> None:
    """The trial feeds module 0 what the data would: int64 tokens (a float input fails the embedding)."""
    cfg = Config()
    cfg.data.name, cfg.data.context, cfg.data.num_classes, cfg.trainer.batch_size = "text", 16, 40, 8
    shape = split_trial._batch_shape(cfg, SimpleNamespace(R=2))
    assert shape == [4, 16]
    x, y = next(split_trial._synthetic(cfg, shape, torch.device("cpu"), 1))
    assert x.dtype == torch.int64 and x.shape == (4, 16) and int(x.min()) >= 0 and int(x.max()) < 40
    assert y.shape == (4, 16)


def test_a_trial_compares_the_best_plausible_candidates_that_fit_its_budget() -> None:
    ranked = [([0, 5, 11], 1.00), ([0, 4, 11], 1.05), ([0, 6, 11], 1.09), ([0, 3, 11], 1.30)]
    assert choice.worth_trying(ranked, runs=10) == ranked[:3]
    assert choice.worth_trying(ranked, runs=2) == ranked[:2]  # the budget affords two runs
    assert choice.worth_trying(ranked, runs=1) == []
    assert choice.worth_trying([ranked[0], ranked[3]], runs=10) == []  # the runner-up is 30 % slower


def test_a_candidates_time_is_the_median_of_its_batches_and_one_slow_batch_moves_neither_it_nor_its_error() -> None:
    quiet = [0.300, 0.302, 0.298, 0.301, 0.299, 0.300, 0.303, 0.297]
    median, se = choice.median_se(quiet)
    assert median == pytest.approx(0.300) and se == pytest.approx(1.2533 * 1.4826 * 0.0015 / 8 ** 0.5)
    assert choice.median_se([*quiet[:-1], 0.900]) == pytest.approx((median, se), rel=0.02)  # interference


def test_the_trial_winner_is_the_fastest_it_can_tell_apart_and_otherwise_the_best_predicted() -> None:
    """Candidates come in predicted order; samples are seconds per batch."""
    steady = [0.300 + d for d in (-0.002, 0.0, 0.002)] * 4  # median 0.300, standard error ~0.9 ms
    slower = [x * 1.05 for x in steady]
    faster = [x * 0.95 for x in steady]
    assert choice.decide([steady, faster, slower]) == 1  # 5 % faster, well beyond its error: the trial decides
    assert choice.contenders([steady, faster, slower]) == [1]
    near = [x * 0.975 for x in steady]  # 2.5 % faster: within TIE, equal to what a fresh pipeline varies by
    assert choice.contenders([slower, steady, near]) == [1, 2] and choice.decide([slower, steady, near]) == 1
    noisy = [0.300 + d for d in (-0.03, 0.0, 0.03)] * 4  # the same median, ten times the spread
    assert choice.decide([[x * 1.05 for x in noisy], noisy]) == 0  # 5 % is within two errors: predicted first
    assert choice.decide([[x * 1.05 for x in steady], steady]) == 1  # the same 5 % with little noise: trial


@pytest.mark.parametrize("spread", [0.01, 0.001])
def test_the_trial_runs_every_candidate_twice_then_only_those_still_contending(monkeypatch: pytest.MonkeyPatch,
                                                                               spread: float) -> None:
    """Runs interleave (round by round); extra rounds go only to the candidates the trial cannot yet tell from
    the fastest, only while their error is wider than TIE (``spread`` 0.01: 2.5 %; 0.001: 0.25 %, settled after
    two rounds), and the budget (in runs) is never exceeded."""
    true = {5: 0.300, 6: 0.301, 7: 0.400}  # [0, 5, 11] and [0, 6, 11] cannot be told apart; [0, 7, 11] can
    order: list[int] = []

    def periods(cfg: object, ctx: object, transport: object, build: object, bounds: list[int], tag: int) -> list[float]:
        order.append(bounds[1])
        return [true[bounds[1]] + d for d in (-spread, 0.0, spread)]

    monkeypatch.setattr(split_trial, "_trial_periods", periods)
    candidates = [[0, b, 11] for b in true]
    samples = split_trial._trial(None, None, None, None, candidates, runs=100)
    extra = split_trial.MAX_ROUNDS - split_trial.ROUNDS if spread == 0.01 else 0
    assert order == [5, 6, 7] * split_trial.ROUNDS + [5, 6] * extra
    assert [len(s) for s in samples] == [3 * (split_trial.ROUNDS + extra)] * 2 + [3 * split_trial.ROUNDS]
    order.clear()
    split_trial._trial(None, None, None, None, candidates, runs=7)
    assert order == [5, 6, 7, 5, 6, 7]  # a third round of the two contenders would take 8 runs
    order.clear()
    split_trial._trial(None, None, None, None, candidates, runs=4)
    assert order == [5, 6, 7]  # one round of all, no second
    assert split_trial._trial(None, None, None, None, [], runs=100) == [] and order == [5, 6, 7]  # nothing to try


@pytest.mark.multiprocess
@pytest.mark.long  # pipeline.cost=time is opt-in; test_launch runs it end to end in a sweep by default
@pytest.mark.timeout(240)
def test_a_measured_split_tries_the_best_candidates_in_its_pipeline_and_a_restart_keeps_the_choice(tmp_path: Path) -> None:
    """pipeline.cost=time (NHWC by default on the CPU, said in the log): rank 0 measures, every rank tries
    the same candidates and agrees; the choice is kept in split_choice.json, and a restart in that run
    directory (resume=auto) builds its modules on the kept split, whatever a new measurement would say.

    Method bp: a locked pipeline runs every module in turn, so every candidate is predicted about as fast and
    the best three are always tried (for fdg, candidates predicted more than 10 % slower are not)."""
    cfg = small_config(**{"pipeline.k": 3, "trainer.epochs": 1, "trainer.channels_last": "auto",
                          "pipeline.cost": "time", "method.name": "bp"})
    fresh = tmp_path / "fresh"
    run_pipeline(cfg, fresh)
    log = (fresh / "train.log").read_text()
    assert "default: trainer.channels_last=auto -> true on cpu" in log
    record = json.loads((fresh / split_trial.FILE).read_text())
    assert len(record["block_times"]) == 7 and record["shape"] == [16, 3, 32, 32]
    tried = record["tried"]
    assert len(tried) == choice.TRIALS
    assert max(t["predicted_s"] for t in tried) <= min(t["predicted_s"] for t in tried) * (1 + choice.PLAUSIBLE)
    per_run = split_trial.TRIAL_BATCHES - split_trial.TRIAL_BATCHES // 4 - 1  # batches timed in one run
    assert all(len(t["trial_s"]) % per_run == 0 and len(t["trial_s"]) >= split_trial.ROUNDS * per_run
               and min(t["trial_s"]) > 0 for t in tried)
    assert [t["median_s"] for t in tried] == [choice.median_se(t["trial_s"])[0] for t in tried]
    assert record["bounds"] == tried[choice.decide([t["trial_s"] for t in tried])]["bounds"]
    assert json.loads((fresh / "split.json").read_text())["bounds"] == record["bounds"]
    assert f"split {record['bounds']} by measured time: the fastest in this pipeline" in log

    restarted = tmp_path / "restarted"  # a choice no measurement of these blocks would make
    restarted.mkdir()
    (restarted / split_trial.FILE).write_text(json.dumps({**record, "bounds": [0, 1, 2, 7]}))
    kept = small_config(**{"pipeline.k": 3, "trainer.epochs": 1, "pipeline.cost": "time"})
    kept.resume = "auto"
    run_pipeline(kept, restarted)
    assert json.loads((restarted / "split.json").read_text())["bounds"] == [0, 1, 2, 7]
    assert "kept from" in (restarted / "train.log").read_text()
    assert_same_weights(final_state(restarted), reference_state(small_config(**{"pipeline.k": 3, "trainer.epochs": 1,
                                                                                 "pipeline.split": [1, 2]})))


def test_a_choice_is_kept_only_for_as_many_modules_as_it_cut(tmp_path: Path) -> None:
    """A restart, or a resume from another run's checkpoint, keeps that run's split only at the same K: a
    checkpoint re-cut for another K (resume=PATH with another pipeline.k) chooses afresh."""
    old = tmp_path / "old"
    old.mkdir()
    (old / split_trial.FILE).write_text(json.dumps({"bounds": [0, 2, 5, 7, 9], "block_times": []}))
    cfg = small_config(**{"pipeline.k": 4})
    cfg.resume = str(old / "checkpoints")
    where, record = split_trial._kept(cfg, tmp_path / "new")
    assert (where, record["bounds"]) == (str(old / split_trial.FILE), [0, 2, 5, 7, 9])
    cfg.pipeline.k = 2
    assert split_trial._kept(cfg, tmp_path / "new") is None


@pytest.mark.parametrize("text,reason", [
    ('{"shape": [16, 3, 32, 32], "block_times": [[0.1, 0.1, 0.0', "JSONDecodeError: "),  # cut short
    ('{"block_times": []}', "KeyError: 'bounds'"),
    ('{"bounds": "0 2 5", "block_times": []}', "TypeError: "),
])
def test_a_damaged_kept_choice_is_one_line_naming_the_file(tmp_path: Path, text: str, reason: str) -> None:
    """Issue 27: a split_choice.json cut short failed with json's JSONDecodeError, naming no file."""
    (tmp_path / split_trial.FILE).write_text(text)
    cfg = small_config(**{"pipeline.k": 2})
    cfg.resume = "auto"
    with pytest.raises(ValueError) as err:
        split_trial._kept(cfg, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / split_trial.FILE} is damaged ({reason}") and "\n" not in message
    assert message.endswith("delete it, and the run measures and chooses its split again")
