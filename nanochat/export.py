"""A Hugging Face transformers folder from a trained GPT:
python -m nanochat.export <run dir or checkpoint> out=<folder> [overwrite=true]

transformers 5 has nanochat's architecture as NanoChatForCausalLM (model_type "nanochat"), so the
folder loads with no code of ours:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported")
    tokenizer = AutoTokenizer.from_pretrained("exported")  # puts <|bos|> first, as in training

It holds config.json, model.safetensors (our fp32 weights under transformers' names),
tokenizer.json + tokenizer_config.json (our BPE as a `tokenizers` BPE model) and
generation_config.json. It is written into a hidden folder next to `out` and renamed into place,
so a failed export leaves nothing; a non-empty `out` is replaced only with overwrite=true, and
only if it holds an earlier export. Only nanochat.model.GPT exports; any other architecture has no
transformers counterpart and is refused.

How the two implementations line up (tests/test_export.py: logits within 1e-4, the same greedy
tokens, the same token ids):

- rotary: both pair channel i with channel i + head_dim/2 and rotate by -angle (transformers'
  rotate_half(x) = (x2, -x1) gives (x1 cos + x2 sin, x2 cos - x1 sin), our apply_rotary), with
  inverse frequencies 10000^(-2i/head_dim); QK-norm comes after the rotation in both.
- RMSNorm without weights on the embedding output, before attention, before the MLP and before
  the head (transformers' model.norm serves first and last); ReLU^2 MLP of 4 x width; attention
  scaled by 1/sqrt(head_dim); no biases; untied head; logits soft-capped at 15.
- GQA: key/value head j serves query heads j*g .. j*g + g - 1 in both (repeat_kv, enable_gqa).
- rms_norm_eps: F.rms_norm's default eps is the machine epsilon of its input's dtype, 2^-23 in
  fp32, written as rms_norm_eps. In fp32 everything matches. What the config cannot say: under
  bf16 autocast our q/k norms run in bf16 with eps 2^-7, and our soft-cap runs in fp32, while
  transformers computes every norm in fp32 with the fixed eps and soft-caps in the head's dtype;
  bf16 runs of the two differ by more than rounding.
- context: max_position_embeddings is sequence_len (the trained length); transformers computes
  rotary angles for any position, ours stop at the rotary table (10 x sequence_len).
- tokenizer: the same ids, by construction: byte-level BPE whose vocabulary is our ranks spelled
  in GPT-2's byte alphabet, whose merges are every split of a token into two tokens ordered by the
  token's rank (tiktoken merges by the rank of the result), with ignore_merges (tiktoken takes a
  pre-token that is a whole token directly) and our split regex. One difference by design: the
  special tokens are transformers "added tokens", so "<|bos|>" written in a text becomes the BOS
  id there, while our encode() keeps text as text (transformers' split_special_tokens=True gives
  ours). <|bos|> is bos, eos and pad token: a document ends where the next one begins.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanochat.atomic import replace_folder
from nanochat.config import run_tool
from nanochat.errors import UserError
from nanochat.finished import load_finished
from nanochat.model import GPT, LOGIT_SOFTCAP, ROTARY_BASE
from nanochat.schema import settings_from
from nanochat.tokenizer import BOS, Tokenizer

# Our parameter names inside a block -> transformers' NanoChatDecoderLayer names.
BLOCK_NAMES = {
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


@dataclass
class ExportSettings:
    """conf/tools/export.yaml's keys."""

    out: str
    overwrite: bool


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for layer in range(model.config.n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            names[f"transformer.h.{layer}.{ours}.weight"] = f"model.layers.{layer}.{theirs}.weight"
    state = model.state_dict()
    unmapped = sorted(set(state) - set(names))
    if unmapped:  # a parameter added to GPT must not be dropped silently: the logits would differ
        raise ValueError(f"GPT parameters without a transformers name: {', '.join(unmapped)}")
    return {names[name]: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in state.items()}


def hf_config(model: GPT, tokenizer: Tokenizer) -> dict:
    """config.json: every NanoChatConfig field, from our shape and constants."""
    c = model.config
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": 4 * c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "max_position_embeddings": c.sequence_len,
        "hidden_act": "relu2",
        "attention_dropout": 0.0,
        "attention_bias": False,
        "rms_norm_eps": torch.finfo(torch.float32).eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(ROTARY_BASE)},
        "final_logit_softcapping": LOGIT_SOFTCAP,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,  # only for weights transformers initialises itself; loading sets them all
        "use_cache": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.bos_id,
        "pad_token_id": tokenizer.bos_id,
        "dtype": "float32",
    }


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE files (transformers' ByteLevel)
    spell tokens in: the printable Latin-1 bytes stand for themselves, the other 68 (control
    characters, space, ...) for the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def hf_tokenizer(tokenizer: Tokenizer) -> dict:
    """tokenizer.json for the `tokenizers` library, giving our ids (see the module docstring)."""
    alphabet = byte_alphabet()

    def spelled(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    ranks = tokenizer.mergeable_ranks
    splits = sorted(
        (rank, cut, token[:cut], token[cut:])
        for token, rank in ranks.items()
        for cut in range(1, len(token))
        if token[:cut] in ranks and token[cut:] in ranks
    )
    bos = {"id": BOS, "type_id": 0}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token_id,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for name, token_id in tokenizer.special_tokens.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        # BOS before each text, as every training document began.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": bos},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [tokenizer.bos_id], "tokens": [BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {spelled(token): rank for token, rank in ranks.items()},
            "merges": [[spelled(left), spelled(right)] for _, _, left, right in splits],
        },
    }


