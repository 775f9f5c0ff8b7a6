"""The recipe for the embedded CLIP: contrastive pretraining on procedurally captioned images.

    python -m bptvlm.world.pretrain --minutes 20 --out server/embedded --seed 0

`--minutes` is converted to a step count with a fixed nominal throughput (`NOMINAL_PAIRS_PER_S`),
never by reading the clock, so one command gives the same weights on any machine.
Writes `save_pretrained` of the CLIPModel, the tokenizer and a CLIPImageProcessor, plus
`recipe.json` (config, seed, steps, wall time, git commit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from bptvlm.world.corpus import CorpusConfig, PairSampler, train_tokenizer
from bptvlm.world.evaluate import Normalisation, evaluate
from bptvlm.world.render import IMAGE_SIZE

log = logging.getLogger(__name__)

NOMINAL_PAIRS_PER_S = 700.0  # measured on 2 CPU cores with the default ModelConfig


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the small CLIP (1.3M parameters with the defaults)."""

    patch_size: int = 8  # 16 patches; patch 4 (64 patches) costs ~3x in training and ~5x in tuning
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 128
    context_length: int = 32  # 16 prompt vectors + longest class name + BOS/EOS fit


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the contrastive loss."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    clip_norm: float = 1.0
    eval_every: int = 0  # 0: only at the end
    stop_after: int = 0  # >0: stop after this many steps of the `steps`-long schedule (a snapshot)
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPModel:
    """A randomly initialised CLIPModel whose text config carries the tokenizer's special ids."""
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
                max_position_embeddings=cfg.context_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=IMAGE_SIZE, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                  intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.heads)
    if tokenizer.eos_token_id == 2:
        raise ValueError("eos_token_id 2 triggers transformers' legacy argmax pooling; use another id")
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def image_processor(norm: Normalisation) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              image_mean=list(norm.mean), image_std=list(norm.std))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                     caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where pairs with identical captions count as positives.

    img, txt: normalised [B, D]; caption_ids: int [B] (equal ids = equal caption strings).
    """
    logits = scale * img @ txt.T  # [B, B]
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                  + torch.sum(-target * logits.T.log_softmax(1), 1).mean())


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))


def pretrain(cfg: TrainConfig, seed: int, *, progress: bool = True, eval_tasks: list[str] | None = None,
             on_checkpoint: Callable[[int, CLIPModel, PreTrainedTokenizerFast, Normalisation], None] | None = None,
             checkpoint_every: int = 200) -> tuple[CLIPModel, PreTrainedTokenizerFast, Normalisation]:
    """Train a CLIP from scratch; deterministic for a given (cfg, seed, thread count) on a given machine.

    `on_checkpoint(steps_done, ...)` is called every `checkpoint_every` steps (weights after that many steps).
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    tokenizer = train_tokenizer(seed)
    model = build_model(cfg.model, tokenizer)
    norm = Normalisation()
    sampler = PairSampler(seed, cfg.corpus)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="pretrain", mininterval=5)
    for step in bar:
        if cfg.stop_after and step >= cfg.stop_after:
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        images, captions = sampler.batch(cfg.batch_size)
        enc = tokenizer(captions, padding=True, return_tensors="pt")
        _, caption_ids = np.unique(np.asarray(captions), return_inverse=True)
        img = model.get_image_features(pixel_values=norm(images)).pooler_output
        txt = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
        loss = contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100), torch.from_numpy(caption_ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            res = evaluate(model, tokenizer, norm, eval_tasks, probe=False)
            log.info("step %d loss %.3f zero-shot %s", step + 1, loss.item(),
                     {k: round(v["zero_shot"], 3) for k, v in res.items()})
            model.train()
        if on_checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            on_checkpoint(step + 1, model, tokenizer, norm)
            model.train()
    model.eval()
    return model, tokenizer, norm


def save(out_dir: Path, model: CLIPModel, tokenizer: PreTrainedTokenizerFast, norm: Normalisation,
         recipe: dict) -> None:
    """save_pretrained of model, tokenizer and image processor, plus recipe.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor(norm).save_pretrained(out_dir)
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def steps_for_minutes(minutes: float, batch_size: int) -> int:
    return max(1, int(minutes * 60 * NOMINAL_PAIRS_PER_S / batch_size))


def build(out: Path, *, minutes: float, seed: int = 0, progress: bool = True, eval_every: int = 0,
          stop_after: int = 0, threads: int = 2) -> dict:
    """The `model build` command: train for a nominal `minutes`, save to `out`, return the recipe.

    Every 200 steps a snapshot goes to `out/snapshot` (its recipe names the `--stop-after` that
    reproduces it), so a run cut short on a busy machine still leaves a usable model.
    """
    cfg = TrainConfig(steps=steps_for_minutes(minutes, TrainConfig.batch_size), eval_every=eval_every,
                      stop_after=stop_after)
    torch.set_num_threads(threads)
    commit = git_commit()  # the recipe that runs, not whatever HEAD is when training ends
    t0 = time.time()
    command = f"python -m bptvlm.world.pretrain --minutes {minutes:g} --out {out} --seed {seed} --threads {threads}"
    command += f" --eval-every {eval_every}" if eval_every else ""

    def recipe_at(steps_done: int, model: CLIPModel) -> dict:
        cmd = command + (f" --stop-after {steps_done}" if steps_done < cfg.steps else "")
        return {"command": cmd, "seed": seed, "git_commit": commit, "wall_time_s": round(time.time() - t0, 1),
                "train_config": dataclasses.asdict(dataclasses.replace(cfg, stop_after=steps_done)),
                "torch": torch.__version__, "threads": threads,
                "parameters": sum(p.numel() for p in model.parameters())}

    def snapshot(steps_done: int, model: CLIPModel, tokenizer: PreTrainedTokenizerFast, norm: Normalisation) -> None:
        save(out / "snapshot", model, tokenizer, norm, recipe_at(steps_done, model))

    model, tokenizer, norm = pretrain(cfg, seed, progress=progress, on_checkpoint=snapshot,
                                      eval_tasks=["shape", "colour_clutter", "count", "background", "digit"])
    recipe = recipe_at(min(cfg.stop_after or cfg.steps, cfg.steps), model)
    save(out, model, tokenizer, norm, recipe)
    log.info("saved to %s after %.0f s", out, recipe["wall_time_s"])
    return recipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, required=True, help="nominal training time (fixes the steps)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="log zero-shot every N steps")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="save after this many steps of the schedule (weights identical to the full run's at that step)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    build(args.out, minutes=args.minutes, seed=args.seed, eval_every=args.eval_every, stop_after=args.stop_after,
          threads=args.threads)


if __name__ == "__main__":
    main()
