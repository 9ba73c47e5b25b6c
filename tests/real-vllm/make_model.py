"""Writes the small random-weight Llama model the real-vLLM tier serves (no download).

Usage: make_model.py OUT_DIR [--hidden 512 --layers 8 --vocab 5000]

The model is a transformers `LlamaConfig` with random weights and a word-level tokenizer
(`tokenizers`) wrapped in `PreTrainedTokenizerFast` with a chat template, so that vLLM's
OpenAI server serves `/v1/completions` and `/v1/chat/completions` exactly as it would a real
model. The weights are seeded: the same arguments give the same model. The sizes are chosen so
that decode runs at tens of milliseconds per token on two cores (hidden 512, 8 layers: ~30 ms),
long enough for a client to leave mid-stream and for the kernel to see one write per token.
"""

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--max-positions", type=int, default=4096)
    args = parser.parse_args()

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(args.out, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    # Plain words "w0".."wN" plus the words the tests and the chat template use.
    common = (
        "user assistant system : hello tell me a story about the sea and the sky "
        "please write more words turn conversation tenant noisy long prompt"
    ).split()
    words = specials + common + [f"w{i}" for i in range(args.vocab - len(specials) - len(common))]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    fast.save_pretrained(args.out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.max_positions,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "inferwatch-model.json"), "w") as f:
        json.dump(vars(args) | {"vocab_size": len(vocab)}, f)
    print(f"model written to {args.out}: hidden {args.hidden}, {args.layers} layers, vocab {len(vocab)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
