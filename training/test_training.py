"""CPU tests of the training pipeline's invariants (no data, no GPU; tiny random models).

    python3 training/test_training.py        (or: python3 -m pytest training/test_training.py)

- the cosine quantizer == transformers' euclidean argmin once the codebook is unit-norm;
- our VQ training path == Emu3VQVAE.encode / decode (same modules, same reshapes);
- BatchNorm3d stays a fixed affine in training mode (train == eval);
- the LM loss path == Emu3ForCausalLM's logits; device-built sequences == tokenizer(layout string);
- the tokenizer spells digits and capitals one per token and round-trips.
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm as lmlib  # noqa: E402
import tokenizer as toklib  # noqa: E402
import vq as vqlib  # noqa: E402

CFG = dict(vqlib.TINY_VQ_CONFIG, codebook_size=512)


def _vq_with_data_codebook(seed=0):
    """A random tiny VQ whose unit-norm codebook is drawn from its own latents (non-degenerate argmin)."""
    torch.manual_seed(seed)
    vq = vqlib.build_vq(CFG, "cpu")
    vqlib.set_train(vq, False)
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vqlib.encode_latents(vq, x)
        zf = z.permute(0, 1, 3, 4, 2).reshape(-1, z.shape[2])
        pick = torch.randint(0, zf.shape[0], (CFG["codebook_size"],))
        vq.quantize.embedding.weight.copy_(F.normalize(zf[pick] + 0.05 * torch.randn_like(zf[pick]), dim=1))
    return vq


def test_cosine_equals_euclidean():
    vq = _vq_with_data_codebook()
    x = torch.rand(6, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ours = vqlib.encode_codes(vq, x)
        hf = vqlib.hf_encode(vq, x)
        z = vqlib.encode_latents(vq, x)
        zn, _, _ = vqlib.lookup(z, vq.quantize.embedding.weight)
    assert ours.shape == hf.shape == (6, 8, 6)
    diff = (ours != hf).flatten()
    if diff.any():   # only genuine float ties may differ
        cb = vq.quantize.embedding.weight
        s_ours = (zn[diff] * cb[ours.flatten()[diff]]).sum(1)
        s_hf = (zn[diff] * cb[hf.flatten()[diff]]).sum(1)
        assert (s_ours - s_hf).abs().max() < 1e-5, (s_ours - s_hf).abs().max()
    assert diff.float().mean() < 0.01


def test_export_form_codes_equal_hf():
    """fp16-rounded codebook (as shipped): cosine may disagree at ~1e-3 near-ties, so the export
    form uses HF's own euclidean formula and must then agree exactly."""
    vq = _vq_with_data_codebook(3)
    x = torch.rand(8, 3, 128, 128) * 2 - 1
    u8 = ((x.permute(0, 2, 3, 1) + 1) * 127.5).to(torch.uint8)
    with torch.no_grad():
        vqlib.scale_latents(vq, u8)
        for p in vq.parameters():
            p.copy_(p.half().float())
    vq.export_form = True
    with torch.no_grad():
        assert torch.equal(vqlib.encode_codes(vq, x), vqlib.hf_encode(vq, x))


def test_training_path_equals_hf_decode():
    vq = _vq_with_data_codebook(1)
    # Non-trivial BatchNorm3d statistics, so the temporal blocks are exercised.
    for m in vq.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        codes = vqlib.hf_encode(vq, x)
        a = vq.decode(codes)
        b = vqlib.decode_codes(vq, codes)
        vqlib.set_train(vq, True)            # training mode: BatchNorm3d must stay in eval
        y, zn, idx, commit, cb = vqlib.forward(vq, x)
        vqlib.set_train(vq, False)
    assert torch.equal(a, b)
    assert torch.equal(idx.view(codes.shape), codes)
    assert (y - a).abs().max() < 1e-5     # straight-through output == decode of the codes
    assert commit.item() >= 0 and cb.item() >= 0


def test_channels_last_and_autocast_run():
    vq = _vq_with_data_codebook(2)
    vqlib.channels_last(vq)
    vqlib.set_train(vq, True)
    u8 = (torch.rand(2, 96, 160, 3) * 255).to(torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, zn, idx, commit, cb = vqlib.forward(vq, vqlib.to_pixels(u8))
    mse, l1, g = vqlib.loss_fn(vqlib.to_pixels(u8), y)
    (mse + l1 + g + commit + cb).backward()
    assert y.shape == (2, 3, 96, 160) and idx.shape == (2 * 12 * 20,)


def _tokenizer():
    texts = ["a red circle", "two blue stars above a green square", "a sign that says CAT",
             "make the circle blue", "draw exactly 3 hearts", "a poster reading X7Q"] * 20
    return toklib.build_tokenizer(texts, bpe_vocab=300, codebook_size=64)


def test_tokenizer_rules():
    tok = _tokenizer()
    lines = toklib.self_check(tok, 64, ["a red circle", "write CAFE on the sign instead"])
    assert lines
    assert tok.get_vocab_size() % 64 == 0
    assert tok.encode("20*12").tokens == list("20*12")


def test_lm_layout_and_loss():
    tok = _tokenizer()
    sp = toklib.special_ids(tok)
    sp["K"] = 64
    sp["vis"] = toklib.visual_offset(tok, 64)
    import numpy as np
    rng = np.random.default_rng(0)
    texts = ["a red circle", "a sign that says CAT", "two blue stars above a green square"]
    b = lmlib.Bucket("t2i_12x20", "t2i", 3, rng.integers(0, 64, (3, 12, 20)), texts, tok, sp, sp["vis"], "cpu", 0.0, 0.1)
    lmlib.check_layout(b, tok, sp)
    e = lmlib.Bucket("edit_16x16", "edit", 3, rng.integers(0, 64, (3, 2, 16, 16)), ["make it blue", "", "remove the star"],
                     tok, sp, sp["vis"], "cpu", 0.0, 0.1)
    lmlib.check_layout(e, tok, sp)
    model, _ = lmlib.build_lm(lmlib.TINY_LM_CONFIG, tok.get_vocab_size(), sp, "cpu")
    seq, target, n_keep = e.sample(torch.Generator().manual_seed(0))
    with torch.no_grad():
        s, n = lmlib.seq_loss(model, seq, n_keep, e.target_len)
        logits = model(input_ids=seq[:, :-1]).logits.float()
        m = target[:, 1:]
        ref = F.cross_entropy(logits[m], seq[:, 1:][m], reduction="sum")
    assert n == 3 * e.target_len
    assert abs(s.item() - ref.item()) < 1e-3 * ref.item()


if __name__ == "__main__":
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    failed = 0
    for t in tests:
        try:
            t()
            print(f"ok   {t.__name__}", flush=True)
        except Exception as err:  # noqa: BLE001
            failed += 1
            print(f"FAIL {t.__name__}: {err!r}", flush=True)
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
