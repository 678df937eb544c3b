"""Text from a trained model: python -m nanochat.generate <run dir or checkpoint> [key=value ...]

    python -m nanochat.generate outputs/my_run prompt="The king hath"
    python -m nanochat.generate outputs/my_run prompt="[ROMEO.,JULIET.]" temperature=0 max_tokens=64
    python -m nanochat.generate outputs/my_run/checkpoints/step_000400 prompts_file=prompts.txt seed=1

The keys and their defaults are in conf/tools/generate.yaml; they are overridden as in train.py
(a value with commas, most punctuation or non-ASCII letters needs quotes: prompt="'Hello, world!'",
or put it in a prompts_file). The model and tokenizer come from the newest complete checkpoint at
the path (nanochat.finished).

- Each prompt starts with BOS, as every training document did. A sample ends after max_tokens
  tokens, where the model starts a new document (emits BOS, not printed), or where the sequence
  fills the model's context (GPT: its rotary table, 10 x sequence_len tokens, prompt included);
  a prompt that leaves no room in the context is refused.
- One prompt is printed token by token as it is sampled; several are generated batch_size at a
  time and each batch is printed when it is done, every sample under a `--- i/n ---` line.
- Prompt i samples with seed + i, so a prompt's text does not depend on the batch it is in; with
  no seed, a random one is drawn and printed so that the samples can be repeated.
- stdout carries only the prompts and their continuations; what was loaded goes to stderr.
"""

import codecs
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nanochat.config import run_tool
from nanochat.device import autocast, check_available, resolve_device, resolve_dtype
from nanochat.errors import InvalidArgument, UserError
from nanochat.finished import load_finished
from nanochat.interface import generate_batch, generate_stream
from nanochat.schema import settings_from


@dataclass
class GenerateSettings:
    """conf/tools/generate.yaml's keys (the defaults are there)."""

    prompt: str | list[str] | None
    prompts_file: str | None
    max_tokens: int
    temperature: float
    top_k: int | None
    seed: int | None
    batch_size: int
    device: Literal["auto", "cpu", "cuda", "mps"]
    dtype: Literal["auto", "float32", "bfloat16"]

    def __post_init__(self):
        if self.prompt is None and self.prompts_file is None:
            raise InvalidArgument("nothing to continue: give prompt=<text> or prompts_file=<file, a prompt per line>.")
        if self.prompt is not None and self.prompts_file is not None:
            raise InvalidArgument(
                "{prompt} and {prompts_file} are both set; give one of them.",
                prompt=self.prompt,
                prompts_file=self.prompts_file,
            )
        if self.prompt == []:
            raise InvalidArgument("{prompt} holds no prompt; an empty string is one (BOS alone).", prompt=self.prompt)
        for name in ("max_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{{{name}}} must be positive.", **{name: getattr(self, name)})
        if self.temperature < 0:
            raise InvalidArgument("{temperature} must be >= 0 (0 is greedy).", temperature=self.temperature)
        if self.top_k is not None and self.top_k < 1:
            raise InvalidArgument("{top_k} must be positive, or null for no cut.", top_k=self.top_k)


def read_prompts(settings: GenerateSettings) -> list[str]:
    if settings.prompt is not None:
        return [settings.prompt] if isinstance(settings.prompt, str) else list(settings.prompt)
    path = Path(settings.prompts_file).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"prompts_file={settings.prompts_file} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"prompts_file={settings.prompts_file} cannot be read as UTF-8 text ({error}).") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompts_file={settings.prompts_file} holds no prompt (every line is blank).")
    return prompts


def main(location: str, config: dict) -> None:
    settings = settings_from(GenerateSettings, config)
    prompts = read_prompts(settings)
    check_available(settings.device, "device")
    device = resolve_device(settings.device)
    dtype, _ = resolve_dtype(settings.dtype, device)  # auto: bf16 on CUDA, fp32 elsewhere (nothing measured)
    finished = load_finished(location, device)
    model, tokenizer = finished.model, finished.tokenizer
    bos = tokenizer.bos_id
    encoded = [[bos] + tokenizer.encode(prompt) for prompt in prompts]
    # A model without a context limit (one whose generate() crops its context) takes any prompt.
    context = getattr(model, "context_len", None)
    if context is not None:
        for index, tokens in enumerate(encoded):
            if len(tokens) >= context:
                raise UserError(
                    f"prompt {index + 1} is {len(tokens)} tokens with its BOS, which leaves no room in the model's "
                    f"context of {context} tokens."
                )
        cut = [i + 1 for i, tokens in enumerate(encoded) if len(tokens) + settings.max_tokens > context]
        if cut:
            prompts_named = "prompt " + ", ".join(map(str, cut[:5])) + (", ..." if len(cut) > 5 else "")
            print(
                f"note: {prompts_named} will stop short of max_tokens={settings.max_tokens} where the context "
                f"of {context} tokens is full.",
                file=sys.stderr,
            )
    seed = settings.seed
    if seed is None and settings.temperature > 0:
        seed = secrets.randbelow(2**31)
        print(f"seed={seed} (pass seed={seed} to sample the same text again)", file=sys.stderr)
    print(
        f"{finished.path} (step {finished.step}): {model.num_params():,} parameters on {device}, "
        f"{str(dtype).removeprefix('torch.')}",
        file=sys.stderr,
    )
    sampling = dict(max_tokens=settings.max_tokens, temperature=settings.temperature, top_k=settings.top_k)
    with autocast(device, dtype):
        if len(prompts) == 1:
            stream_one(model, tokenizer, prompts[0], encoded[0], seed, **sampling)
            return
        for start in range(0, len(prompts), settings.batch_size):
            batch = encoded[start : start + settings.batch_size]
            batch_seed = None if seed is None else seed + start
            outputs = generate_batch(model, batch, seed=batch_seed, stop_token=bos, **sampling)
            for index, out in enumerate(outputs, start=start):
                text = tokenizer.decode(out[:-1] if out[-1:] == [bos] else out)
                sys.stdout.write(f"--- {index + 1}/{len(prompts)} ---\n{prompts[index]}{text}\n")
            sys.stdout.flush()


def stream_one(model, tokenizer, prompt: str, tokens: list[int], seed: int | None, **sampling) -> None:
    """Print the prompt, then each token's text as soon as it is sampled. A token may end in the
    middle of a multi-byte character, so bytes go through an incremental UTF-8 decoder."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for step in generate_stream(model, [tokens], seed=seed, stop_token=tokenizer.bos_id, **sampling):
        token = step[0]
        if token == tokenizer.bos_id:
            break
        sys.stdout.write(decoder.decode(tokenizer.decode_bytes([token])))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    run_tool("generate", main)
