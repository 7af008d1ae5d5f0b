"""Config resolution: README commands under --dry-run, JSON precedence, bad input."""
import json
import shlex

import pytest

from conftest import ROOT
from helpers import assert_one_line_error, dry_run, invoke, run_script
from models import get_family

README_TRAINING = [
    ("meta_trainer_exp.py", "--arch resnet50_pruningnet --dataset imagenet --batch-size 100 --epochs 32 --gpu 3 --valuate --visdom",
     {"arch": "resnet50_pruningnet", "batch_size": 100, "epochs": 32, "gpu": [3], "valuate": True, "visdom": True}),
    ("meta_trainer_exp.py", "--arch resnet50_prunednet --dataset imagenet --search-resume checkpoints/meta_prune/MetaPruneSearch_resnet50_pruningnet_flops0_checkpoint.pth.tar --epochs 60 --gpu 0 --valuate --visdom --log-path logs/resnet50_prunednet_candidate0_flops0.txt --candidate 0",
     {"arch": "resnet50_prunednet", "epochs": 60, "candidate": 0, "suffix": "_flops0",
      "log_path": "logs/resnet50_prunednet_candidate0_flops0.txt"}),
    ("meta_trainer_exp.py", "--json experiments/baseline/imagenet_resnet50_prunednet.json --gpu 2",
     {"arch": "resnet50_prunednet", "gpu": [2], "dataset": "imagenet", "input_size": 224}),
    ("trainer_exp.py", "--json experiments/baseline/imagenet_resnet50_prunednet.json --gpu 2",
     {"arch": "resnet50_prunednet", "gpu": [2]}),
    ("meta_trainer_exp.py", "--arch mobilenetv2_pruningnet --dataset imagenet --batch-size 200 --epochs 64 --gpu 0 --lr 0.25 --weight-decay 0 --valuate --visdom",
     {"arch": "mobilenetv2_pruningnet", "batch_size": 200, "lr": 0.25, "weight_decay": 0.0}),
    ("meta_trainer_exp.py", "--arch mobilenetv2_prunednet --dataset imagenet --epochs 80 --lr 0.5 --batch_size 200 --valuate --gpu 2 --candidate 0 --search-resume checkpoints/meta_prune/MetaPruneSearch_mobilenetv2_pruningnet_flops300.0_checkpoint.pth.tar --suffix _flops300 --visdom",
     {"arch": "mobilenetv2_prunednet", "batch_size": 200, "epochs": 80, "lr": 0.5, "suffix": "_flops300"}),
    ("meta_trainer_exp.py", "--json experiments/baseline/imagenet_mobilenetv2_prunednet.json --gpu 5 --visdom",
     {"arch": "mobilenetv2_prunednet", "gpu": [5], "visdom": True, "lr": 0.5}),
    ("trainer_exp.py", "--json experiments/baseline/imagenet_mobilenetv2_prunednet.json --gpu 5 --visdom",
     {"arch": "mobilenetv2_prunednet", "gpu": [5], "visdom": True}),
]
REQUIRED_KEYS = {"arch", "dataset", "data_root", "batch_size", "epochs", "lr", "weight_decay", "momentum", "gpu",
                 "workers", "valuate", "visdom", "json", "resume", "search_resume", "candidate", "gene", "log_path",
                 "suffix", "seed", "width_mult", "input_size"}


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    return tmp_path


@pytest.mark.parametrize("script, command, expected", README_TRAINING)
def test_readme_training_commands_dry_run(script, command, expected, workdir):
    cfg = dry_run(script, *shlex.split(command), cwd=workdir)
    assert REQUIRED_KEYS <= set(cfg)
    for k, v in expected.items():
        assert cfg[k] == v, k
    assert sorted(p.name for p in workdir.iterdir()) == ["experiments"]  # nothing written


def test_precedence_defaults_json_cli(workdir):
    exp = workdir / "exp.json"
    exp.write_text(json.dumps({"arch": "resnet50_pruningnet", "lr": 0.3, "epochs": 7, "batch-size": 32}))
    cfg = dry_run("meta_trainer_exp.py", "--json", str(exp), "--lr", "0.01", cwd=workdir)
    assert cfg["lr"] == 0.01             # CLI beats JSON
    assert cfg["epochs"] == 7 and cfg["batch_size"] == 32  # JSON beats default, hyphenated key accepted
    assert cfg["momentum"] == 0.9        # default
    cfg = dry_run("meta_trainer_exp.py", "--json", str(exp), "--epochs", "90", cwd=workdir)
    assert cfg["epochs"] == 90  # an explicit flag equal to the default still wins


