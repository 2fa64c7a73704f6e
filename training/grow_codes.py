"""A run directory that pairs ROOT's LM with a new VQ, every visual token's LM rows inherited.

    python3 training/grow_codes.py --root ROOT --vq NEW_VQ.safetensors --run DIR
    python3 training/export.py --run DIR --out MODEL --device cpu      # -> MODEL/weights, MODEL/tokenizer

For a VQ trained again (its codes moved) or grown (`vq.py --grow-codebook K2`: more codes). The
new VQ's code j takes the embedding and head rows of ROOT's visual token for the old code nearest
to it (cosine between the two unit-norm codebooks), so the LM starts from what it knew instead of
random rows. A grown codebook's extra visual tokens are appended after ROOT's last id, so every
text and special id keeps its meaning (`lm.py --init DIR` then warm-starts from DIR/lm). The
export is a model root that `tessera eval --roundtrip` can judge and that a stage B can carry
(`VQ_ROOT`, `--init`).

DIR gets tokenizer/{tokenizer.json, tokenizer_config.json}, vq/vq.safetensors (a copy of NEW_VQ),
lm/{lm.safetensors, lm_config.json} and grow_codes.json (the code map and how many old codes it
uses).
"""

import argparse
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer as toklib  # noqa: E402
import warm  # noqa: E402

CODEBOOK = "quantize.embedding.weight"


def nearest_old(new_cb, old_cb, chunk=4096):
    """For each new code, the index of the old code with the highest cosine similarity."""
    a, b = F.normalize(new_cb.float(), dim=1), F.normalize(old_cb.float(), dim=1)
    return torch.cat([(a[i:i + chunk] @ b.T).argmax(1) for i in range(0, a.shape[0], chunk)])


def extend_tokenizer(tok, k_old, k_new):
    """Appends visual tokens k_old .. k_new-1 after the last id (they must be the last ids)."""
    from tokenizers import AddedToken
    v0 = toklib.visual_offset(tok, k_old)
    n = tok.get_vocab_size(with_added_tokens=True)
    assert v0 + k_old == n, "the visual tokens are not the last ids"
    tok.add_special_tokens([AddedToken(toklib.visual_token(k), special=True, normalized=False)
                            for k in range(k_old, k_new)])
    assert toklib.visual_offset(tok, k_new) == v0
    return v0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="model root (weights/ + tokenizer/) whose LM is kept")
    ap.add_argument("--vq", required=True, help="the new VQ: a stage A vq.safetensors")
    ap.add_argument("--run", required=True, help="run directory to write (must not exist)")
    a = ap.parse_args()
    if os.path.exists(a.run):
        raise SystemExit(f"--run {a.run} exists; pick a new directory")
    from tokenizers import Tokenizer
    from safetensors.torch import save_file

    _, old_vq = warm.load_vq_init(a.root)
    new_cfg, new_vq = warm.load_vq_init(a.vq)
    old_cb, new_cb = old_vq[CODEBOOK], new_vq[CODEBOOK]
    k_old, k_new = old_cb.shape[0], new_cb.shape[0]
    if k_new < k_old:
        raise SystemExit(f"the new VQ has {k_new} codes, fewer than ROOT's {k_old}: not supported")
    tok = Tokenizer.from_file(warm.tokenizer_file(a.root))
    v0 = extend_tokenizer(tok, k_old, k_new)
    config, sd = warm.load_lm_init(a.root)
    parent = nearest_old(new_cb, old_cb)

    names = ["model.embed_tokens.weight"]
    if not getattr(config, "tie_word_embeddings", False):
        names.append("lm_head.weight")
    for name in names:
        w = sd[name]
        assert w.shape[0] == v0 + k_old, (name, tuple(w.shape), v0 + k_old)
        sd[name] = torch.cat([w[:v0], w[v0 + parent]])
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    config.vocab_size = v0 + k_new

    for d in ("tokenizer", "vq", "lm"):
        os.makedirs(os.path.join(a.run, d))
    tok.save(os.path.join(a.run, "tokenizer", "tokenizer.json"))
    tdir = os.path.dirname(warm.tokenizer_file(a.root))
    shutil.copy(os.path.join(tdir, "tokenizer_config.json"), os.path.join(a.run, "tokenizer", "tokenizer_config.json"))
    shutil.copy(a.vq, os.path.join(a.run, "vq", "vq.safetensors"))
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(a.run, "lm", "lm.safetensors"))
    with open(os.path.join(a.run, "lm", "lm_config.json"), "w") as f:
        f.write(config.to_json_string())
    same = int((parent[:k_old] == torch.arange(k_old)).sum())
    info = {"vq": os.path.basename(a.vq),
            "codes_old": k_old, "codes_new": k_new, "vocab_size": config.vocab_size,
            "old_codes_used": int(parent.unique().numel()), "codes_kept_index": same,
            "parent": parent.tolist()}
    with open(os.path.join(a.run, "grow_codes.json"), "w") as f:
        json.dump(info, f)
    print(f"[grow] {k_old} -> {k_new} codes, vocabulary {v0 + k_old} -> {config.vocab_size}; "
          f"{info['old_codes_used']} old codes inherited, {same} of the first {k_old} keep their own rows")


if __name__ == "__main__":
    main()
