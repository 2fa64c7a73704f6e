"""CPU tests of the training pipeline's invariants (no data, no GPU; tiny random models).

    python3 training/test_training.py        (or: python3 -m pytest training/test_training.py)

- the cosine quantizer == transformers' euclidean argmin once the codebook is unit-norm;
- our VQ training path == Emu3VQVAE.encode / decode (same modules, same reshapes);
- BatchNorm3d stays a fixed affine in training mode (train == eval);
- the LM loss path == Emu3ForCausalLM's logits; device-built sequences == tokenizer(layout string);
- the tokenizer spells digits and capitals one per token and round-trips;
- the fast training forward (fast_encode_latents / fast_decode_latents) == HF's, values and gradients;
- a training step (restarts, decoder-only phase) runs without reading anything back from the device;
- the adversarial term (vq.py --adv-weight): the patch discriminator learns to tell sharp shapes
  from blurred ones, and its term moves the VQ but never the discriminator;
- merged t2i forwards give the per-bucket losses; host-side batch lengths == device-built ones;
- warm start reads back exactly the weights an export wrote (VQ and LM);
- data.py --focus adds single-category shards ahead of the uniform ones, on fresh seeds;
- encode.py --gpus 2 writes the codes of one process; lm.py --gpus 2 (two gloo ranks) keeps the
  ranks' weights equal and learns; vq.py --gpus 2 averages to the one-process gradient, keeps one
  codebook through restarts, and stops its ranks together;
- a tied head (tie_word_embeddings) saves, exports (once, no lm_head tensor) and warm-starts;
- a grown codebook (vq.py --grow-codebook) and grow_codes.py keep the LM's function and its ids;
- deeper res blocks (vq.py --grow-res-blocks) keep the VQ's codes and pixels, and the new blocks learn.
"""

import os
import sys

import numpy as np
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
    seq, target, n_keep, n_real = e.sample(np.random.default_rng(0))
    assert n_real == int(n_keep.sum())
    with torch.no_grad():
        s, n = lmlib.seq_loss(model, seq, n_keep, e.target_len)
        logits = model(input_ids=seq[:, :-1]).logits.float()
        m = target[:, 1:]
        ref = F.cross_entropy(logits[m], seq[:, 1:][m], reduction="sum")
    assert n == 3 * e.target_len
    assert abs(s.item() - ref.item()) < 1e-3 * ref.item()


FAST_CFG = dict(vqlib.VQ_CONFIG, codebook_size=64, base_channels=32, channel_multiplier=[1, 2, 2, 4],
                num_res_blocks=1, hidden_size=128, attn_resolutions=[3])


def test_fast_forward_equals_hf():
    """Same function as transformers' encoder/decoder (fp32): values and gradients, both layouts,
    with level attention, channel changes (nin_shortcut) and non-trivial BatchNorm3d stats."""
    torch.manual_seed(0)
    vq = vqlib.build_vq(FAST_CFG, "cpu")
    for m in vq.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    for fmt in ("nchw", "cl"):
        vqlib.set_memory_format(vq, fmt)
        vqlib.set_train(vq, False)
        x = torch.rand(2, 3, 64, 48) * 2 - 1
        if fmt == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        zq = F.normalize(torch.randn(2, 1, 8, 8, 6), dim=2)
        with torch.no_grad():
            a, b = vqlib.encode_latents(vq, x), vqlib.fast_encode_latents(vq, x)
            assert (a - b).abs().max() < 1e-4 * a.abs().max(), (fmt, (a - b).abs().max())
            a, b = vqlib.decode_latents(vq, zq), vqlib.fast_decode_latents(vq, zq)
            assert (a - b).abs().max() < 1e-4 * a.abs().max(), (fmt, (a - b).abs().max())
        vqlib.set_train(vq, True)
        grads = []
        for fast in (False, True):
            vq.zero_grad(set_to_none=True)
            y, zn, idx, commit, cb = vqlib.forward(vq, x, fast=fast)
            (y.pow(2).mean() + commit + cb).backward()
            grads.append(torch.cat([p.grad.flatten() for p in vq.parameters() if p.grad is not None]))
        assert grads[0].shape == grads[1].shape
        assert (grads[0] - grads[1]).norm() < 1e-4 * grads[0].norm()


