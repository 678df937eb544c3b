"""A finished run's model and tokenizer, for the tools that use a checkpoint outside training
(python -m nanochat.evaluate / generate / export).

    load_finished("outputs/my_run")                             # its newest complete checkpoint
    load_finished("outputs/my_run/checkpoints/step_000400")     # that one

The model is rebuilt from the checkpoint's own config node (its `_target_` and shape), so any
architecture that trained loads the same way, and its weights come from model.pt. The tokenizer
is the checkpoint's tokenizer.json; a checkpoint written before checkpoints carried one falls back
to the tokenizer file its config names, which must have the fingerprint the checkpoint recorded.
Everything read is weights (torch.load with weights_only) or JSON: a checkpoint from someone
else's disk cannot run code.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nanochat.checkpoint import TOKENIZER_FILE, checkpoints_at, load_newest_readable
from nanochat.config import build
from nanochat.errors import UserError
from nanochat.interface import LanguageModel
from nanochat.tokenizer import Tokenizer, tokenizer_path


@dataclass
class Finished:
    model: LanguageModel  # in eval mode, on the requested device
    tokenizer: Tokenizer
    config: dict  # the resolved config the checkpoint was trained with
    path: Path  # the checkpoint folder
    step: int  # updates the weights have seen


def _tokenizer(path: Path, meta: dict) -> Tokenizer:
    if (path / TOKENIZER_FILE).is_file():
        return Tokenizer.load(path / TOKENIZER_FILE)
    settings = meta["config"]["tokenizer"]
    fallback = tokenizer_path(Path(settings["directory"]).expanduser(), settings["vocab_size"])
    if not fallback.is_file():
        raise UserError(f"checkpoint {path} has no {TOKENIZER_FILE}, and its tokenizer {fallback} is not on this disk.")
    tokenizer = Tokenizer.load(fallback)
    if tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise UserError(
            f"checkpoint {path} was trained with tokenizer {meta['tokenizer']['fingerprint']}, but {fallback} is "
            f"tokenizer {tokenizer.fingerprint()}."
        )
    return tokenizer


def load_finished(location: str | Path, device: str | torch.device = "cpu") -> Finished:
    """The newest readable complete checkpoint at location (a checkpoint folder, or a run dir or
    checkpoints dir holding some); UserError in one sentence if there is none."""
    checkpoint = load_newest_readable(checkpoints_at(location, str(location)), names=("model",))
    config = checkpoint.meta["config"]
    with torch.device("meta"):
        model = build("model", OmegaConf.create(config["model"]))
    model.to_empty(device=device)
    model.init_weights()  # buffers derived from the shape (e.g. rotary tables); weights come next
    model.load_state_dict(checkpoint.payload["model"])
    model.eval()
    return Finished(model, _tokenizer(checkpoint.path, checkpoint.meta), config, checkpoint.path, checkpoint.step)
