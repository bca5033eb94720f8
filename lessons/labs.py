"""The open labs: change one design choice of the Aligner, train it on the embedded model as the
demo does, and measure what the change does to the demo's form compliance.

    python lessons.py lab tanh            # a tanh on the gate (LLaMA-Adapter v1's training code)
    python lessons.py lab layer-gate      # one gate per layer instead of one per head
    python lessons.py lab start-layer     # the Aligner from layer 16 on instead of layer 2

Each lab trains the Aligner as the paper has it and the variant, the same seeds, steps and data
(data/form_train.json, batch 8, lr 9e-3 constant, one token), with train.py's loss and batches in
a loop of its own, then answers held-out instructions greedily and counts answers in form.
Not run on its own but by lessons.py. Read next: lessons/labs.md (the answers measured here).
"""
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))

from aligner import Aligner  # noqa: E402
from data import batch_indices, collate, format_prompt, load_examples  # noqa: E402
from generate import Sampling, generate_batch  # noqa: E402
from make_form_data import follows_form  # noqa: E402
from support.checkpoint import load_model  # noqa: E402
from support.convert import model_dir  # noqa: E402
from support.inputs import read_json  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402
from train import sft_loss  # noqa: E402


class TanhGate(Aligner):
    """LLaMA-Adapter v1's training code: the gate through tanh (its inference code used it raw)."""

    def prefix(self, layer: int):
        p = super().prefix(layer)
        return None if p is None else (p[0], torch.tanh(p[1]))


class LayerGate(Aligner):
    """One gate per layer, shared by its heads (PEFT's AdaptionPrompt): (L - s, 1) expanded to H."""

    def __init__(self, args, *options, **named):
        super().__init__(args, *options, **named)
        self.gates = torch.nn.Parameter(torch.zeros(self.gates.shape[0], 1))  # (L - s, 1)

    def prefix(self, layer: int):
        p = super().prefix(layer)
        return None if p is None else (p[0], p[1].expand(self.n_heads))  # (H,)


LABS = {"tanh": ("a tanh on the gate", lambda args: TanhGate(args, 1)),
        "layer-gate": ("one gate per layer", lambda args: LayerGate(args, 1)),
        "start-layer": ("start layer 16", lambda args: Aligner(args, 1, start_layer=16))}


def train_one(model, tok, make, examples, steps: int, seed: int):
    torch.manual_seed(seed)
    aligner = make(model.args)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=9e-3, weight_decay=0.02, betas=(0.9, 0.95))
    for step in range(steps):
        idx = batch_indices(len(examples), 8, step, seed)
        loss, _ = sft_loss(model, aligner, collate([examples[i] for i in idx], tok.pad_id, "cpu"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return aligner, loss.item()


@torch.no_grad()
def compliance(model, tok, aligner, prompts: list) -> float:
    greedy = Sampling(max_new_tokens=48, temperature=0.0, top_k=0)
    ids = [tok.encode(format_prompt(p)) for p in prompts]
    answers = generate_batch(model, ids, aligner, greedy, tok.eos_id, pad_id=tok.pad_id)
    return sum(follows_form(tok.decode(a)) for a in answers) / len(prompts)


def lab(name: str, steps: int, prompts: int, seeds: int):
    """Train the paper's Aligner and the lab's variant for each seed; print both compliances."""
    what, variant = LABS[name]
    t0 = time.time()
    path = model_dir(None)
    model, tok = load_model(path), Tokenizer(path)
    examples = load_examples(ROOT / "data" / "form_train.json", tok, 256).examples
    held = [r["instruction"] for r in read_json(ROOT / "data" / "form_heldout.json")][:prompts]
    rows = {"the paper's Aligner": [], what: []}
    runs = [(label, make, seed) for seed in range(1, seeds + 1)
            for label, make in (("the paper's Aligner", lambda args: Aligner(args, 1)), (what, variant))]
    for label, make, seed in tqdm(runs, desc=f"lab {name}", dynamic_ncols=True):
        aligner, loss = train_one(model, tok, make, examples, steps, seed)
        rows[label].append((compliance(model, tok, aligner, held), loss))
    print(f"lab {name}: {steps} steps of 8, {len(held)} held-out instructions, seeds 1..{seeds}, "
          f"{time.time() - t0:.0f} s")
    for label, results in rows.items():
        scores = ", ".join(f"{100 * c:.1f}%" for c, _ in results)
        losses = ", ".join(f"{loss:.3f}" for _, loss in results)
        print(f"  {label:<22} in form: {scores}   last training loss: {losses}")
