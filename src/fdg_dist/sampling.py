"""``fdg-sample RUN_DIR`` and ``fdg_dist.sample(...)``: text from a language-model run, as nanoGPT's ``sample.py``
draws it (temperature, top-k, one token at a time over the last ``context`` tokens), from the final model or
from any checkpoint of the run (any K: the modules' weights joined into the unsplit model).

Deterministic for a seed: every draw comes from one ``torch.Generator`` on the sampling device, seeded by
``seed``, so two calls with the same arguments on the same device give the same text.
Must not train, write or change the run directory: it only reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fdg_dist import inference, models
from fdg_dist.config import ModelConfig
from fdg_dist.run import checkpoint, final_model
from fdg_dist.run.checkpoint import CheckpointError


def load(run_dir: str | Path, checkpoint_path: str | Path | None = None, device: str | torch.device = "cpu", *,
         trust_code: bool = False) -> tuple[nn.Module, inference.Tokenizer]:
    """A run's language model (eval mode, on ``device``) and its tokenizer: the final model, or with
    ``checkpoint_path`` a checkpoint: a name under the run's ``checkpoints/`` (``epoch0001``), ``checkpoints`` for
    the newest, or a checkpoint directory anywhere."""
    run_dir = Path(run_dir)
    if checkpoint_path is None:
        model, tokenizer = inference.load_model(run_dir, device, trust_code=trust_code)
        if not isinstance(tokenizer, inference.Tokenizer):
            raise ValueError(f"{run_dir} holds an image model; fdg-sample draws text from a data=text run")
        return model, tokenizer
    given = Path(checkpoint_path)
    path = next((p for p in (run_dir / "checkpoints" / given, run_dir / given) if p.exists()), given)
    directory = checkpoint.locate(path, "checkpoints", None, label=f"checkpoint {checkpoint_path}")
    record = run_dir / final_model.TOKENIZER
    if not record.is_file():
        raise FileNotFoundError(f"{record} not found: a data=text run writes it at its start; pass the run "
                                "directory that holds the checkpoint")
    saved = checkpoint.read_weights(directory)
    fp = saved["config"]
    spec = ModelConfig.from_dict({key.removeprefix("model."): value for key, value in fp.items()
                                  if key.startswith("model.")})
    if spec.name == "custom" and not trust_code:
        raise ValueError(f"{directory}: this model is built by calling {spec._target_!r}; pass trust_code=True "
                         "(--trust-code) only for a run directory you trust")
    built = models.build_model(spec, fp["data.num_classes"])
    built.whole.load_state_dict(built.model_state(saved["model"]))
    return built.whole.to(device).eval(), inference.tokenizer_from(json.loads(record.read_text()))


@torch.no_grad()
def generate(model: nn.Module, tokenizer: inference.Tokenizer, prompt: str, tokens: int, *,
             temperature: float = 0.8, top_k: int | None = 200, seed: int = 1337) -> torch.Tensor:
    """``tokens`` ids drawn after ``prompt``: each from the softmax of the last position's logits divided by
    ``temperature`` (0: the arg-max), restricted to the ``top_k`` likeliest (None: all); returns (1, len) ids,
    the prompt's included."""
    if temperature < 0 or (top_k is not None and top_k < 1) or tokens < 0:
        raise ValueError(f"temperature={temperature} must be ≥ 0, top_k={top_k} ≥ 1 or None, tokens={tokens} ≥ 0")
    device = next(model.parameters()).device
    ids = tokenizer(prompt).to(device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one character (nanoGPT starts from a newline)")
    generator = torch.Generator(device).manual_seed(seed)
    for _ in range(tokens):
        logits = model(ids[:, -tokenizer.context:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@torch.no_grad()
def nats_per_token(model: nn.Module, ids: torch.Tensor, context: int) -> float:
    """Mean negative log-likelihood (nats) of ``ids[0, 1:]`` under ``model``, each token predicted from the up to
    ``context`` tokens before it (a sliding window): how likely the model finds a text."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    total, count = 0.0, 0
    for end in range(1, ids.shape[1]):
        window = ids[:, max(0, end - context):end]
        logp = F.log_softmax(model(window)[:, -1, :].float(), dim=-1)
        total -= float(logp[0, ids[0, end]])
        count += 1
    return total / max(count, 1)


def sample(run_dir: str | Path, prompt: str = "\n", tokens: int = 500, *, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 1337, checkpoint: str | Path | None = None,
           device: str | torch.device = "cpu", trust_code: bool = False) -> str:
    """Text drawn from a run's language model after ``prompt`` (returned with it): ``fdg_dist.sample(run_dir)``.

    ``checkpoint``: a checkpoint instead of the final model (see ``load``); the same ``seed`` on the same device
    gives the same text."""
    model, tokenizer = load(run_dir, checkpoint, device, trust_code=trust_code)
    return tokenizer.decode(generate(model, tokenizer, prompt, tokens, temperature=temperature, top_k=top_k,
                                     seed=seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fdg-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run directory of a data=text run")
    parser.add_argument("--checkpoint", help="sample a checkpoint instead of the final model: its directory, a name "
                                             "under RUN_DIR/checkpoints (epoch0001), or 'checkpoints' for the newest")
    parser.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    parser.add_argument("--tokens", type=int, default=500, help="how many tokens to draw (default 500)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = arg-max (default 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="draw among the k likeliest tokens; 0 = all (default 200)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed: the same seed gives the same text")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--trust-code", action="store_true", help="allow a model=custom run's builder to be imported")
    args = parser.parse_args(argv)
    try:
        text = sample(args.run_dir, args.prompt, args.tokens, temperature=args.temperature,
                      top_k=args.top_k or None, seed=args.seed, checkpoint=args.checkpoint, device=args.device,
                      trust_code=args.trust_code)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        print(f"fdg-sample: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)