def test_trainer_step_no_sync_and_decoder_only():
    """Restarts and usage run on masks; the decoder-only phase leaves encoder + codebook alone."""
    import argparse
    vq = _vq_with_data_codebook(4)
    args = argparse.Namespace(hf_forward=False, lr=1e-3, edge_weight=1.0)
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    tr = vqlib.Trainer(vq, args, torch.device("cpu"), amp, torch.Generator().manual_seed(0), fresh_codebook=False)
    vqlib.set_train(vq, True)
    x = vqlib.to_pixels((torch.rand(4, 64, 64, 3) * 255).to(torch.uint8))
    tr.usage[:100] = 0.0                       # 100 dead codes
    before = vq.quantize.embedding.weight.detach().clone()
    terms = tr.step(x, 1e-3, restart=True)
    assert terms.shape == (len(vqlib.LOSS_TERMS),) and torch.isfinite(terms).all()
    assert tr.disc is None and terms[6:].abs().sum() == 0       # no adversarial term unless asked
    cb = vq.quantize.embedding.weight.detach()
    moved = (cb - before).abs().amax(1) > 0.1               # restarted from latents (Adam moves codes ~1e-3)
    n = int(tr.restarted)
    assert 0 < n <= 100 and int(moved.sum()) == n and not moved[100:].any(), (n, int(moved.sum()))
    assert torch.allclose(cb.norm(dim=1), torch.ones(cb.shape[0]), atol=1e-5)
    tr.freeze_encoder()
    enc = {n: p.detach().clone() for n, p in vq.named_parameters() if n.startswith(("encoder", "quant_conv", "quantize"))}
    dec = vq.decoder.conv_out.weight.detach().clone()
    tr.step(x, 1e-3, restart=True)
    assert all(torch.equal(p, enc[n]) for n, p in vq.named_parameters() if n in enc)
    assert not torch.equal(dec, vq.decoder.conv_out.weight)
    assert int(tr.restarted) == n                            # no restarts once frozen


def _shapes_u8(n, size=64, seed=0):
    """n images (n,H,W,3) uint8 of 2-4 flat-coloured squares and triangles on a flat background."""
    g = np.random.default_rng(seed)
    imgs = np.zeros((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        imgs[i] = g.integers(0, 256, 3)
        for _ in range(g.integers(2, 5)):
            r, cy, cx = g.integers(5, 14), g.integers(12, size - 12), g.integers(12, size - 12)
            m = (abs(yy - cy) < r) & (abs(xx - cx) < r)
            if g.random() < 0.5:
                m &= (yy - cy) > abs(xx - cx) - r
            imgs[i][m] = g.integers(0, 256, 3)
    return torch.from_numpy(imgs)


def test_adversarial_term_learns_sharpness_and_moves_only_the_vq():
    """--adv-weight: the discriminator's hinge loss falls from ~2 (cannot tell) as it learns that
    blurred shapes are the fakes; the generator's step moves the VQ, and the discriminator only
    in its own step."""
    import argparse
    torch.manual_seed(0)
    real = vqlib.to_pixels(_shapes_u8(16))
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :] / 256.0).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(real, (2, 2, 2, 2), mode="replicate"), k, groups=3)
    disc = vqlib.PatchDiscriminator(ch=16)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=vqlib.DISC_BETAS)
    losses = []
    for _ in range(100):
        d = vqlib.hinge_d_loss(disc(real), disc(blurred))
        opt.zero_grad()
        d.backward()
        opt.step()
        losses.append(float(d.detach()))
    assert 1.9 < losses[0] < 2.1 and max(losses[-5:]) < 0.3, (losses[0], losses[-5:])
    with torch.no_grad():                       # it learnt sharpness, not these images: fresh ones
        fresh = vqlib.to_pixels(_shapes_u8(16, seed=1))
        fresh_blur = F.conv2d(F.pad(fresh, (2, 2, 2, 2), mode="replicate"), k, groups=3)
        assert float(disc(fresh).mean()) > float(disc(fresh_blur).mean()) + 1.0

    vq = _vq_with_data_codebook(5)
    args = argparse.Namespace(hf_forward=False, lr=1e-3, edge_weight=0.0, adv_weight=0.5)
    tr = vqlib.Trainer(vq, args, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False),
                       torch.Generator().manual_seed(0), fresh_codebook=False)
    vqlib.set_train(vq, True)
    x = vqlib.to_pixels(_shapes_u8(4, seed=2))
    d0 = {n: p.detach().clone() for n, p in tr.disc.named_parameters()}
    terms = tr.step(x, 1e-3, adv=True)
    assert terms.shape == (len(vqlib.LOSS_TERMS),) and torch.isfinite(terms).all()
    assert terms[7] > 0 and terms[6] != 0 and terms[8] > 0  # both terms and the adaptive weight were computed
    assert any(not torch.equal(p, d0[n]) for n, p in tr.disc.named_parameters())   # the disc step ran
    # The generator's adversarial gradient reaches the decoder and leaves no gradient on the disc.
    tr.opt.zero_grad(set_to_none=True)
    tr.disc.zero_grad(set_to_none=True)
    tr.disc.requires_grad_(False)
    y = tr.forward(x)[0]
    (-tr.disc(y).mean()).backward()
    tr.disc.requires_grad_(True)
    assert vq.decoder.conv_out.weight.grad is not None and vq.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tr.disc.parameters())
    # The adaptive weight: adv_weight times the ratio of the two gradient norms at that layer.
    tr.opt.zero_grad(set_to_none=True)
    y = tr.forward(x)[0]
    mse, l1, gl1 = vqlib.loss_fn(x, y)
    rec = vqlib.W_MSE * mse + vqlib.W_L1 * l1 + vqlib.W_GRAD * gl1
    adv_g = -tr.disc(y).mean()
    last = vq.decoder.conv_out.weight
    ratio = torch.autograd.grad(rec, last, retain_graph=True)[0].norm() / torch.autograd.grad(adv_g, last, retain_graph=True)[0].norm()
    assert torch.allclose(tr.adaptive_weight(rec, adv_g), 0.5 * ratio, rtol=1e-3)


