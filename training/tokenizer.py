"""Stage 2: the text tokenizer (byte-level BPE + Emu3 special tokens + one token per VQ code).

    python3 training/tokenizer.py --run RUN [--codebook-size 4096] [--bpe-vocab 1536]

Reads the captions and edit instructions that data.py wrote under RUN/data, trains a small
byte-level BPE with the `tokenizers` library and writes RUN/tokenizer/{tokenizer.json,
tokenizer_config.json}. The layout of the vocabulary is

    [0, n_bpe)                  byte-level BPE tokens (all 256 bytes + merges)
    n_bpe + 0..8                the Emu3 special tokens, in SPECIALS order
    ...                         `<|extra_N|>` fillers so that the total is a multiple of 64
    [V - K, V)                  `<|visual token 000000|>` .. `<|visual token K-1|>`

The pre-tokenizer isolates every digit and every uppercase letter, so the meta text "16*16" is
spelled digit by digit and sign words ("CAT", "X7Q") letter by letter: the model can then draw
any word from its letters.
"""

import argparse
import json
import os
import sys
import time

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# ----------------------------------------------------------------------------- defaults
CODEBOOK_SIZE = 4096   # K: must equal the VQ's codebook_size (vq.py)
BPE_VOCAB = 1536       # upper bound on the BPE part (the world's vocabulary is small)
MODEL_MAX_LENGTH = 1024
MULTIPLE_OF = 64       # total vocabulary rounded up with fillers (tensor-core friendly lm_head)

# The Emu3 special tokens (emu3-port-spec §3.1), in the order they get ids after the BPE tokens.
SPECIALS = {
    "pad": "<|endoftext|>",
    "bos": "<|extra_203|>",
    "eos": "<|extra_204|>",
    "image": "<image>",
    "eol": "<|extra_200|>",
    "eof": "<|extra_201|>",
    "sot": "<|image token|>",   # IMG: starts the visual block, after the meta text
    "sov": "<|image start|>",   # BOI: starts the image (meta text follows)
    "eov": "<|image end|>",     # EOI: ends the image
}
# <|extra_N|> numbers that are real Emu3 tokens above; fillers use the others.
_RESERVED_EXTRA = {0, 200, 201, 203, 204}


def visual_token(k):
    return f"<|visual token {k:06d}|>"


def special_ids(tok):
    """{'pad': id, 'bos': id, ...} for a loaded `tokenizers.Tokenizer`."""
    ids = {name: tok.token_to_id(s) for name, s in SPECIALS.items()}
    missing = [SPECIALS[n] for n, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    return ids


def visual_offset(tok, codebook_size):
    """Id of visual token 0; checks that the K visual tokens are contiguous."""
    first = tok.token_to_id(visual_token(0))
    last = tok.token_to_id(visual_token(codebook_size - 1))
    if first is None or last is None or last - first != codebook_size - 1:
        raise ValueError(f"visual tokens are not contiguous for codebook_size={codebook_size}")
    if tok.token_to_id(visual_token(codebook_size)) is not None:
        raise ValueError(f"tokenizer has more than {codebook_size} visual tokens")
    return first


def meta_text(h, w):
    """The Emu3 meta text: token-grid height * width, e.g. '16*16'."""
    return f"{h}*{w}"


def build_tokenizer(texts, bpe_vocab=BPE_VOCAB, codebook_size=CODEBOOK_SIZE):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[0-9A-Z]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    n_bpe = tok.get_vocab_size()
    specials = list(SPECIALS.values())
    total = n_bpe + len(specials) + codebook_size
    n_fill = (-total) % MULTIPLE_OF
    fillers, i = [], 1
    while len(fillers) < n_fill:
        if i not in _RESERVED_EXTRA:
            fillers.append(f"<|extra_{i}|>")
        i += 1
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials + fillers])
    tok.add_special_tokens(
        [AddedToken(visual_token(k), special=True, normalized=False) for k in range(codebook_size)]
    )
    vocab = tok.get_vocab(with_added_tokens=True)
    assert len(vocab) == total + n_fill == tok.get_vocab_size(), "vocabulary ids are not dense"
    assert max(vocab.values()) == len(vocab) - 1
    assert tok.token_to_id(specials[0]) == n_bpe, "special tokens must follow the BPE tokens"
    assert visual_offset(tok, codebook_size) == len(vocab) - codebook_size
    return tok


