"""Weight-free models for planning: olavlm's own builders, with weights never read.

Inside :func:`meta_loading`, transformers' ``from_pretrained`` (of ``PreTrainedModel`` and of
``AutoModelForCausalLM``) builds the model from its ``config.json`` on the meta device: shapes and
dtypes are exact, no weights are read and no memory is used. The olavlm code that builds a run's
model (``OlaVLM.from_config``) and its teachers (``build_teachers``) then runs unchanged, so the
planned parameter counts are those of the model a training run would build.

Hub ids are resolved through an optional local mirror of config files (``--hub-configs DIR``,
laid out ``DIR/<org>/<name>/config.json`` like the hub); otherwise transformers fetches only the
JSON files (hub cache, or network).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from unittest import mock

import torch

from olavlm.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


class _NoTokenizer:
    """Stands in when the tokenizer files are not available: no rows are added to the embeddings."""

    pad_token_id = None

    def __len__(self) -> int:
        return 0


def resolve_paths(model_cfg: ModelConfig, mirror: str | Path | None) -> ModelConfig:
    """A copy of ``model_cfg`` whose hub ids point into ``mirror`` where it holds that id."""
    cfg = copy.deepcopy(model_cfg)
    if mirror is None:
        return cfg
    root = Path(mirror)
    if not root.is_dir():
        raise ConfigError(f"--hub-configs: {root} is not a folder")

    def local(value: str | None) -> str | None:
        if value and not Path(value).is_dir() and (root / value).is_dir():
            return str(root / value)
        return value

    cfg.llm, cfg.tokenizer, cfg.vision_tower = local(cfg.llm), local(cfg.tokenizer), local(cfg.vision_tower)
    for task in cfg.tasks.values():
        task.teacher_path = local(task.teacher_path)
    return cfg


def _config_of(cls, path: str, subfolder: str | None):
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        return cls.config_class.from_pretrained(path, **kwargs)
    except OSError as e:
        where = f"{path}/{subfolder}" if subfolder else path
        raise ConfigError(f"{where}: no config.json ({type(e).__name__}); pass --hub-configs DIR with a copy of "
                          "the model's config files, or download them") from e


@contextlib.contextmanager
def meta_loading(notes: list[str] | None = None, *, device: str = "meta"):
    """Inside, ``from_pretrained`` builds from config.json on the meta device (see module doc).
    A missing tokenizer is replaced by a stand-in adding no rows; ``notes`` gets a line about it.
    ``device="cpu"`` builds real modules with random weights instead (the real-size tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    from olavlm.model import io

    def pretrained(cls, path, *args, subfolder=None, dtype=None, attn_implementation=None,
                   output_loading_info=False, **kwargs):
        config = _config_of(cls, str(path), subfolder)
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype)
        if output_loading_info:  # nothing is loaded, so nothing is missing
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    def auto_pretrained(cls, path, *args, dtype=None, attn_implementation=None, **kwargs):
        try:
            config = AutoConfig.from_pretrained(str(path))
        except OSError as e:
            raise ConfigError(f"model.llm: {path}: no config.json ({type(e).__name__}); pass --hub-configs DIR "
                              "with a copy of the LLM's config.json") from e
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    real_tokenizer = io.load_tokenizer

    def tokenizer(model_cfg):
        try:
            return real_tokenizer(model_cfg)
        except (OSError, ValueError, TypeError) as e:
            if notes is not None:
                notes.append(f"tokenizer of {model_cfg.tokenizer or model_cfg.llm} not found ({type(e).__name__}): "
                             "embedding rows as in config.json (a pad token added at training time adds one row "
                             "per embedding matrix)")
            return _NoTokenizer()

    with mock.patch.object(PreTrainedModel, "from_pretrained", classmethod(pretrained)), \
            mock.patch.object(AutoModelForCausalLM, "from_pretrained", classmethod(auto_pretrained)), \
            mock.patch.object(io, "load_tokenizer", tokenizer):
        yield


def meta_model(model_cfg: ModelConfig, *, with_predictors: bool, notes: list[str] | None = None):
    """The OlaVLM a run builds from ``model_cfg``, on the meta device (attention backend irrelevant)."""
    from olavlm.model.vlm import OlaVLM

    cfg = copy.deepcopy(model_cfg)
    cfg.attn_implementation = "sdpa"  # flash-attn need not be installed to plan
    with meta_loading(notes):
        return OlaVLM.from_config(cfg, with_predictors=with_predictors)


def meta_teachers(model_cfg: ModelConfig, grid: int, dtype: torch.dtype, expected=None):
    """The run's TeacherSet (teachers of tasks with predictor layers) on the meta device."""
    from olavlm.teachers import build_teachers

    with meta_loading():
        return build_teachers(model_cfg, grid=grid, dtype=dtype, expected=expected)
