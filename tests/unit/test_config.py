from pathlib import Path

import pytest

from fsmeta.config import Config, changed_keys, dump_config, load_config
from fsmeta.errors import ConfigError
from fsmeta.study import DEMO_OVERRIDES, demo_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers_values_but_fine_tuning_is_the_measured_one():
    cfg = load_config()
    assert (cfg.meta.shots, cfg.meta.inner_steps, cfg.meta.inner_lr, cfg.meta.epsilon) == (5, 30, 1e-3, 1.0)
    assert (cfg.meta.iterations, cfg.meta.checkpoint_every, cfg.meta.weight_decay) == (300, 25, 5e-4)
    assert cfg.data.stride("tnbc", "source") == 20 and cfg.data.stride("b5", "finetune") == 30
    assert cfg.data.min_foreground == 360 and cfg.data.crop_size == 256
    # fine-tuning goes beyond the paper by default (SPEC §8; docs/results.md, issue 19) ...
    ft = cfg.finetune
    assert (ft.steps, ft.batch_size, ft.lr, ft.crop_size, cfg.augment.finetune, cfg.eval.threshold_rule) == (500, 16, 3e-4, 128, True, "prior")
    assert not (cfg.augment.meta or cfg.augment.transfer)
    # ... and configs/paper.yaml restores the paper's: 20 epochs of batch 64 at the 256² crop, lr 1e-4, threshold 0.5
    paper = load_config(ROOT / "configs" / "paper.yaml")
    ft = paper.finetune
    assert (ft.epochs, ft.steps, ft.batch_size, ft.lr, paper.finetune_crop_size(), paper.finetune_min_foreground()) == (20, 0, 64, 1e-4, 256, 360)
    assert not (paper.augment.meta or paper.augment.transfer or paper.augment.finetune)
    assert (paper.eval.threshold_rule, paper.eval.threshold) == ("fixed", 0.5)


@pytest.mark.parametrize("variant,weights", [("bce", (0, 0)), ("bce-er", (0.1, 0)), ("bce-d", (0, 0.01)), ("all", (0.01, 0.01))])
def test_loss_weights_follow_the_variant(variant, weights):
    assert load_config(None, [f"meta.variant={variant}"]).meta.loss_weights() == weights


def test_explicit_weights_win_but_unused_terms_stay_off():
    cfg = load_config(None, ["meta.variant=bce-er", "meta.alpha=0.3", "meta.beta=0.5"])
    assert cfg.meta.loss_weights() == (0.3, 0.0)


def test_overrides_parse_yaml_values_and_merge_stride_tables():
    cfg = load_config(None, ["eval.shots=[1, 3]", "data.source_stride={tnbc: 7}", "meta.alpha=1e-2"])
    assert cfg.eval.shots == [1, 3]
    assert cfg.data.stride("tnbc", "source") == 7 and cfg.data.stride("em", "source") == 85
    assert cfg.meta.alpha == 0.01