def hf_tokenizer_config(sequence_len: int) -> dict:
    """tokenizer_config.json: the special tokens' roles, for transformers' tokenizer class."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": BOS,
        "pad_token": BOS,
        "model_max_length": sequence_len,
        "padding_side": "left",  # a batch of prompts for generate() must end together
        "clean_up_tokenization_spaces": False,  # it would drop spaces before punctuation that we decode
    }


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; give a folder to export into.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"out={out} is not empty; pass overwrite=true to replace it.")
    try:
        earlier = json.loads((out / "config.json").read_text()).get("model_type") == "nanochat"
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise UserError(
            f"out={out} holds something other than an exported model (no config.json of model_type nanochat), "
            "so it is not replaced even with overwrite=true."
        )


def write_folder(out: Path, files: dict[str, object]) -> None:
    """files: name -> a dict (written as JSON) or a state dict (written as safetensors). Written into
    a hidden folder beside `out`, fsync'd, then renamed into place; an earlier `out` goes only then."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, content in files.items():
            path = staging / name
            if name.endswith(".safetensors"):
                save_file(content, path, metadata={"format": "pt"})
                os.chmod(path, _new_file_mode())  # save_file makes it private (0600), unlike its neighbours
            else:
                path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process umask (read by setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def export(location: str, out: str | Path, overwrite: bool = False) -> Path:
    """Export the newest complete checkpoint at location into the folder out; returns it."""
    out = Path(out).expanduser()
    check_target(out, overwrite)
    finished = load_finished(location)
    if not isinstance(finished.model, GPT):
        raise UserError(
            f"{finished.path} holds a model._target_={finished.config['model']['_target_']}, which has no "
            "Hugging Face transformers counterpart: only nanochat.model.GPT exports (as NanoChatForCausalLM)."
        )
    model, tokenizer = finished.model, finished.tokenizer
    bos = tokenizer.bos_id
    files = {
        "config.json": hf_config(model, tokenizer),
        "generation_config.json": {"bos_token_id": bos, "eos_token_id": bos, "pad_token_id": bos},
        "model.safetensors": hf_state_dict(model),
        "tokenizer.json": hf_tokenizer(tokenizer),
        "tokenizer_config.json": hf_tokenizer_config(model.sequence_len),
    }
    try:
        write_folder(out, files)
    except OSError as error:
        raise UserError(f"cannot write the export into {out} ({error.strerror or error}).") from None
    print(f"exported {finished.path} (step {finished.step}) to {out}: {', '.join(sorted(files))}")
    return out


def main(location: str, config: dict) -> None:
    settings = settings_from(ExportSettings, config)
    export(location, settings.out, settings.overwrite)


if __name__ == "__main__":
    run_tool("export", main)