@pytest.mark.parametrize("content, words", [
    ({"arch": "resnet50_pruningnet", "learning_rate": 0.1}, ["unknown key 'learning_rate'"]),
    ({"arch": "resnet50_pruningnet", "epochs": "10"}, ["key 'epochs'", "int", "'10'"]),
    ({"arch": "resnet50_pruningnet", "lr": True}, ["key 'lr'", "number"]),
    ({"arch": "resnet50_pruningnet", "valuate": "yes"}, ["key 'valuate'", "true or false"]),
    ({"arch": "vgg16_pruningnet"}, ["key 'arch'", "one of"]),
    ({"arch": "resnet50_prunednet", "gene": 12}, ["key 'gene'", "list of ids"]),
    ([1, 2], ["one JSON object"]),
])
def test_bad_json_is_one_line_error(content, words, workdir):
    exp = workdir / "bad.json"
    exp.write_text(json.dumps(content))
    r = invoke("meta_trainer_exp.py", "--json", str(exp), "--dry-run", cwd=workdir)
    assert_one_line_error(r, *words)


def test_cli_json_syntax_error_from_a_real_process(workdir):
    (workdir / "bad.json").write_text('{"arch": "resnet50_pruningnet",')
    r = run_script("meta_trainer_exp.py", "--json", "bad.json", cwd=workdir, check=False)
    assert_one_line_error(r, "meta_trainer_exp.py: error:", "not valid JSON")
    assert r.stdout == ""


def test_cli_dry_run_from_a_real_process(workdir):
    r = run_script("trainer_exp.py", "--json", "experiments/baseline/imagenet_resnet50_prunednet.json", "--gpu", "2",
                   "--dry-run", cwd=workdir)
    assert json.loads(r.stdout)["gpu"] == [2]


@pytest.mark.parametrize("args, words", [
    (["--arch", "resnet50_pruningnet", "--batch-size", "0"], ["--batch-size must be a positive integer"]),
    (["--arch", "resnet50_pruningnet", "--epochs", "-1"], ["--epochs"]),
    (["--arch", "resnet50_prunednet", "--gene", "[1, 2]"], ["--gene", "2 elements"]),
    (["--arch", "resnet50_prunednet", "--gene", "[1, 2"], ["cannot read a gene"]),
    (["--arch", "resnet50_pruningnet", "--gene", "[1]"], ["for *_prunednet archs"]),
    (["--arch", "resnet50_prunednet", "--candidate", "0"], ["needs --search-resume"]),
    (["--arch", "resnet99"], ["invalid choice"]),
    (["--arch", "resnet50_pruningnet", "--gpu", "x"], ["--gpu takes CUDA indices"]),
    ([], ["--arch is required"]),
])
def test_bad_flags_are_one_line_errors(args, words, workdir):
    r = invoke("meta_trainer_exp.py", *args, "--dry-run", cwd=workdir)
    assert_one_line_error(r, *words)
    assert sorted(p.name for p in workdir.iterdir()) == ["experiments"]


def test_absent_gpu_is_a_clear_runtime_error(workdir):
    r = invoke("meta_trainer_exp.py", "--arch", "resnet50_pruningnet", "--gpu", "99", cwd=workdir)
    assert_one_line_error(r, "--gpu 99")
    assert sorted(p.name for p in workdir.iterdir()) == ["experiments"]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("*.json")), ids=lambda p: p.name)
def test_every_experiment_file_resolves(path, workdir):
    script = "meta_search_exp.py" if "search" in path.name else (
        "trainer_exp.py" if path.parent.name == "baseline" else "meta_trainer_exp.py")
    cfg = dry_run(script, "--json", str(path), cwd=workdir)
    assert cfg["json"] == str(path)
    for k, v in json.loads(path.read_text()).items():
        if k == "gene":  # resolved to the arch's canonical ids (a fixed position's -1 is its id 30)
            v = list(get_family(cfg["arch"]).layout.parse(v))
        assert cfg[k.replace("-", "_")] == v, k