def test_merged_forward_equals_per_bucket():
    import numpy as np
    tok = _tokenizer()
    sp = toklib.special_ids(tok)
    sp["K"] = 64
    sp["vis"] = toklib.visual_offset(tok, 64)
    rng = np.random.default_rng(0)
    texts = ["a red circle", "a sign that says CAT", "two blue stars above a green square", "", "draw exactly 3 hearts"]
    bs = [lmlib.Bucket(name, "t2i", 4, rng.integers(0, 64, (5, *lmlib.grid_of(name))), texts, tok, sp, sp["vis"],
                       "cpu", 0.0, 0.3) for name in ("t2i_16x16", "t2i_12x20", "t2i_20x12")]
    model, _ = lmlib.build_lm(lmlib.TINY_LM_CONFIG, tok.get_vocab_size(), sp, "cpu")
    model.eval()
    got = [b.sample(np.random.default_rng(i)) for i, b in enumerate(bs)]
    lens = {s[0].shape[1] for s in got}
    with torch.no_grad():
        merged = lmlib.group_loss(model, [(s[0], s[2], b.target_len) for s, b in zip(got, bs)], sp["pad"])
        alone = [lmlib.seq_loss(model, s[0], s[2], b.target_len) for s, b in zip(got, bs)]
    for (m, n), (a, k) in zip(merged, alone):
        assert n == k and abs(m.item() - a.item()) < 1e-4 * a.item(), (m.item(), a.item())
    assert len(lens) > 1 or True   # lengths usually differ; equality holds either way


def test_warm_start_reads_exported_weights(tmp=None):
    """An Emu3ForConditionalGeneration written like export.py is read back by warm.py exactly."""
    import tempfile
    import warm
    from transformers import Emu3Config, Emu3ForConditionalGeneration
    tok = _tokenizer()
    sp = toklib.special_ids(tok)
    vq = _vq_with_data_codebook(5)
    vocab = tok.get_vocab(with_added_tokens=True)
    lm, text_config = lmlib.build_lm(lmlib.TINY_LM_CONFIG, tok.get_vocab_size(), sp, "cpu")
    vq_cfg = {k: getattr(vq.config, k) for k in warm.VQ_KEYS}
    config = Emu3Config(text_config=text_config.to_dict(), vq_config=vq_cfg, vocabulary_map=vocab)
    model = Emu3ForConditionalGeneration(config)
    model.model.text_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    model.model.vqmodel.load_state_dict(vq.state_dict(), strict=True)
    model = model.half()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(os.path.join(d, "weights"))
        cfg, sd = warm.load_vq_init(d)
        assert cfg == vq_cfg
        ref = model.model.vqmodel.state_dict()
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k].float()) for k in sd if ref[k].is_floating_point())
        vq2 = vqlib.build_vq(cfg, "cpu")
        vq2.load_state_dict(sd, strict=True)
        tconf, lsd = warm.load_lm_init(d)
        lm2, _ = lmlib.build_lm(None, None, None, "cpu", tconf)
        lm2.load_state_dict(lsd, strict=True)
        assert torch.equal(lm2.lm_head.weight, model.lm_head.weight.float())
        assert torch.equal(lm2.model.embed_tokens.weight, model.model.text_model.embed_tokens.weight.float())
        assert tconf.vocab_size == tok.get_vocab_size() and tconf.pad_token_id == sp["pad"]


