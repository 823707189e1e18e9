"""The shared recipe runner: config -> CLI, seeding, devices, the meta-training loop,
checkpoints, metrics, progress bars, plots. Recipes define tasks, model, config and
their study; everything else lives here, once.
"""

from recipes.common.checkpoint import load_checkpoint, save_checkpoint
from recipes.common.config import RunConfig, TrainConfig, option, parse_config
from recipes.common.methods import DIRECTIONS, Method, parse_method
from recipes.common.metrics import MetricsLog, read_jsonl, write_csv, write_json
from recipes.common.runner import MetaProblem, RunResult, train

__all__ = [
    "DIRECTIONS",
    "MetaProblem",
    "Method",
    "MetricsLog",
    "RunConfig",
    "RunResult",
    "TrainConfig",
    "load_checkpoint",
    "option",
    "parse_config",
    "parse_method",
    "read_jsonl",
    "save_checkpoint",
    "train",
    "write_csv",
    "write_json",
]
