"""Damaged and odd inputs: one line, exit status 2, nothing written (or the last good files kept)."""
import json
import random
import zipfile

import pytest
import torch

from app import checkpoint
from helpers import TINY_DATA, TINY_TRAIN, assert_one_line_error, dry_run, invoke, snapshot
from utils.cli import UserError

CKPT = "checkpoints/meta_prune"
PRUNINGNET = f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
MBV2 = ["--arch", "mobilenetv2_pruningnet"]


# --- checkpoints ------------------------------------------------------------------------------------

def test_every_flipped_bit_of_a_checkpoint_loads_or_is_one_user_error(trained, tmp_path):
    good = (trained / PRUNINGNET).read_bytes()
    with zipfile.ZipFile(trained / PRUNINGNET) as archive:
        pickle_part = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    rng, detected = random.Random(0), 0
    for trial in range(24):
        damaged = bytearray(good)
        # half the flips in the pickle (the structure), half anywhere (mostly weights)
        at = pickle_part.header_offset + 60 + rng.randrange(pickle_part.compress_size) if trial % 2 else \
            rng.randrange(len(damaged))
        damaged[at] ^= 1 << rng.randrange(8)
        path = tmp_path / "flipped.pth.tar"
        path.write_bytes(bytes(damaged))
        try:
            checkpoint.build_model(checkpoint.load(path, checkpoint.MODEL, "--resume"))
        except UserError as e:
            assert len(str(e).splitlines()) == 1 and str(path) in str(e) or "does not rebuild" in str(e), e
            detected += 1
    assert detected >= 22  # a flip in the archive's padding may change nothing; every other is caught


@pytest.mark.parametrize("damage, words", [
    (lambda good: good[:1], "not a PyTorch checkpoint file"),
    (lambda good: b"", "an empty file, not a checkpoint"),
    (lambda good: good[: len(good) // 3], "truncated or corrupt"),
    (lambda good: good[: len(good) // 2] + bytes(64) + good[len(good) // 2 + 64:], "fails its checksum"),
])
def test_a_damaged_checkpoint_given_to_a_script_is_one_line(trained, damage, words):
    bad = trained / "bad.pth.tar"
    bad.write_bytes(damage((trained / PRUNINGNET).read_bytes()))
    before = snapshot(trained)
    for script, argv in (("meta_trainer_exp.py", [*TINY_TRAIN, *MBV2, "--epochs", "2", "--suffix", "_r"]),
                         ("meta_search_exp.py", [*TINY_DATA, *MBV2])):
        r = invoke(script, *argv, "--resume", "bad.pth.tar", cwd=trained)
        assert_one_line_error(r, "bad.pth.tar", words)
    assert snapshot(trained) == before


def test_a_folder_given_as_a_checkpoint_is_one_line(trained):
    for script, flag in (("meta_trainer_exp.py", "--resume"), ("meta_search_exp.py", "--resume"),
                         ("meta_search_exp.py", "--search-resume")):
        r = invoke(script, *TINY_DATA, *MBV2, "--resume", PRUNINGNET, flag, "img", cwd=trained)
        assert_one_line_error(r, f"{flag} img: is a folder")


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("model_args"), "damaged checkpoint (no field 'model_args')"),
    (lambda s: s.update(arch=7), "damaged checkpoint (field 'arch' is 7)"),
    (lambda s: s.update(arch="resnet18_pruningnet"), "unknown arch 'resnet18_pruningnet'"),
    (lambda s: s["model_args"].update(width_mult="wide"), "model_args 'width_mult' is 'wide'"),
    (lambda s: s.update(epoch="one"), "field 'epoch' is 'one'"),
    (lambda s: s["model"].update(extra=[1, 2]), "its weights are not all tensors"),
])
def test_a_checkpoint_missing_what_its_kind_needs_is_named(trained, edit, words):
    state = torch.load(trained / PRUNINGNET, weights_only=True)
    edit(state)
    torch.save(state, trained / "edited.pth.tar")
    with pytest.raises(UserError) as e:
        checkpoint.load(trained / "edited.pth.tar", checkpoint.MODEL, "--resume")
    assert str(e.value).startswith(f"--resume {trained / 'edited.pth.tar'}: ") and words in str(e.value)


def test_weights_that_do_not_fit_their_model_are_one_line(trained):
    state = torch.load(trained / PRUNINGNET, weights_only=True)
    key = next(k for k in state["model"] if k.endswith("weight2"))
    state["model"][key] = state["model"][key][:1]
    torch.save(state, trained / "shrunk.pth.tar")
    r = invoke("meta_search_exp.py", *TINY_DATA, *MBV2, "--resume", "shrunk.pth.tar", cwd=trained)
    assert_one_line_error(r, "does not rebuild from what it holds", key)


# --- images -----------------------------------------------------------------------------------------

def damage_one_image(work) -> str:
    victim = sorted((work / "img/train/class_001").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG, as a broken download leaves it
    return str(victim.relative_to(work))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_damaged_image_stops_the_run_with_one_line_and_keeps_the_checkpoint(trained, workers):
    victim = damage_one_image(trained)
    ckpt = (trained / PRUNINGNET).read_bytes()
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--workers", workers, *MBV2, "--epochs", "2", "--resume", PRUNINGNET,
               cwd=trained)
    assert_one_line_error(r, f"damaged image {victim}", "--skip-bad-images")
    assert (trained / PRUNINGNET).read_bytes() == ckpt


def test_skip_bad_images_leaves_them_out_and_logs_each(work):
    victim = damage_one_image(work)
    # a PrunedNet trains on all 36 images of train/ (no split held out), and batches of 4 leave none
    # out: the damaged image comes up once per epoch
    r = invoke("meta_trainer_exp.py", *TINY_DATA, "--arch", "mobilenetv2_prunednet", "--epochs", "2", "--batch-size",
               "4", "--skip-bad-images", "--workers", "2", cwd=work)
    assert r.returncode == 0, r.stderr
    log = (work / "logs/imagenet_mobilenetv2_prunednet.txt").read_text()
    epochs = [json.loads(line) for line in (work / "logs/imagenet_mobilenetv2_prunednet.jsonl").read_text()
              .splitlines() if '"kind": "epoch"' in line]
    assert [e["skipped_images"] for e in epochs] == [1, 1]
    assert log.count(f"damaged image {victim}") == 2 and "skipped" in log


def test_the_search_skips_damaged_images_too(trained):
    work = trained
    victim = "img/" + json.loads(next((work / CKPT / "splits").iterdir()).read_text())["subval"][0]
    (work / victim).write_bytes(b"not a JPEG")
    search = [*TINY_DATA, *MBV2, "--resume", PRUNINGNET, "--population", "4", "--select-num", "2", "--mutation-num",
              "1", "--crossover-num", "1", "--recal-batches", "2", "--epochs", "1"]
    assert_one_line_error(invoke("meta_search_exp.py", *search, cwd=work), f"damaged image {victim}")
    r = invoke("meta_search_exp.py", *search, "--skip-bad-images", cwd=work)
    assert r.returncode == 0, r.stderr
    assert f"damaged image {victim} (" in r.stdout and "skipped" in r.stdout


# --- flags and files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--width-mult", "nan"], "--width-mult must be a number in (0, 16], got nan"),
    (["--width-mult", "inf"], "--width-mult must be a number in (0, 16], got inf"),
    (["--width-mult", "1e6"], "--width-mult must be a number in (0, 16]"),
    (["--input-size", "1"], "--input-size 1 is below 8 px"),
    (["--input-size", "24", "--no-small-input"], "--input-size 24 is below 32 px, the smallest the ImageNet stem"),
    (["--input-size", "22400"], "--input-size must be at most 4096 px"),
    (["--workers", "100000"], "--workers must be in 0..256"),
    (["--seed", str(2 ** 64)], "--seed must be an integer in [0, 2**63)"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63)"),
    (["--json", "."], "--json .: is a folder"),
    (["--log-path", "."], "--log-path .: is a folder"),
    (["--log-path", "logs/run.jsonl"], "give the text log another suffix, e.g. logs/run.txt"),
    (["--dist-timeout", "nan"], "--dist-timeout must be a positive number of minutes"),
])
def test_bad_values_are_one_line_before_anything_is_written(work, args, words):
    before = snapshot(work)
    for extra in ([], ["--dry-run"]):
        r = invoke("meta_trainer_exp.py", *TINY_TRAIN, *MBV2, *args, *extra, cwd=work)
        assert_one_line_error(r, words)
    assert snapshot(work) == before


