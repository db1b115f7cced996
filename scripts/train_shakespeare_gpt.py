"""Train ``shakespeare-gpt``, the small causal LM that ships in the repo (the offline default model).

A GPT-2-architecture model and a byte-level BPE tokenizer, both trained here on the built-in
corpus (tiny-shakespeare) with a fixed seed, saved in Hugging Face layout so that it loads through
``TransformerBridge.boot_transformers`` exactly as a hub model does. The corpus' last tenth
(cut at a line start) stays out of training; the held-out cross-entropy is measured on it and
written to ``training.json`` beside the weights.

    python scripts/train_shakespeare_gpt.py            # ~13 minutes on 2 CPU cores
    python scripts/train_shakespeare_gpt.py --steps 50 --out /tmp/gpt   # a quick try
"""

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "cache_server" / "data" / "tiny_shakespeare.txt.gz"
OUT = ROOT / "cache_server" / "data" / "shakespeare-gpt"
EOS = "<|endoftext|>"
HELD_OUT_FRACTION = 0.1


def split_corpus(text: str) -> tuple[str, str]:
    """The training text and the held-out tail, cut at the start of a line."""
    cut = text.index("\n", int(len(text) * (1 - HELD_OUT_FRACTION))) + 1
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int) -> GPT2TokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = text.splitlines(keepends=True)
    tokenizer.train_from_iterator(("".join(lines[i:i + 64]) for i in range(0, len(lines), 64)), trainer)
    # GPT-2's convention: one special token is BOS, EOS and UNK at once.
    return GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                             model_max_length=256)


def encode(tokenizer: GPT2TokenizerFast, text: str) -> torch.Tensor:
    lines = text.splitlines(keepends=True)
    blocks = ["".join(lines[i:i + 64]) for i in range(0, len(lines), 64)]
    ids = [i for enc in tokenizer.backend_tokenizer.encode_batch(blocks, add_special_tokens=False) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def held_out_loss(model: GPT2LMHeadModel, ids: torch.Tensor, context: int) -> float:
    """Mean next-token cross-entropy (nats) over consecutive windows of the held-out tokens."""
    model.eval()
    n = (len(ids) - 1) // context
    windows = ids[: n * context + 1]
    inputs = windows[:-1].view(n, context)
    targets = windows[1:].view(n, context)
    total = 0.0
    for i in range(0, n, 32):
        logits = model(inputs[i:i + 32]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[i:i + 32].flatten(), reduction="sum").item()
    model.train()
    return total / targets.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    train_text, held_text = split_corpus(gzip.decompress(CORPUS.read_bytes()).decode("utf-8"))
    tokenizer = train_tokenizer(train_text, vocab_size=2048)
    train_ids, held_ids = encode(tokenizer, train_text), encode(tokenizer, held_text)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=192, n_layer=4, n_head=6,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to a tenth
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - args.context - 1, (args.batch,), generator=generator)
        batch = torch.stack([train_ids[s:s + args.context + 1] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step}: train loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    held = held_out_loss(model, held_ids, args.context)
    summary = {"held_out_cross_entropy": round(held, 4), "log_vocab": round(math.log(len(tokenizer)), 4),
               "train_tokens": len(train_ids), "held_out_tokens": len(held_ids), "steps": args.steps,
               "batch": args.batch, "context": args.context, "lr": args.lr, "seed": args.seed}
    print(json.dumps(summary, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
