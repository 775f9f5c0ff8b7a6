"""Where a text-prompt search starts: zero-shot accuracy of the hand-written template against the
prompted path at z = 0 (the template prefix's token embeddings as the context, zero-padded).

    python scripts/context_start.py [--model embedded] [--lengths 8,12]

With exactly the prefix's token count the two agree; every extra context vector starts as a zero
embedding, which is not a neutral token. In-process on the served model (white-box), test splits.
"""

from __future__ import annotations

import argparse

import torch

from bptvlm.client.config import Template
from bptvlm.server.loading import load_model
from bptvlm.server.model import PromptedCLIP
from bptvlm.world.tasks import list_tasks, load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--lengths", default="8,12", help="context lengths to compare with the prefix's own")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clip = PromptedCLIP(load_model(args.model))
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"{'task':16s} {'template':>8s} {'z=0, k':>8s} " + " ".join(f"{f'z=0, {n}':>8s}" for n in lengths))
    for task in [t.name for t in list_tasks(suite_only=True)]:
        data = load_task(task, shots=1, n_val=0, n_test=50)
        images = clip.encode_images(clip.preprocess(data.test_images))  # [1, N, E]
        template = Template(data.template)

        def accuracy(context: torch.Tensor | None, texts: list[str]) -> float:
            logits = clip.logits(images, clip.encode_text(clip.tokenize(texts), context))[0]
            return float((logits.argmax(-1).numpy() == data.test_labels).mean())

        k = clip.count_tokens([template.prefix])[0]
        row = [accuracy(None, [template.full(c) for c in data.class_names])]
        for n in [k, *lengths]:
            context = clip.context_init(template.prefix, max(n, k))[None]  # the prefix's embeddings, zero-padded
            row.append(accuracy(context, [template.class_text(c) for c in data.class_names]))
        print(f"{task:16s} " + " ".join(f"{v:8.3f}" for v in row) + f"   (k = {k})")


if __name__ == "__main__":
    main()