def test_grown_model_computes_the_same_function():
    """lm.grow_layers: the inserted layers start as the identity, so logits are unchanged, the old
    layers keep their order, and the new ones are trainable (nonzero gradient on the zeroed
    projections)."""
    tok = _tokenizer()
    sp = toklib.special_ids(tok)
    torch.manual_seed(0)
    lm, config = lmlib.build_lm(lmlib.TINY_LM_CONFIG, tok.get_vocab_size(), sp, "cpu")
    lm.eval()
    sd = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    n = config.num_hidden_layers
    grown_sd, total = lmlib.grow_layers(sd, n, 3)
    assert total == n + 3
    config.num_hidden_layers = total
    big, _ = lmlib.build_lm(None, None, None, "cpu", config)
    big.load_state_dict(grown_sd, strict=True)
    big.eval()
    ids = torch.randint(0, tok.get_vocab_size(), (2, 17))
    with torch.no_grad():
        a, b = lm(ids).logits, big(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    olds = [j for j in range(total) if grown_sd[f"model.layers.{j}.mlp.down_proj.weight"].abs().sum() > 0]
    assert len(olds) == n and all(torch.equal(grown_sd[f"model.layers.{j}.self_attn.q_proj.weight"],
                                              sd[f"model.layers.{i}.self_attn.q_proj.weight"]) for i, j in enumerate(olds))
    big.train()
    big(ids, labels=ids).loss.backward()
    new = next(j for j in range(total) if j not in olds)
    assert big.model.layers[new].mlp.down_proj.weight.grad.abs().sum() > 0
    assert big.model.layers[new].self_attn.o_proj.weight.grad.abs().sum() > 0


def test_ema_swap_restores_the_weights():
    """lm.swapped: inside the block the model computes with the averaged weights, after it with
    its own again; with no average it changes nothing."""
    tok = _tokenizer()
    sp = toklib.special_ids(tok)
    torch.manual_seed(0)
    lm, _ = lmlib.build_lm(lmlib.TINY_LM_CONFIG, tok.get_vocab_size(), sp, "cpu")
    lm.eval()
    params = list(lm.parameters())
    ema = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
        torch._foreach_lerp_(ema, params, 0.5)       # half-way between the two
    ids = torch.randint(0, tok.get_vocab_size(), (1, 9))
    with torch.no_grad():
        own = lm(ids).logits
        with lmlib.swapped(params, ema):
            assert all(torch.equal(p, e) for p, e in zip(params, ema))
            avg = lm(ids).logits
        assert torch.equal(lm(ids).logits, own) and not torch.allclose(avg, own)
        with lmlib.swapped(params, None):
            assert torch.equal(lm(ids).logits, own)


def test_bucket_batch_overrides():
    default = lmlib.bucket_batches()
    assert [b for _, _, b in default] == [b for _, _, b in lmlib.BUCKETS]
    scaled = dict((s, b) for s, _, b in lmlib.bucket_batches(["edit_16x16=80"], 0.5))
    assert scaled["edit_16x16"] == 80 and scaled["t2i_16x16"] == round(lmlib.BUCKETS[0][2] * 0.5)
    for bad in (["edit=80"], ["edit_16x16=0"], ["edit_16x16"]):
        try:
            lmlib.bucket_batches(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_vq_only_split_leaves_the_lm_data_alone():
    import data as datalib
    import encode as enclib
    # Earlier splits keep their indices, so the same --seed-base still gives the same data.
    assert list(datalib.SPLITS)[:5] == ["t2i_16x16", "t2i_12x20", "t2i_20x12", "edit_16x16", "heldout"]
    assert datalib.SPLITS["vq_text"][3] == 0, "no sign images unless --n-vq-text asks"
    assert datalib.SPLITS["vq_count"][3] == 0, "no extra counting images unless --n-vq-count asks"
    assert list(datalib.SPLITS)[5:] == ["vq_text", "vq_count"]
    for split in datalib.VQ_ONLY:
        assert split not in enclib.SPLITS and all(split != s for s, _, _ in lmlib.BUCKETS)
        assert datalib.shard_seed(split, 0, 7_000_000) not in {datalib.shard_seed(s, 0, 7_000_000) for s in enclib.SPLITS}


def test_sign_layout_follows_the_world():
    import sign_bits
    # src/world/render.rs `sign_size`: at 128x128 the letter scale is 4 for 1-3 letters, 3 for
    # 4-5 and 2 for 6; the box is (6*len+3)*s by 11*s.
    assert [sign_bits.sign_size(n, 128, 128)[0] for n in range(1, 7)] == [4, 4, 4, 3, 3, 2]
    assert sign_bits.sign_size(5, 128, 128) == (3, 99, 33)
    # `place`: centred, then kept a margin (total/64) inside; a box wider than the room sits at 0.
    assert sign_bits.place(0.5, 20, 128) == 54
    assert sign_bits.place(0.0, 20, 128) == 2 and sign_bits.place(1.0, 20, 128) == 106
    assert sign_bits.place(0.5, 130, 128) == 0
    assert sign_bits.place(0.5, 99, 128) == 15                        # 14.5 rounds up, as in Rust
    counts = __import__("collections").Counter({("a", 1): 1, ("b", 1): 1, ("c", 2): 2})
    assert abs(sign_bits.conditional_entropy(counts) - 0.5) < 1e-9   # code 1 holds two masks


def _fake_run(root, n_shards=3, per_shard=5, seed=0):
    """A RUN directory with random images in shards (t2i_16x16 and edit_16x16) and a tokenizer."""
    import json
    import data as datalib
    rng = np.random.default_rng(seed)
    words = ["a red circle", "two blue stars", "a sign that says CAT", "make the circle blue"]
    for split, task in (("t2i_16x16", "t2i"), ("edit_16x16", "edit")):
        _, w, h, _ = datalib.SPLITS[split]
        for j in range(n_shards):
            d = os.path.join(root, "data", split, f"shard_{j:03d}")
            os.makedirs(d)
            shape = (per_shard, 2, h, w, 3) if task == "edit" else (per_shard, h, w, 3)
            rng.integers(0, 256, shape, dtype=np.uint8).tofile(os.path.join(d, "images.u8"))
            with open(os.path.join(d, "samples.jsonl"), "w") as f:
                for i in range(per_shard):
                    text = f"{words[(i + j) % 4]} {j} {i}"
                    rec = {"task": task, "instruction": text} if task == "edit" else {"task": task, "caption": text}
                    f.write(json.dumps(rec) + "\n")
        open(os.path.join(root, "data", split, "DONE"), "w").close()
    os.makedirs(os.path.join(root, "tokenizer"))
    _tokenizer().save(os.path.join(root, "tokenizer", "tokenizer.json"))


def test_focus_adds_category_shards_before_the_uniform_ones():
    """data.py --focus: extra t2i_16x16 shards of one category each, ahead of the uniform shards
    (whose tail lm.py keeps for validation), on seeds no other shard or split uses; the generator
    (when built) draws only that category in them."""
    import json
    import tempfile
    import data as datalib
    focus = datalib.parse_focus("counting=25,text=12")
    assert focus == [("counting", 25), ("text", 12)]
    for bad in ("count=5", "text=", "text=x"):
        try:
            datalib.parse_focus(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
    shards = datalib.split_plan("t2i_16x16", 30, focus, shard_size=10)
    assert [c for _, _, c in shards] == ["counting"] * 3 + ["text"] * 2 + [None] * 3
    assert [k for k, _, _ in shards] == list(range(8)) and sum(n for _, n, _ in shards) == 67
    assert datalib.split_plan("t2i_12x20", 30, focus, shard_size=10) == [(0, 10, None), (1, 10, None), (2, 10, None)]
    seeds = {datalib.shard_seed("t2i_16x16", k, 9_000_000) for k, _, _ in shards}
    others = {datalib.shard_seed(s, k, 9_000_000) for s in ("t2i_12x20", "edit_16x16") for k in range(3)}
    assert len(seeds) == 8 and not seeds & others
    world = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "release", "tessera")
    if not os.path.exists(world):
        print("  (no target/release/tessera: generator part skipped)")
        return
    with tempfile.TemporaryDirectory() as d:
        datalib.generate(d, world, 2, {"t2i_16x16": 6}, shard_size=4, log=lambda s: None, seed_base=9_000_000,
                         focus=[("counting", 5), ("text", 3)])
        cats = [r["category"] for r in datalib.load_meta(d, "t2i_16x16")]
        assert cats[:8] == ["counting"] * 5 + ["text"] * 3, cats
        assert len(cats) == 14 and datalib.check_split(d, "t2i_16x16") == 14
        assert open(os.path.join(d, "data", "t2i_16x16", "DONE")).read() == "14\n"


def test_parallel_encode_equals_one_process():
    """encode.py --gpus 2 (here two CPU processes) writes the codes and texts one process writes."""
    import json
    import shutil
    import subprocess
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as d:
        _fake_run(d)
        vq = _vq_with_data_codebook(7)
        vq.export_form = True
        vqlib.save_vq(vq, CFG, os.path.join(d, "vq.safetensors"))
        got = {}
        for n in (1, 2):
            r = subprocess.run([sys.executable, os.path.join(here, "encode.py"), "--run", d, "--vq", os.path.join(d, "vq.safetensors"),
                                "--device", "cpu", "--gpus", str(n), "--batch", "4", "--no-amp"],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            got[n] = {s: (np.load(os.path.join(d, "codes", f"{s}.npy")),
                          json.load(open(os.path.join(d, "codes", f"{s}.texts.json")))) for s in ("t2i_16x16", "edit_16x16")}
            assert not os.path.exists(os.path.join(d, "codes", "parts"))
            shutil.rmtree(os.path.join(d, "codes"))
        for s in got[1]:
            assert got[1][s][0].shape == ((15, 16, 16) if s == "t2i_16x16" else (15, 2, 16, 16))
            assert np.array_equal(got[1][s][0], got[2][s][0]), s
            assert got[1][s][1] == got[2][s][1] and got[1][s][1][5] == "two blue stars 1 0"


def _two_ranks(script, *args):
    """training/SCRIPT --gpus 2 ARGS on the CPU (two gloo ranks); checks that it ran data parallel
    and that the ranks ended with equal weights; returns its output."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, script), "--gpus", "2", *args], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "data parallel: 2 ranks" in out, out[-3000:]
    assert "largest weight difference from rank 0 0\n" in out, out[-3000:]
    return out


def test_data_parallel_ranks_stay_in_step():
    """lm.py --gpus 2 on the CPU (two gloo ranks): the ranks average their gradients, agree on
    every step's learning rate and the last step, end with equal weights, and rank 0 writes the
    checkpoint; the loss falls."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        _fake_run(d, n_shards=2, per_shard=40)
        tok = _tokenizer()
        codes = os.path.join(d, "codes")
        os.makedirs(codes)
        rng = np.random.default_rng(1)
        import json
        # Learnable codes: every image is one code repeated, chosen by the caption's first word.
        for split, shape in (("t2i_16x16", (80, 16, 16)), ("edit_16x16", (80, 2, 16, 16))):
            first = rng.integers(0, 4, shape[0])
            np.save(os.path.join(codes, f"{split}.npy"),
                    np.broadcast_to(first.reshape(-1, *[1] * (len(shape) - 1)) * 5, shape).astype(np.int16))
            json.dump([["red", "blue", "green", "yellow"][k] + " thing" for k in first], open(os.path.join(codes, f"{split}.texts.json"), "w"))
        out = _two_ranks("lm.py", "--run", d, "--tiny", "--device", "cpu", "--steps", "150",
                         "--no-amp", "--lr", "3e-3", "--eval-every", "1000", "--bucket-batch", "t2i_16x16=4",
                         "--bucket-batch", "t2i_12x20=1", "--bucket-batch", "t2i_20x12=1", "--bucket-batch", "edit_16x16=2",
                         "--ema", "0.9")
        assert os.path.exists(os.path.join(d, "lm", "lm.safetensors")) and os.path.exists(os.path.join(d, "lm", "lm_last.safetensors"))
        rows = [line.split(",") for line in open(os.path.join(d, "lm", "lm_log.csv")).read().splitlines()[1:]]
        losses = [float(row[4]) for row in rows if row[3] != "final" and row[4]]
        assert len(losses) >= 3 and losses[-1] < 0.7 * losses[0], losses
        assert out.count("[lm] trained") == 1       # rank 0 alone reports


def _vq_rank(rank, world, port, d, restart):
    """One rank (world > 1) or the single process (world == 1) of test_vq_data_parallel_*: a
    step of the tiny VQ on its share of one fixed batch of 4 images; saves grads, codebook, usage."""
    import argparse
    from ddp import Dist
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ddp = Dist("cpu")
    vq = _vq_with_data_codebook(4)
    # edge_weight 0: the edge-weighted L1 is normalised by its batch's weights, so with it each
    # rank's loss is its own half's weighted mean, not a share of the whole batch's.
    args = argparse.Namespace(hf_forward=False, lr=1e-3, edge_weight=0.0)
    amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731  (fp32: comparable sums)
    tr = vqlib.Trainer(vq, args, torch.device("cpu"), amp, torch.Generator().manual_seed(rank),
                       fresh_codebook=False, ddp=ddp)
    vqlib.set_train(vq, True)
    x = vqlib.to_pixels(_shapes_u8(4, seed=3)).contiguous()
    n = 4 // world
    if restart:
        tr.usage[:100] = 0.0
    tr.step(x[rank * n:(rank + 1) * n], 1e-3, restart=restart)
    torch.save({"grads": {k: p.grad.clone() for k, p in vq.named_parameters() if p.grad is not None},
                "codebook": vq.quantize.embedding.weight.detach().clone(), "usage": tr.usage.clone(),
                "restarted": int(tr.restarted)}, os.path.join(d, f"{world}-{rank}.pt"))
    ddp.close()


def _vq_ranks(d, restart):
    """Runs _vq_rank as one process and as two gloo ranks; returns the three saved states."""
    import socket
    import torch.multiprocessing as mp
    _vq_rank(0, 1, 0, d, restart)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    mp.spawn(_vq_rank, args=(2, port, d, restart), nprocs=2, join=True)
    return [torch.load(os.path.join(d, f), weights_only=True) for f in ("1-0.pt", "2-0.pt", "2-1.pt")]


def test_vq_data_parallel_step_equals_one_process():
    """vq.py --gpus 2: two ranks, each with half of a batch, apply the gradient one process
    computes on the whole batch (the losses are batch means), and keep the same code usage."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        one, r0, r1 = _vq_ranks(d, restart=False)
        assert one["grads"].keys() == r0["grads"].keys() == r1["grads"].keys()
        for k, g in one["grads"].items():
            assert torch.equal(r0["grads"][k], r1["grads"][k]), k
            if g.norm() > 1e-6:                 # (the biases in front of a norm get ~0)
                rel = ((r0["grads"][k] - g).norm() / g.norm()).item()
                assert rel < 1e-4, (k, rel)
        assert torch.allclose(r0["usage"], one["usage"], atol=1e-7) and torch.equal(r0["usage"], r1["usage"])
        assert torch.equal(r0["codebook"], r1["codebook"])


def test_vq_data_parallel_restarts_keep_one_codebook():
    """Dead-code restarts draw from each rank's own latents; rank 0's are broadcast, so the two
    ranks end the step with the same codebook, usage and restart count."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        _, r0, r1 = _vq_ranks(d, restart=True)
        assert 0 < r0["restarted"] == r1["restarted"] <= 100
        assert torch.equal(r0["codebook"], r1["codebook"]) and torch.equal(r0["usage"], r1["usage"])


def test_vq_gpus_2_trains_in_step_and_writes_once():
    """vq.py --gpus 2 end to end on the CPU (two gloo ranks): the ranks stop at the same step with
    equal weights, rank 0 alone logs and writes the VQ and its log."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        _fake_run(d, n_shards=2, per_shard=8)
        h = os.path.join(d, "data", "heldout", "shard_000")
        os.makedirs(h)
        np.random.default_rng(5).integers(0, 256, (8, 128, 128, 3), dtype=np.uint8).tofile(os.path.join(h, "images.u8"))
        with open(os.path.join(h, "samples.jsonl"), "w") as f:
            f.writelines('{"task": "t2i", "caption": "a red circle"}\n' for _ in range(8))
        open(os.path.join(d, "data", "heldout", "DONE"), "w").close()
        os.remove(os.path.join(d, "tokenizer", "tokenizer.json"))     # not a VQ run's tokenizer
        out = _two_ranks("vq.py", "--run", d, "--tiny", "--device", "cpu", "--seconds", "6", "--batch", "2",
                         "--no-amp", "--eval-every", "1000", "--freeze-encoder-at", "0.5")
        assert out.count("[vq] trained") == 1 and out.count("decoder-only from here") == 1, out[-3000:]
        assert os.path.exists(os.path.join(d, "vq", "vq.safetensors"))
        rows = open(os.path.join(d, "vq", "vq_log.csv")).read().splitlines()
        assert rows[0].startswith("step,") and rows[-1].split(",")[3] == "final", rows[-3:]


def _tiny_run(d, tok, seed, codebook=None):
    """A run directory's tokenizer/ and vq/ (a tiny 64-code VQ; `codebook` replaces its codes)."""
    import json
    for sub in ("tokenizer", "vq", "lm"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    tok.save(os.path.join(d, "tokenizer", "tokenizer.json"))
    with open(os.path.join(d, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)
    torch.manual_seed(seed)
    vq_cfg = dict(vqlib.TINY_VQ_CONFIG, codebook_size=64)
    vq = vqlib.build_vq(vq_cfg, "cpu")
    if codebook is not None:
        with torch.no_grad():
            vq.quantize.embedding.weight.copy_(codebook)
    vqlib.save_vq(vq, vq_cfg, os.path.join(d, "vq", "vq.safetensors"))
    return vq, vq_cfg


def _script(name, *args):
    """Runs training/NAME with ARGS in a subprocess; fails with its output's tail."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, name), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_tied_head_trains_exports_and_warm_starts():
    """tie_word_embeddings (one matrix for the embedding and the head, what a larger codebook
    would need to fit 64 MiB): lm.py saves and reloads it, export.py writes it once (no lm_head
    tensor; transformers reloads it strictly and generates), and a warm start reads it back."""
    import json
    import tempfile
    import warm
    from safetensors import safe_open
    tok = _tokenizer()
    sp = toklib.special_ids(tok)
    with tempfile.TemporaryDirectory() as d:
        vq, vq_cfg = _tiny_run(d, tok, 3)
        lm, config = lmlib.build_lm(dict(lmlib.TINY_LM_CONFIG, tie_word_embeddings=True), tok.get_vocab_size(), sp, "cpu")
        assert lm.lm_head.weight is lm.model.embed_tokens.weight
        lmlib.save_lm(lm, config, os.path.join(d, "lm"))
        with safe_open(os.path.join(d, "lm", "lm.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
        back, _ = lmlib.load_lm(d)
        ids = torch.tensor([[sp["bos"], 5, 9, 11, sp["sov"]]])
        with torch.no_grad():
            assert torch.equal(back(ids).logits, lm(ids).logits)
        out = os.path.join(d, "root")
        _script("export.py", "--run", d, "--out", out, "--device", "cpu")
        keys = set()
        for name in os.listdir(os.path.join(out, "weights")):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(out, "weights", name), "pt") as f:
                    keys |= set(f.keys())
        assert not any("lm_head" in k for k in keys) and any("embed_tokens" in k for k in keys), sorted(keys)[:5]
        with open(os.path.join(out, "weights", "config.json")) as f:
            exported = json.load(f)
        assert exported["tie_word_embeddings"] and exported["text_config"]["tie_word_embeddings"]
        tconf, sd = warm.load_lm_init(out)
        assert tconf.tie_word_embeddings and torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
        again, _ = lmlib.build_lm(None, None, None, "cpu", tconf)
        again.load_state_dict(sd, strict=True)
        assert torch.equal(again.lm_head.weight, lm.lm_head.weight.half().float())


def test_grown_codebook_keeps_the_lm_and_appends_ids():
    """vq.py --grow-codebook splits a codebook (old codes unchanged, each copy nearest its parent),
    and grow_codes.py pairs a model root's LM with the grown VQ: the new visual tokens come after
    every old id, each new code's LM rows are its parent's, the LM's outputs on the old ids are
    unchanged, and the result exports and reloads strictly in transformers."""
    import json
    import tempfile
    from tokenizers import Tokenizer
    cb = F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    grown = vqlib.grow_codebook(cb, 160, seed=2)
    assert grown.shape == (160, 8) and torch.equal(grown[:64], cb)
    assert torch.allclose(grown.norm(dim=1), torch.ones(160), atol=1e-6)
    assert torch.equal((grown[64:] @ cb.T).argmax(1), torch.arange(96) % 64)
    tok = _tokenizer()
    sp = toklib.special_ids(tok)
    with tempfile.TemporaryDirectory() as d:
        run = os.path.join(d, "run")
        vq, vq_cfg = _tiny_run(run, tok, 4, codebook=cb)
        lm, config = lmlib.build_lm(lmlib.TINY_LM_CONFIG, tok.get_vocab_size(), sp, "cpu")
        lmlib.save_lm(lm, config, os.path.join(run, "lm"))
        root = os.path.join(d, "root")
        _script("export.py", "--run", run, "--out", root, "--device", "cpu")
        big_cfg = dict(vq_cfg, codebook_size=160)
        big = vqlib.build_vq(big_cfg, "cpu")
        big.load_state_dict({k: (grown if k == "quantize.embedding.weight" else v)
                             for k, v in vq.state_dict().items()}, strict=True)
        vqlib.save_vq(big, big_cfg, os.path.join(d, "big.safetensors"))
        grun = os.path.join(d, "grown")
        _script("grow_codes.py", "--root", root, "--vq", os.path.join(d, "big.safetensors"), "--run", grun)
        gtok = Tokenizer.from_file(os.path.join(grun, "tokenizer", "tokenizer.json"))
        old_vocab = tok.get_vocab(with_added_tokens=True)
        new_vocab = gtok.get_vocab(with_added_tokens=True)
        assert all(new_vocab[t] == i for t, i in old_vocab.items()) and len(new_vocab) == len(old_vocab) + 96
        v0 = toklib.visual_offset(gtok, 160)
        assert v0 == toklib.visual_offset(tok, 64)
        with open(os.path.join(grun, "grow_codes.json")) as f:
            parent = torch.tensor(json.load(f)["parent"])
        assert torch.equal(parent, torch.cat([torch.arange(64), torch.arange(96) % 64]))
        new_lm, _ = lmlib.load_lm(grun)
        import warm
        lm.load_state_dict(warm.load_lm_init(root)[1])     # the root's LM: the f16 export of `lm`
        ids = torch.tensor([[sp["bos"], 5, 9, v0 + 3, v0 + 63, sp["eol"]]])
        with torch.no_grad():
            old_logits = lm(ids).logits
            new_logits = new_lm(ids).logits
        assert torch.allclose(new_logits[..., :v0 + 64], old_logits, atol=1e-5)
        assert torch.equal(new_logits[..., v0 + 64:], new_logits[..., v0 + parent[64:]])
        with torch.no_grad():
            child = new_lm(torch.tensor([[sp["bos"], 5, 9, v0 + 64 + 3, v0 + 63, sp["eol"]]])).logits
        assert torch.allclose(child, new_logits, atol=1e-5)   # code 67 is a copy of code 3
        _script("export.py", "--run", grun, "--out", os.path.join(d, "root8"), "--device", "cpu")


def test_grown_res_blocks_keep_the_vq_and_learn():
    """vq.grow_res_blocks: every encoder level, decoder level and temporal stack gets a block that
    starts as the identity, so the grown VQ encodes to the same codes and decodes to the same
    pixels; the old tensors keep their names and values, and the new blocks get gradients."""
    torch.manual_seed(3)
    vq = vqlib.build_vq(CFG, "cpu")
    vqlib.set_train(vq, False)
    sd = {k: v.detach().clone() for k, v in vq.state_dict().items()}
    n0 = CFG["num_res_blocks"]
    grown_sd, cfg = vqlib.grow_res_blocks(sd, CFG, n0 + 1)
    assert cfg["num_res_blocks"] == n0 + 1 and CFG["num_res_blocks"] == n0
    assert all(torch.equal(grown_sd[k], v) for k, v in sd.items())
    new = sorted(set(grown_sd) - set(sd))
    assert any(k.startswith(f"encoder.down_block.down.3.block.{n0}.") for k in new)
    assert any(k.startswith(f"decoder.up_block.up.0.block.{n0 + 1}.") for k in new)
    assert any(k.startswith(f"decoder.time_res_stack.{n0}.") for k in new)
    big = vqlib.build_vq(cfg, "cpu")
    big.load_state_dict(grown_sd, strict=True)
    vqlib.set_train(big, False)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        codes = vqlib.encode_codes(vq, x)
        assert torch.equal(vqlib.encode_codes(big, x), codes)
        assert torch.allclose(big.decode(codes), vq.decode(codes), atol=1e-5)
    vqlib.set_train(big, True)
    y = vqlib.fast_decode_latents(big, vqlib.fast_encode_latents(big, x))
    y.square().mean().backward()
    blk = big.decoder.up_block.up[0].block[n0 + 1]
    assert blk.conv2.weight.grad.abs().sum() > 0 and blk.conv2.weight.abs().sum() == 0
    assert big.encoder.down_block.down[3].block[n0].conv2.weight.grad.abs().sum() > 0



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