def tokenizer_config():
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS["bos"],
        "eos_token": SPECIALS["eos"],
        "pad_token": SPECIALS["pad"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "extra_special_tokens": {
            "image_token": SPECIALS["image"],
            "boi_token": SPECIALS["sov"],
            "eoi_token": SPECIALS["eov"],
            "image_wrapper_token": SPECIALS["sot"],
            "eof_token": SPECIALS["eof"],
        },
    }


def save(tok, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=2)
        f.write("\n")


def self_check(tok, codebook_size, texts):
    """Round trips and the spelling rules; raises on failure. Returns a few lines to print."""
    sp = special_ids(tok)
    lines = []
    # Sign text and random strings are spelled one letter/digit per token.
    for text in ["a blue sign that says CAT", "a red sign with the word X7Q on it"]:
        enc = tok.encode(text)
        assert tok.decode(enc.ids) == text, (text, tok.decode(enc.ids))
        upper = [t for t in enc.tokens if any(c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" for c in t)]
        assert all(len(t) == 1 for t in upper), f"uppercase/digits not isolated: {enc.tokens}"
        lines.append(f"{text!r} -> {enc.tokens}")
    # The meta text is digit by digit, and a full prompt keeps its specials as single ids.
    for h, w in [(16, 16), (12, 20), (20, 12)]:
        assert tok.encode(meta_text(h, w)).tokens == list(f"{h}*{w}"), tok.encode(meta_text(h, w)).tokens
    cap = texts[0] if texts else "a red circle"
    prompt = SPECIALS["bos"] + cap + SPECIALS["sov"] + meta_text(16, 16) + SPECIALS["sot"]
    ids = tok.encode(prompt).ids
    expect = [sp["bos"]] + tok.encode(cap).ids + [sp["sov"]] + tok.encode("16*16").ids + [sp["sot"]]
    assert ids == expect, (ids, expect)
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    lines.append(f"prompt {prompt!r} -> {ids}")
    # Visual tokens are single ids and round-trip.
    v0 = visual_offset(tok, codebook_size)
    vis = "".join(visual_token(k) for k in (0, 1, codebook_size - 1)) + SPECIALS["eol"]
    assert tok.encode(vis).ids == [v0, v0 + 1, v0 + codebook_size - 1, sp["eol"]]
    # Every training text round-trips (byte-level BPE is lossless).
    bad = [t for t, e in zip(texts, tok.encode_batch(texts)) if tok.decode(e.ids) != t]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[:3]}"
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (data.py wrote RUN/data)")
    ap.add_argument("--codebook-size", type=int, default=CODEBOOK_SIZE)
    ap.add_argument("--bpe-vocab", type=int, default=BPE_VOCAB)
    ap.add_argument("--max-texts", type=int, default=400_000, help="train the BPE on at most this many texts")
    args = ap.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import data  # noqa: E402  (training/data.py)

    t0 = time.time()
    texts = data.load_texts(args.run, max_texts=args.max_texts)
    tok = build_tokenizer(texts, args.bpe_vocab, args.codebook_size)
    out_dir = os.path.join(args.run, "tokenizer")
    save(tok, out_dir)
    # Check the saved file, the one that ships, not the in-memory object.
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    for line in self_check(tok, args.codebook_size, texts[:20000]):
        print("[tokenizer]", line)
    sp = special_ids(tok)
    n_bpe = sp["pad"]
    lens = [len(e.ids) for e in tok.encode_batch(texts[:20000])]
    print(f"[tokenizer] {len(texts)} texts, bpe {n_bpe}, vocab {tok.get_vocab_size()}, "
          f"visual offset {visual_offset(tok, args.codebook_size)}, text tokens mean {sum(lens)/max(1,len(lens)):.1f} "
          f"max {max(lens, default=0)}, {time.time()-t0:.1f}s -> {out_dir}", flush=True)


if __name__ == "__main__":
    main()
