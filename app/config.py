"""Command-line configuration shared by the three entry scripts.

Precedence: argparse defaults < the ``--json`` experiment file < flags given on the command line.
JSON keys are argparse dests (``batch_size``; ``batch-size`` is accepted too); unknown keys and
values of the wrong type are errors that name the key. Dataset-dependent defaults (input size,
data root) are resolved afterwards, so ``--dry-run`` prints exactly what a run would use.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from models import MAX_INPUT_SIZE, MAX_WIDTH_MULT, MIN_INPUT_SIZE, list_models, small_input_for
from utils.cli import Parser, ReportedError, UserError, positive_int, tcp_port
from utils.files import read_text

DATASETS = ("imagenet", "fashionmnist")
DEFAULT_INPUT_SIZE = {"imagenet": 224, "fashionmnist": 32}
# where a run's files go, under --output-dir (default: the working folder)
CHECKPOINT_SUBDIR = Path("checkpoints/meta_prune")
LOG_SUBDIR = Path("logs")
SPLIT_SUBDIR = CHECKPOINT_SUBDIR / "splits"
MAX_WORKERS = 256  # loader processes per training process


class Config(argparse.Namespace):
    """A run's configuration, resolved once (defaults < JSON < explicit flags, then the values derived
    from them) and read-only from then on: every flag is an attribute, ``vars(config)`` the dict."""

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the config is resolved and read-only: {name!r} cannot be set afterwards")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the config is resolved and read-only: {name!r} cannot be deleted")

    def replace(self, **changes: Any) -> "Config":
        """A new config with ``changes`` (values the run learns from its input files, e.g. the
        PruningNet's width); this one stays as it is."""
        unknown = sorted(set(changes) - set(vars(self)))
        if unknown:
            raise AttributeError(f"no such config values: {', '.join(unknown)}")
        return Config(**{**vars(self), **changes})


def checkpoint_dir(cfg: argparse.Namespace) -> Path:
    return Path(cfg.output_dir) / CHECKPOINT_SUBDIR


def log_dir(cfg: argparse.Namespace) -> Path:
    return Path(cfg.output_dir) / LOG_SUBDIR


def split_dir(cfg: argparse.Namespace) -> Path:
    return Path(cfg.output_dir) / SPLIT_SUBDIR


class TrainingStopped(ReportedError):
    """Training cannot go on (e.g. a non-finite loss): one line, exit status 1, last good checkpoint kept."""

    exit_status = 1


class Spelled(float):
    """A number that remembers how it was written (``300.0`` stays ``300.0``, ``1e3`` stays ``1e3``):
    ``--flops`` names the search's files as the user wrote it. Plain ``float`` in the resolved config."""

    text: str

    def __new__(cls, text: str) -> "Spelled":
        number = super().__new__(cls, text)
        number.text = text.strip()
        return number


def spelled_number(value: Any) -> Spelled:
    """An argparse type: a number from the command line (a string) or from ``--json`` (read as written)."""
    if isinstance(value, Spelled):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}")
    try:
        return Spelled(str(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {value!r}") from None


def spelling(value: float) -> str:
    """How a number was written (``Spelled``), else its shortest form."""
    return value.text if isinstance(value, Spelled) else f"{value:g}"


def gpu_ids(value: Any) -> list[int]:
    """``3``, ``"0,1"`` or ``[0, 1]`` → list of CUDA device indices."""
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        ids = [int(v) for v in items if not isinstance(v, bool)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpu takes CUDA indices such as 0 or 0,1; got {value!r}") from None
    if len(ids) != len(items) or not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"--gpu takes CUDA indices such as 0 or 0,1; got {value!r}")
    return ids


def add_common_args(p: Parser, arch_default: str | None = None) -> None:
    """Flags every script takes (the seed README's spellings plus the project's additions)."""
    p.flag("--arch", default=arch_default, choices=list_models(), help="model name (see models/registry)")
    p.flag("--dataset", default="fashionmnist", choices=DATASETS,
           help="imagenet: an ImageFolder with train/ and val/; fashionmnist: the embedded CPU default")
    p.flag("--data-root", default=None, help="dataset folder (default: $IMAGENET_ROOT or datasets/imagenet; "
                                              "Fashion-MNIST: Debian's dataset-fashion-mnist location)")
    p.flag("--gpu", type=gpu_ids, default=None, help="CUDA device index (default: CUDA 0 when present, else CPU)")
    p.flag("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    p.flag("--workers", "-j", type=int, default=4, help="data-loading worker processes")
    p.flag("--dist-timeout", type=float, default=180.0,
           help="minutes a torchrun process waits in a collective before the job is declared hung (covers "
                "rank 0 alone writing a multi-GB checkpoint or measuring a latency table)")
    p.flag("--batch-size", "-b", type=int, default=256)
    p.flag("--epochs", type=int, default=90)
    p.flag("--seed", type=int, default=0)
    p.flag("--width-mult", type=float, default=1.0,
           help="multiplier on every base channel count (gene meaning unchanged)")
    p.flag("--input-size", type=int, default=None, help="image side (default: 224 ImageNet, 32 Fashion-MNIST)")
    p.flag("--small-input", action=argparse.BooleanOptionalAction, default=None,
           help="3x3/1 stem without max-pool for small images (default: on for --input-size <= 32)")
    p.flag("--val-per-class", type=int, default=50,
           help="images per class held out of train as the sub-validation split")
    p.flag("--json", default=None, help="experiment file: its keys override defaults, explicit flags override it")
    p.flag("--log-path", default=None, help="human-readable log (default logs/{dataset}_{arch}{suffix}.txt)")
    p.flag("--suffix", default="", help="appended to checkpoint and log names")
    p.flag("--output-dir", default=".",
           help="folder under which the run writes checkpoints/meta_prune/ and logs/ (default: the working folder)")
    p.flag("--skip-bad-images", action="store_true",
           help="leave image files that cannot be decoded out of their batches, each one logged (default: stop "
                "with one line naming the first)")
    p.flag("--overwrite", action="store_true",
           help="replace the outputs of an earlier run of the same name (otherwise such a run is refused)")
    p.flag("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    p.flag("--visdom", action=argparse.BooleanOptionalAction, default=False, help="plot to a visdom server")
    p.flag("--vis-env", default=None, help="visdom environment (default {dataset}_{arch}{suffix})")
    p.flag("--vis-legend", default=None, help="legend name of this run's traces (default: the run name)")
    p.flag("--vis-interval", type=int, default=20, help="iterations between visdom points")
    p.flag("--vis-server", default="http://127.0.0.1", help="visdom server address")
    p.flag("--vis-port", type=tcp_port, default=8097)


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Dests the user set on the command line (a copy of the parser with every default suppressed)."""
    quiet = copy.deepcopy(parser)
    quiet._defaults.clear()  # set_defaults() values would otherwise look like given flags
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    key = f"{where}: key '{action.dest}'"
    if action.nargs == "?" and isinstance(value, bool):  # "inherit": true means the flag without a value
        return action.const if value else None
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if value is None and action.default is None:
        return None
    if action.nargs == "+":
        if not isinstance(value, list) or not value:
            raise UserError(f"{key} must be a list of values, got {value!r}")
        return [_coerce(argparse.Action([], action.dest, type=action.type, choices=action.choices), v, where)
                for v in value]
    kind = action.type or str
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:
        try:
            value, ok = kind(value), True
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise UserError(f"{key}: {e}") from None
    if not ok:
        expected = "a number" if kind is float else getattr(kind, "__name__", kind)
        raise UserError(f"{key} must be {expected}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def load_json(path: str) -> dict[str, Any]:
    """The ``--json`` experiment file as a dict; unreadable or non-object files are user errors."""
    text = read_text(Path(path), f"--json {path}", "an experiment file (experiments/*.json)")
    try:
        cfg = json.loads(text, parse_float=Spelled)  # a number keeps its text until the config is resolved
    except json.JSONDecodeError as e:
        raise UserError(f"--json {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--json {path}: the file must hold one JSON object of flag names to values")
    return cfg


def parse_args(parser: Parser, argv: list[str] | None = None,
               validate: Callable[[argparse.Namespace], None] | None = None,
               derive: Callable[[argparse.Namespace], dict[str, Any]] | None = None) -> Config:
    """The run's ``Config``: ``argv`` parsed with JSON precedence and the dataset defaults, checked by
    ``validate`` (which only raises), then completed with the values ``derive`` returns."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.json:
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "json")}
        explicit = explicit_dests(parser, argv)
        for key, value in load_json(args.json).items():
            dest = key.replace("-", "_")
            if dest not in actions:
                raise UserError(f"--json {args.json}: unknown key '{key}' "
                                f"(keys are the script's flag names, see --help)")
            if dest not in explicit:
                setattr(args, dest, _coerce(actions[dest], value, f"--json {args.json}"))
    if args.arch is None:
        raise UserError("--arch is required (on the command line or in the --json file)")
    if args.input_size is None:
        args.input_size = DEFAULT_INPUT_SIZE[args.dataset]
    if args.small_input is None:
        args.small_input = small_input_for(args.input_size)
    if args.data_root is None and args.dataset == "imagenet":
        args.data_root = os.environ.get("IMAGENET_ROOT", "datasets/imagenet")
    for name in ("batch_size", "epochs", "input_size", "val_per_class", "vis_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.width_mult is not None and not (math.isfinite(args.width_mult) and 0 < args.width_mult <= MAX_WIDTH_MULT):
        raise UserError(f"--width-mult must be a number in (0, {MAX_WIDTH_MULT:g}], got {args.width_mult}")
    if not 0 <= args.workers <= MAX_WORKERS:
        raise UserError(f"--workers must be in 0..{MAX_WORKERS}, got {args.workers}")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    smallest = MIN_INPUT_SIZE[args.small_input]
    if args.input_size < smallest:
        stem = ("the small-input stem (8x downsampling)" if args.small_input else
                "the ImageNet stem (7x7/2 conv and max-pool, 32x downsampling; --small-input takes 8 px and more)")
        raise UserError(f"--input-size {args.input_size} is below {smallest} px, the smallest {stem} takes")
    if args.input_size > MAX_INPUT_SIZE:
        raise UserError(f"--input-size must be at most {MAX_INPUT_SIZE} px, got {args.input_size}")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UserError(f"--dist-timeout must be a positive number of minutes, got {args.dist_timeout}")
    if args.log_path:
        check_log_file(args.log_path, "--log-path")
    _check_ranges(args)
    parsed = Config(**vars(args))  # the script's checks and derivations read it; none can write it
    if validate:
        validate(parsed)
    derived = derive(parsed) if derive else {}
    return Config(**{k: float(v) if isinstance(v, Spelled) else v for k, v in {**vars(args), **derived}.items()})


# training flags and the interval [low, high) each must lie in
_RANGES = {"lr": (0.0, math.inf), "momentum": (0.0, 1.0), "weight_decay": (0.0, math.inf), "lr_gamma": (0.0, 1.0),
           "lighting": (0.0, math.inf), "dropout": (0.0, 1.0),
           "label_smoothing": (0.0, 1.0), "warmup_epochs": (0, math.inf), "steps_per_epoch": (0, math.inf),
           "save_every_steps": (0, math.inf)}


def _check_ranges(args: argparse.Namespace) -> None:
    """Numbers outside their meaningful range are input errors, found before anything runs."""
    for name, (low, high) in _RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not (low <= value < high):
            span = f"in [{low:g}, {high:g})" if math.isfinite(high) else f">= {low:g}"
            raise UserError(f"--{name.replace('_', '-')} must be a finite number {span}, got {value}")
    if getattr(args, "lighting", 0) and args.dataset != "imagenet":
        raise UserError(f"--lighting is noise on colour photos (--dataset imagenet), not on {args.dataset}")
    if getattr(args, "warmup_epochs", 0) > args.epochs:
        raise UserError(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}")
    milestones = getattr(args, "lr_milestones", None)
    if getattr(args, "lr_scheduler", None) == "step" and not milestones:
        raise UserError("--lr-scheduler step needs --lr-milestones EPOCH [EPOCH ...], e.g. --lr-milestones 8 16 24")
    if milestones and (milestones != sorted(set(milestones)) or not 0 < milestones[0] <= milestones[-1] < args.epochs):
        raise UserError(f"--lr-milestones must be increasing epochs in 1..{args.epochs - 1}, got "
                        f"{' '.join(map(str, milestones))}")


def check_log_file(path: str, flag: str) -> None:
    """A text log path the run can write: not a folder, and not the ``.jsonl`` file its records get."""
    if Path(path).is_dir():
        raise UserError(f"{flag} {path}: is a folder; give the log file's path (e.g. {Path(path) / 'run.txt'})")
    if Path(path).suffix == ".jsonl":
        raise UserError(f"{flag} {path}: the run's JSONL records go to {Path(path)} beside the text log; give the "
                        f"text log another suffix, e.g. {Path(path).with_suffix('.txt')}")


def run_name(args: argparse.Namespace) -> str:
    return f"{args.dataset}_{args.arch}{args.suffix}"


def run_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """A training run's resumable checkpoint and its best one."""
    folder, name = checkpoint_dir(args), run_name(args)
    return folder / f"{name}_checkpoint.pth.tar", folder / f"{name}_best.pth.tar"


def log_path(args: argparse.Namespace) -> Path:
    return Path(args.log_path) if args.log_path else log_dir(args) / f"{run_name(args)}.txt"


def dump(args: argparse.Namespace) -> str:
    """The resolved config as one JSON object (argparse dests as keys)."""
    return json.dumps(vars(args), sort_keys=True)


def add_recalibration_args(p: Parser, batches: int, what: str) -> None:
    """The BN recalibration set of ``what`` (the search's candidates, ``--valuate``'s probes)."""
    p.flag("--recal-batches", type=positive_int, default=batches, help=f"training batches for BN recalibration of {what}")
    p.flag("--recal-batch-size", type=positive_int, default=None,
           help="images per recalibration batch (default --batch-size); MetaPruning's search: 100 batches of 1000")


def add_training_args(p: Parser) -> None:
    """Optimization flags of the training scripts."""
    p.flag("--lr", type=float, default=0.1, help="peak learning rate")
    p.flag("--momentum", type=float, default=0.9)
    p.flag("--nesterov", action="store_true")
    p.flag("--weight-decay", "--wd", type=float, default=1e-4, help="on weights only, not BN or biases")
    p.flag("--label-smoothing", type=float, default=0.1)
    p.flag("--lr-scheduler", default="linear", choices=("linear", "cosine", "step"),
           help="after warmup: per-step decay to zero (linear: MetaPruning's retraining; cosine), or step: the "
                "learning rate times --lr-gamma at each of --lr-milestones (MetaPruning's ResNet50 recipes)")
    p.flag("--lr-milestones", type=int, nargs="+", default=None, help="epochs at which --lr-scheduler step decays")
    p.flag("--lr-gamma", type=float, default=0.1, help="factor of each --lr-scheduler step decay")
    p.flag("--warmup-epochs", type=int, default=0)
    p.flag("--lighting", type=float, default=0.0,
           help="AlexNet-style PCA lighting noise on training images, its standard deviation (ImageNet; "
                "MetaPruning's ResNet50 retraining uses 0.1; 0 = off)")
    p.flag("--depthwise-decay", action=argparse.BooleanOptionalAction, default=True,
           help="weight decay on depthwise convs too (--no-depthwise-decay: only on full and 1x1 convs and the "
                "classifier, MetaPruning's MobileNetV2 retraining)")
    p.flag("--dropout", type=float, default=None,
           help="dropout before the classifier while training (default: the family's, 0.2 MobileNetV2, 0 ResNet50)")
    p.flag("--valuate", action=argparse.BooleanOptionalAction, default=False,
           help="validate after every epoch (else only after the last)")
    p.flag("--resume", default=None, help="continue training from this _checkpoint.pth.tar")
    p.flag("--steps-per-epoch", type=int, default=0, help="cap on training steps per epoch (0 = the whole set)")
    p.flag("--save-every-steps", type=int, default=0, help="also checkpoint every N steps inside an epoch (0 = off)")
    p.flag("--amp", default=None, choices=("bf16", "fp16"), help="mixed precision (fp16 adds a GradScaler)")
    p.flag("--channels-last", action="store_true", help="NHWC memory format (faster convs on recent GPUs)")
    p.flag("--sync-bn", action="store_true", help="synchronize BatchNorm statistics across GPUs under torchrun")
    p.flag("--deterministic", action="store_true", help="deterministic kernels (bit-exact resume; slower on GPU)")
    p.flag("--dense-generator-update", action="store_true",
           help="PruningNet: give the generators full-size gradients and update every element each step (the "
                "old path; by default only the gene's crop is computed, reduced and stepped, the same SGD exactly)")
