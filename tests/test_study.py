"""The blocks study's bookkeeping (the training itself is the Trainer's, tested elsewhere)."""

from __future__ import annotations

from kitelm.cli import main
from kitelm.experiments.settings import BLOCK_VARIANTS, StudyRecipe
from kitelm.experiments.study import _curves, results_table


def test_recipe_follows_the_papers_optimiser_and_schedule(tmp_path):
    tc = StudyRecipe().train_config(tmp_path, seed=2)
    assert (tc.lr, tc.beta1, tc.beta2, tc.weight_decay, tc.grad_clip) == (1e-3, 0.9, 0.999, 0.1, 1.0)
    assert tc.schedule == "linear" and tc.min_lr_ratio == 0.0 and tc.warmup_steps == tc.steps // 20
    assert tc.seq_len == 128 and tc.seed == 2
    assert [preset for _, preset in BLOCK_VARIANTS] == ["preln-small", "parallel-small", "sas-small", "sas-p-small",
                                                        "sas-p-nonorm-small", "griffin-small", "griffin-sas-small"]


def test_curves_measure_training_time_without_evaluation():
    metrics = [{"step": 5, "loss": 4.0, "tokens": 1000, "tokens_per_s": 100.0},
               {"step": 10, "loss": 3.0, "tokens": 2000, "tokens_per_s": 200.0},
               {"step": 10, "val_loss": 3.5},
               {"step": 15, "loss": 2.5, "tokens": 3000, "tokens_per_s": 250.0},
               {"step": 20, "loss": 2.0, "tokens": 4000, "tokens_per_s": 200.0},
               {"step": 20, "val_loss": 2.75}]
    curves = _curves(metrics)
    assert curves["step"] == [10, 20] and curves["val_loss"] == [3.5, 2.75]
    assert curves["train_s"] == [15.0, 24.0]  # 1000/100 + 1000/200, then + 1000/250 + 1000/200
    assert curves["tokens_per_s"] == 200.0  # median of the intervals after the first


def test_an_evaluation_between_logged_steps_is_placed_at_that_intervals_rate():
    metrics = [{"step": 5, "loss": 4.0, "tokens": 1000, "tokens_per_s": 100.0},
               {"step": 7, "val_loss": 3.9},
               {"step": 10, "loss": 3.0, "tokens": 2000, "tokens_per_s": 200.0},
               {"step": 12, "loss": 2.9, "tokens": 2400, "tokens_per_s": 200.0},
               {"step": 12, "val_loss": 3.1}]
    assert _curves(metrics)["train_s"] == [12.0, 17.0]  # 10 s to step 5, + 2/5 of the next 5 s; 15 + 400/200


def test_results_table_reports_parameter_change_loss_gap_and_speed():
    runs = [{"val_loss": [3.0]}]
    results = {"recipe": {"steps": 10, "batch_size": 4, "seq_len": 8, "seeds": 1, "lr": 1e-3}, "variants": [
        {"label": "Pre-LN", "preset": "preln-small", "params": 5e6, "non_embedding_params": 4e6,
         "final_val_loss": 3.0, "final_val_loss_std": 0.01, "tokens_per_s": 1000.0, "runs": runs},
        {"label": "SAS", "preset": "sas-small", "params": 4.2e6, "non_embedding_params": 3.4e6,
         "final_val_loss": 3.02, "final_val_loss_std": 0.02, "tokens_per_s": 1100.0, "runs": runs}]}
    results["recipe"]["seeds"] = 2
    table = results_table(results)
    assert "| SAS | `sas-small` | 4.20M | 3.40M (-15.0%) | 3.0200 ± 0.0200 | +0.0200 | 1,100 | 1.10× |" in table
    results["recipe"]["seeds"] = 1  # one seed: the spread is unknown, not zero
    assert "| 3.0200 | +0.0200 |" in results_table(results) and "±" not in results_table(results)


def test_study_rejects_zero_seeds_with_exit_code_2(tmp_path, capsys):
    assert main(["study", "blocks", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "at least 1 step and 1 seed" in capsys.readouterr().err