@pytest.mark.parametrize(
    "override,message",
    [
        ("meta.alpah=0.1", "unknown configuration key meta.alpah"),
        ("meta.shots=2.5", "meta.shots must be a whole number"),
        ("meta.variant=bce-xx", "meta.variant='bce-xx'"),
        ("arch=resnet", "arch='resnet'"),
        ("meta.alpha=-1", "meta.alpha=-1.0 must be a non-negative"),
        ("tracking.enabled=maybe", "tracking.enabled must be true or false"),
        ("nokey", "--set expects key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_finetune_crop_size_defaults_to_the_data_crop_and_is_checked():
    assert load_config(None, ["data.crop_size=96", "finetune.crop_size=0"]).finetune_crop_size() == 96
    assert load_config(None, ["data.crop_size=96", "finetune.crop_size=48"]).finetune_crop_size() == 48
    # the kept crops' foreground share stays the paper's: 22 px of 64² is 88 px of 128²
    assert load_config(None, ["data.crop_size=64", "data.min_foreground=22", "finetune.crop_size=128"]).finetune_min_foreground() == 88
    assert load_config(None, ["data.crop_size=256", "finetune.crop_size=0"]).finetune_min_foreground() == 360
    with pytest.raises(ConfigError, match=r"finetune.crop_size=4 is too small \(at least 8; 0: data.crop_size\)"):
        load_config(None, ["finetune.crop_size=4"])


def test_target_listed_as_source_is_rejected():
    with pytest.raises(ConfigError, match="target 'synth-he' is also listed as a source"):
        load_config(None, ["data.target=synth-he", "data.sources=[synth-em, synth-he]"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["meta.variant=bce-d", "seed=3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_configs_load_and_demo_yaml_matches_the_builtin_demo():
    assert demo_config(ROOT / "configs" / "demo.yaml") == demo_config()
    # the demo fine-tunes as the paper does, whatever the built-in fine-tuning defaults are
    demo = demo_config()
    ft = demo.finetune
    assert (ft.epochs, ft.steps, ft.batch_size, ft.lr, demo.finetune_crop_size()) == (20, 0, 64, 1e-4, 64)
    assert not demo.augment.finetune and demo.eval.threshold_rule == "fixed"
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert paper.meta.iterations == 300 and paper.eval.seeds == list(range(10))
    assert isinstance(paper, Config) and DEMO_OVERRIDES


def test_epochs_that_the_step_budget_would_ignore_are_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["finetune.epochs=50"])
    assert str(err.value) == ("finetune.epochs=50 has no effect: finetune.steps=500 sets the fine-tuning budget "
                              "(steps of finetune.batch_size crops); set finetune.steps=0 to fine-tune by epochs")
    path = tmp_path / "run.yaml"
    path.write_text("finetune: {epochs: 3, steps: 250}\n")
    with pytest.raises(ConfigError, match="finetune.epochs=3 has no effect: finetune.steps=250"):
        load_config(path)
    assert load_config(None, ["finetune.epochs=50", "finetune.steps=0"]).finetune.epochs == 50
    written = tmp_path / "written.yaml"  # a configuration written out holds the default epochs beside steps
    written.write_text(dump_config(load_config()))
    assert load_config(written) == load_config()


def test_a_per_shot_budget_that_epochs_would_ignore_is_refused():
    cfg = load_config()
    assert [cfg.finetune.budget(k) for k in (1, 5, 7, 10)] == [500, 500, 700, 1000]  # 100 steps a shot, at least 500
    with pytest.raises(ConfigError) as err:
        load_config(None, ["finetune.steps=0", "finetune.steps_per_shot=50"])
    assert str(err.value) == ("finetune.steps_per_shot=50 has no effect: finetune.steps=0 fine-tunes for finetune.epochs=20 "
                              "epochs; set finetune.steps > 0 for a step budget")
    assert load_config(None, ["finetune.steps=0", "finetune.steps_per_shot=100"]).finetune.budget(10) == 0
    assert load_config(None, ["finetune.steps_per_shot=0"]).finetune.budget(10) == 500
    with pytest.raises(ConfigError, match="finetune.steps_per_shot=-1"):
        load_config(None, ["finetune.steps_per_shot=-1"])


def test_changed_keys_is_the_one_resume_check():
    """Every --resume compares a run's saved flat configuration with the current one here."""
    cfg = load_config(ROOT / "configs" / "real3.yaml")  # replaces select.patches_per_shot: no b5/b39 entries
    saved = cfg.flat()
    assert changed_keys(saved, cfg.flat()) == []
    assert changed_keys(saved, load_config(ROOT / "configs" / "real3.yaml", ["finetune.lr=0.5", "meta.alpha=0.2"]).flat()) == [
        "finetune.lr", "meta.alpha"]
    # where and how fast a run computes never blocks a resume; callers add their own (the benchmark's grid axes)
    assert changed_keys(saved, load_config(ROOT / "configs" / "real3.yaml", ["threads=1", "compute.amp=off", "ray.address=auto"]).flat()) == []
    grown = load_config(ROOT / "configs" / "real3.yaml", ["eval.seeds=[0, 1, 2, 3]"]).flat()
    assert changed_keys(saved, grown) == ["eval.seeds"]
    assert changed_keys(saved, grown, ignore=("eval.seeds",)) == []
    # a field the saved run lacks was added to fsmeta since: it counts as its default ...
    older = {k: v for k, v in saved.items() if k != "eval.vary_split"}
    assert changed_keys(older, cfg.flat()) == []
    assert changed_keys(older, load_config(ROOT / "configs" / "real3.yaml", ["eval.vary_split=false"]).flat()) == ["eval.vary_split"]
    # ... unless its default changed after it was added: then as what a run without it did
    pre_holdout = {k: v for k, v in saved.items() if not k.startswith("finetune.holdout")}
    assert changed_keys(pre_holdout, cfg.flat()) == ["finetune.holdout"]  # real3 holds 0.2 now; the old run trained on all
    assert changed_keys(pre_holdout, load_config(ROOT / "configs" / "real3.yaml", ["finetune.holdout=0"]).flat()) == []
    # ... but a dict field the run had is compared as saved: a stride table's missing entries are not refilled
    # from defaults (load_config merges strides into the built-in table, so a saved one is whole) ...
    assert changed_keys({k: v for k, v in saved.items() if k != "data.finetune_stride.b5"}, cfg.flat()) == ["data.finetune_stride.b5"]
    # ... while a select table's missing entry is the built-in one, which SelectConfig.lookup reads in its place:
    # real3's patches_per_shot lacks b5 and reads 100; without em it would read 400, not real3's 24
    assert "select.patches_per_shot.b5" not in saved and cfg.select.lookup("patches_per_shot", "b5") == 100
    assert changed_keys({k: v for k, v in saved.items() if k != "select.patches_per_shot.em"}, cfg.flat()) == ["select.patches_per_shot.em"]
    # only= compares just the settings that give a checkpoint its meaning (meta-training's resume)
    assert changed_keys(saved, load_config(ROOT / "configs" / "real3.yaml", ["finetune.lr=0.5"]).flat(), only=("meta", "data")) == []
    assert changed_keys(saved, load_config(ROOT / "configs" / "real3.yaml", ["data.crop_size=32"]).flat(), only=("meta", "data")) == ["data.crop_size"]


def test_a_target_outside_study_datasets_learns_from_all_of_them_and_an_unknown_one_is_named(tmp_path):
    from fsmeta.data.registry import resolve_sources
    from fsmeta.errors import FsmetaError
    from fsmeta.study import target_config

    cfg = load_config(ROOT / "configs" / "real3.yaml", [f"data.root={tmp_path}"])
    listed = cfg.study.datasets
    assert target_config(cfg, "em", "fcrn").data.sources == [d for d in listed if d != "em"] and "em" in listed
    # a lab's own data set scored under the study's configuration: every listed data set is a source
    assert target_config(cfg, "mylab", "fcrn").data.sources == listed
    small = load_config(None, [f"data.root={tmp_path}", "study.datasets=[synth-fluo, synth-nuclei]"])
    tcfg = target_config(small, "synth-he", "fcrn")
    assert (tcfg.data.target, resolve_sources(tcfg)) == ("synth-he", ["synth-fluo", "synth-nuclei"])
    with pytest.raises(FsmetaError, match="unknown target 'mylab'; known data sets: synth-fluo"):
        resolve_sources(target_config(small, "mylab", "fcrn"))


def test_a_select_table_given_in_part_resumes_against_the_same_table_written_out_whole():
    """``--set select.gamma={em: 0.3}`` replaces the flat table with one entry; a run saved that way and resumed the same
    way, or against the whole table it reads (every other data set's built-in γ), has changed nothing."""
    part = load_config(None, ["select.gamma={em: 0.3}"])
    assert part.select.gamma == {"em": 0.3} and part.select.lookup("gamma", "tnbc") == 0.08
    whole = load_config(None, [f"select.gamma={ {**Config().select.gamma, 'em': 0.3} }"])
    assert len(whole.select.gamma) > 1
    assert changed_keys(part.flat(), part.flat()) == []
    assert changed_keys(part.flat(), whole.flat()) == changed_keys(whole.flat(), part.flat()) == []
    assert changed_keys(Config().flat(), part.flat()) == ["select.gamma.em"]
    assert changed_keys(part.flat(), load_config(None, ["select.gamma={em: 0.3, tnbc: 0.1}"]).flat()) == ["select.gamma.tnbc"]
    # an entry the built-in table lacks counts as missing on the other side, where the configured default would apply
    assert changed_keys(part.flat(), load_config(None, ["select.gamma={em: 0.3, lab: 0.2}"]).flat()) == ["select.gamma.lab"]