def test_a_search_log_path_that_cannot_be_a_log_is_one_line(work):
    r = invoke("meta_search_exp.py", *TINY_DATA, *MBV2, "--resume", "x.pth.tar", "--log", "a.jsonl", cwd=work)
    assert_one_line_error(r, "--log a.jsonl", "another suffix")


def test_cost_cli_refuses_a_width_it_cannot_count(capsys):
    from models.cost import main

    for width in ("nan", "inf"):  # inf used to overflow in the channel rounding
        assert main(["--arch", "resnet50", "--gene", str([-1] * 21), "--width-mult", width]) == 2
        assert f"--width-mult must be a number in (0, 16], got {width}" in capsys.readouterr().err


def test_plot_refuses_numbers_no_plot_can_show(tmp_path):
    from utils.plot import main

    rows = [{"kind": "run", "time": 1, "resumed": False},
            {"kind": "step", "time": 1, "epoch": 0, "step": 1, "loss": 1e308, "top1": 1.0, "lr": 0.1, "img_s": 1.0}]
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"run.jsonl:2: the step record's loss is 1e\+308"):
        main([str(log), "--out", str(tmp_path / "plots")])
    assert not (tmp_path / "plots").exists()


# --- the main job -----------------------------------------------------------------------------------

def test_pipeline_checks_the_budget_and_the_run_folder_first(tmp_path, monkeypatch):
    import pipeline

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--budget is below the narrowest uniform network"):
        pipeline.main(["--budget", "0.001", "--quick"])
    assert list(tmp_path.iterdir()) == []  # checked before the PruningNet trains: nothing written
    with pytest.raises(UserError, match=r"--seed must be an integer in \[0, 2\*\*63\), got -1"):
        pipeline.main(["--seed", "-1", "--quick"])
    assert list(tmp_path.iterdir()) == []  # not even the run folder
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match="--out taken: is a file"):
        pipeline.main(["--out", "taken", "--quick"])
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "results.json").write_text("{}")
    with pytest.raises(UserError, match="earlier holds an earlier run; pass --overwrite"):
        pipeline.main(["--out", "earlier", "--quick"])


@pytest.mark.parametrize("args", [["--input-size", "8"], ["--input-size", "32", "--no-small-input"]])
def test_the_smallest_input_each_stem_takes_is_accepted(tmp_path, args):
    cfg = dry_run("meta_trainer_exp.py", "--arch", "resnet50_pruningnet", "--dataset", "imagenet", *args, cwd=tmp_path)
    assert cfg["input_size"] == int(args[1])
