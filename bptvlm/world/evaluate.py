"""White-box evaluation of a CLIP directory on the task suite: zero-shot and linear probe.

    python -m bptvlm.world.evaluate server/embedded --json server/embedded/model_card.json

Zero-shot: the task template filled with each class name, cosine similarity, argmax, on the fixed
test split. Linear probe: multinomial logistic regression (L-BFGS) on L2-normalised projected image
features of `probe_shots` training images per class, scored on the same test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, PreTrainedTokenizerBase

from bptvlm.world.tasks import list_tasks, load_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Normalisation:
    """Pixel normalisation used in training (and written into the CLIPImageProcessor)."""

    mean: tuple[float, float, float] = (0.42, 0.42, 0.42)
    std: tuple[float, float, float] = (0.26, 0.26, 0.26)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> float32 pixel_values [N, 3, H, W]."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


@torch.no_grad()
def image_features(model: CLIPModel, images: np.ndarray, norm: Normalisation, batch: int = 512) -> torch.Tensor:
    """L2-normalised projected image features [N, proj]."""
    feats = [model.get_image_features(pixel_values=norm(images[i:i + batch])).pooler_output
             for i in range(0, len(images), batch)]
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


@torch.no_grad()
def text_features(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """L2-normalised projected text features [T, proj] of `[BOS] text [EOS]`."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output
    return torch.nn.functional.normalize(out, dim=-1)


def zero_shot(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, task: str, norm: Normalisation,
              n_test: int = 50) -> float:
    data = load_task(task, shots=1, n_val=0, n_test=n_test)
    txt = text_features(model, tokenizer, [data.template.format(c) for c in data.class_names])
    pred = (image_features(model, data.test_images, norm) @ txt.T).argmax(-1).numpy()
    return float((pred == data.test_labels).mean())


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, weight_decay: float, max_iter: int,
                     seed: int = 0) -> torch.nn.Linear:
    """Logistic regression on frozen, L2-normalised features ``x [N, E]`` (scaled by 10), labels ``y [N]``:
    L-BFGS with strong-Wolfe line search and an L2 penalty ``weight_decay * ||W||^2``. The one probe of
    the project (world evaluation and the bench's white-box baseline)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x * 10), y) + weight_decay * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def linear_probe(model: CLIPModel, task: str, norm: Normalisation, probe_shots: int = 64,
                 n_test: int = 50, weight_decay: float = 1e-3) -> float:
    data = load_task(task, shots=probe_shots, n_val=0, n_test=n_test)
    xtr, xte = image_features(model, data.train_images, norm), image_features(model, data.test_images, norm)
    lin = fit_linear_probe(xtr, torch.from_numpy(data.train_labels), len(data.class_names), weight_decay=weight_decay,
                           max_iter=500)
    with torch.no_grad():
        pred = lin(xte * 10).argmax(-1).numpy()
    return float((pred == data.test_labels).mean())


def evaluate(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, norm: Normalisation,
             tasks: list[str] | None = None, probe: bool = True) -> dict[str, dict[str, float]]:
    """{task: {"zero_shot": acc, "linear_probe": acc, "chance": 1/C}} on each task's test split."""
    model.eval()
    results = {}
    for task in tasks or [t.name for t in list_tasks()]:
        row = {"zero_shot": zero_shot(model, tokenizer, task, norm),
               "chance": 1.0 / len(load_task(task, shots=1, n_val=0, n_test=1).class_names)}
        if probe:
            row["linear_probe"] = linear_probe(model, task, norm)
        log.info("%s: %s", task, row)
        results[task] = row
    return results


def load_dir(model_dir: Path) -> tuple[CLIPModel, PreTrainedTokenizerBase, Normalisation]:
    """Load a saved CLIP directory the way the server does."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    model = CLIPModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    norm = Normalisation(tuple(proc.image_mean), tuple(proc.image_std))  # type: ignore[arg-type]
    return model, tokenizer, norm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--json", type=Path, help="merge the results into this JSON file under 'tasks'")
    parser.add_argument("--tasks", nargs="*")
    parser.add_argument("--card", action="store_true",
                        help="also write MODEL_CARD.md in model_dir from recipe.json and the results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    model, tokenizer, norm = load_dir(args.model_dir)
    results = evaluate(model, tokenizer, norm, args.tasks)
    print(f"{'task':16s} {'chance':>7s} {'zero-shot':>9s} {'probe':>7s}")
    for name, row in results.items():
        print(f"{name:16s} {row['chance']:7.3f} {row['zero_shot']:9.3f} {row['linear_probe']:7.3f}")
    if args.json:
        card = json.loads(args.json.read_text()) if args.json.exists() else {}
        card["tasks"] = results
        card["eval_command"] = "python -m bptvlm.world.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
        args.json.write_text(json.dumps(card, indent=2) + "\n")
    if args.card:
        from bptvlm.world.card import write_card

        write_card(args.model_dir, results)


if __name__ == "__main__":
    main()