@pytest.mark.parametrize("args, words", [
    (["--lr", "-1"], ["--lr must be a finite number >= 0, got -1.0"]),
    (["--lr", "nan"], ["--lr", "got nan"]),
    (["--momentum", "-3"], ["--momentum must be a finite number in [0, 1)"]),
    (["--label-smoothing", "2"], ["--label-smoothing", "in [0, 1)"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--warmup-epochs", "-1"], ["--warmup-epochs"]),
    (["--warmup-epochs", "5", "--epochs", "3"], ["--warmup-epochs 5 is longer than --epochs 3"]),
    (["--steps-per-epoch", "-2"], ["--steps-per-epoch"]),
    (["--vis-port", "70000"], ["--vis-port must be a TCP port in 1..65535, got 70000"]),
])
def test_out_of_range_numbers_are_one_line_errors(args, words, workdir):
    r = invoke("meta_trainer_exp.py", "--arch", "resnet50_pruningnet", *args, "--dry-run", cwd=workdir)
    assert_one_line_error(r, *words)


def test_json_switches_can_be_turned_off_on_the_command_line(workdir):
    exp = workdir / "exp.json"
    exp.write_text(json.dumps({"arch": "resnet50_prunednet", "visdom": True, "valuate": True, "inherit": True}))
    cfg = dry_run("meta_trainer_exp.py", "--json", str(exp), cwd=workdir)
    assert cfg["visdom"] is True and cfg["valuate"] is True and cfg["inherit"] == "auto"
    cfg = dry_run("meta_trainer_exp.py", "--json", str(exp), "--no-visdom", "--no-valuate", cwd=workdir)
    assert cfg["visdom"] is False and cfg["valuate"] is False


@pytest.mark.parametrize("name, extra, suffix", [
    ("MetaPruneSearch_resnet50_pruningnet_flops300.0_checkpoint.pth.tar", [], "_flops300.0"),
    ("MetaPruneSearch_resnet50_pruningnet_flops1500_mine_checkpoint.pth.tar", [], "_flops1500_mine"),  # its --suffix
    ("MetaPruneSearch_resnet50_pruningnet_flops0_params5_checkpoint.pth.tar", ["--candidate", "0"], "_flops0_params5"),
    ("MetaPruneSearch_resnet50_pruningnet_flops1500_checkpoint.pth.tar", ["--candidate", "2"], "_flops1500_candidate2"),
    ("MetaPruneSearch_resnet50_pruningnet_flops1500_checkpoint.pth.tar", ["--candidate", "1", "--suffix", "_x"],
     "_x_candidate1"),
    ("elsewhere.pth.tar", [], ""),
])
def test_retrained_candidate_is_named_after_the_search_and_the_candidate(name, extra, suffix, workdir):
    cfg = dry_run("meta_trainer_exp.py", "--arch", "resnet50_prunednet", "--search-resume", f"dir/{name}", *extra,
                  cwd=workdir)
    assert cfg["suffix"] == suffix


def test_a_resolved_config_is_read_only_and_its_checks_cannot_write_it():
    import meta_trainer_exp
    from app.config import parse_args

    cfg = parse_args(meta_trainer_exp.get_args_parser(), ["--arch", "resnet50_pruningnet", "--lr", "0.3"])
    with pytest.raises(AttributeError, match="read-only: 'lr'"):
        cfg.lr = 0.1
    assert cfg.replace(lr=0.1).lr == 0.1 and cfg.lr == 0.3  # a new config; this one unchanged
    with pytest.raises(AttributeError, match="no such config values: lrr"):
        cfg.replace(lrr=0.1)

    def writes(args):
        args.suffix = "_set_by_a_check"

    for validate, derive in ((writes, None), (None, writes)):
        with pytest.raises(AttributeError, match="read-only: 'suffix'"):
            parse_args(meta_trainer_exp.get_args_parser(), ["--arch", "resnet50_pruningnet"], validate, derive)


def test_output_dir_holds_every_output_of_a_run_started_elsewhere(work):
    from helpers import TINY_TRAIN

    before = set(work.rglob("*"))
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_pruningnet", "--epochs", "1",
               "--output-dir", "out/run", cwd=work)
    assert r.returncode == 0, r.stderr
    new = {p.relative_to(work) for p in set(work.rglob("*")) - before if p.is_file()}
    assert new and all(p.parts[:2] == ("out", "run") for p in new), sorted(map(str, new))
    subdirs = {p.parts[2] for p in new}
    assert subdirs == {"checkpoints", "logs"}, subdirs
    assert (work / "out/run/checkpoints/meta_prune/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar").is_file()
