"""Does a chat-template Aligner keep its form across turns? The letter form, turn by turn.

    python experiments/chat_turns.py --adapter single.pt --adapter multi.pt   # 16 conversations of 3 turns

Each conversation asks three held-out instructions of data/form_heldout.json in a row, in the
adapter's chat template (greedy, --new-tokens per answer), each answer added to the history before
the next question, as `chat.py` does; it prints, for each adapter and the base model,
the share of answers in the letter form at turn 1, 2 and 3.
Read next: docs/chat.md (where its figures are recorded).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

from generate import Sampling, answer  # noqa: E402
from make_form_data import follows_form  # noqa: E402
from support.adapter_file import base_dir, load_aligner  # noqa: E402
from support.chat import chat_of  # noqa: E402
from support.checkpoint import load_model  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402


def in_form_by_turn(model, tok, chat, aligner, conversations, new_tokens: int) -> list:
    """The number of answers in form at each turn, over the conversations."""
    greedy = Sampling(max_new_tokens=new_tokens, temperature=0.0)
    counts = [0] * len(conversations[0])
    for questions in conversations:
        history = []
        for turn, q in enumerate(questions):
            history.append({"role": "user", "content": q})
            text = answer(model, tok, chat.prompt_ids(history), aligner, greedy, eos_id=chat.stop_id)
            history.append({"role": "assistant", "content": text})
            counts[turn] += follows_form(text)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", action="append", required=True, help="a chat-template adapter (repeatable)")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=48)
    flags = p.parse_args(argv)
    adapters = [(path, load_aligner(path)) for path in flags.adapter]
    path = base_dir(adapters[0][1], flags.adapter[0])
    model, tok = load_model(path), Tokenizer(path)
    held = [r["instruction"] for r in json.loads((ROOT / "data" / "form_heldout.json").read_text())]
    n = flags.turns
    conversations = [held[i * n: i * n + n] for i in range(min(flags.conversations, len(held) // n))]
    print(f"{len(conversations)} conversations of {n} turns; answers in the letter form at each turn:")
    for name, a in [("base model", None)] + adapters:
        chat = chat_of(a, path, tok)
        with torch.no_grad():
            counts = in_form_by_turn(model, tok, chat, a, conversations, flags.new_tokens)
        print(f"  {Path(name).name:<24} " + "  ".join(f"turn {t + 1}: {c:2d}/{len(conversations)}"
                                                      for t, c in enumerate(counts)))


if __name__ == "__main__":
    main()
