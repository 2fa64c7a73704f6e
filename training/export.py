"""Stage 6: export to the transformers Emu3 format, reload it, and generate once greedily.

    python3 training/export.py --run RUN [--out RUN/export] [--prompt "a red circle"]

Assembles `Emu3ForConditionalGeneration(Emu3Config(text_config, vq_config, vocabulary_map))`, copies
the LM (RUN/lm) and VQ (RUN/vq) weights and writes

    OUT/weights/    config.json (+ a "tessera" key documenting the layout), generation_config.json,
                    preprocessor_config.json, model-0000N-of-0000M.safetensors (f16, each < 15 MiB)
                    and model.safetensors.index.json
    OUT/tokenizer/  tokenizer.json, tokenizer_config.json
    OUT/check/      gen_tokens.json (+ edit_tokens.json), gen.png (+ edit.png), summary.json

Then it reloads OUT/weights with `Emu3ForConditionalGeneration.from_pretrained` (no missing or
unexpected keys allowed) and runs greedy decoding with classifier-free guidance and the prefix
constraint (emu3-port-spec §4.1, §4.2) in float32, for comparison with the Rust engine.
"""

import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm as lmlib  # noqa: E402
import tokenizer as toklib  # noqa: E402
import vq as vqlib  # noqa: E402

# ----------------------------------------------------------------------------- defaults
GRIDS = [[16, 16], [12, 20], [20, 12]]   # [rows H, cols W] of the token grid
MAX_SHARD = "14MB"                        # 14e6 bytes < 15 MiB
SHIP_LIMIT = 64 * 2 ** 20
GUIDANCE = 3.0
EDIT_GUIDANCE = 1.5      # instruction edits: their unconditional prompt keeps the source (BENCHMARKS.md)
TOP_K = 64
TEMPERATURE = 1.0
PROMPT = "a red circle"
FORMAT_VERSION = 1


def tessera_doc(sp_names):
    """The `tessera` key of config.json: what the engine needs beyond the Emu3 format."""
    return {
        "format_version": FORMAT_VERSION,
        "grids": GRIDS,
        "default_grid": GRIDS[0],
        "grid_order": "[rows H, cols W]; meta text is \"H*W\"; pixels are 8*W wide and 8*H tall",
        "t2i_layout": lmlib.T2I_LAYOUT,
        "edit_layout": lmlib.EDIT_LAYOUT,
        "unconditional_prompt": "",
        "unconditional_t2i": "<|extra_203|><|image start|>{H}*{W}<|image token|>",
        "unconditional_edit": "the edit prompt with the empty instruction",
        "prefix_constraint": "offsets counted from the LAST <|image token|> of the prompt (edit prompts hold two)",
        "guidance_scale": GUIDANCE,
        "edit_guidance_scale": EDIT_GUIDANCE,
        "top_k": TOP_K,
        "temperature": TEMPERATURE,
        "codebook": "unit-norm codes: euclidean argmin on the quant_conv output == cosine nearest code",
        "special_tokens": sp_names,
    }


def preprocessor_config():
    return {
        "image_processor_type": "Emu3ImageProcessor",
        "processor_class": "Emu3Processor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
        "min_pixels": 96 * 160,
        "max_pixels": 128 * 128,
        "spatial_factor": 8,
    }


def generation_config(sp, k):
    return {
        "do_sample": True,
        "top_k": TOP_K,
        "temperature": TEMPERATURE,
        "guidance_scale": GUIDANCE,
        "max_new_tokens": max(h * (w + 1) + 3 for h, w in GRIDS),
        "bos_token_id": sp["bos"],
        "eos_token_id": sp["eos"],
        "pad_token_id": sp["pad"],
    }


def assemble(run, device="cpu"):
    """Emu3ForConditionalGeneration with our weights (float32), the tokenizer and the ids."""
    from tokenizers import Tokenizer
    from transformers import Emu3Config, Emu3ForConditionalGeneration
    tok = Tokenizer.from_file(os.path.join(run, "tokenizer", "tokenizer.json"))
    sp = toklib.special_ids(tok)
    vq, vq_cfg = vqlib.load_vq(os.path.join(run, "vq", "vq.safetensors"), "cpu")
    lm, text_config = lmlib.load_lm(run, "cpu")
    vocab = tok.get_vocab(with_added_tokens=True)
    k = vq_cfg["codebook_size"]
    assert sum(1 for t in vocab if t.startswith("<|visual token")) == k, "tokenizer and VQ disagree on K"
    assert text_config.vocab_size == len(vocab), (text_config.vocab_size, len(vocab))
    # A tied head (text_config.tie_word_embeddings) is tied at the top level too, so save_pretrained
    # writes the embedding once and transformers and Tessera both read the head from it.
    config = Emu3Config(text_config=text_config.to_dict(), vq_config=vq_cfg, vocabulary_map=vocab,
                        tie_word_embeddings=text_config.tie_word_embeddings)
    model = Emu3ForConditionalGeneration(config)
    model.model.text_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    model.model.vqmodel.load_state_dict(vq.state_dict(), strict=True)
    return model.to(device).eval(), tok, sp, k


def prefix_fn(h, w, sp, vis_ids):
    """HF prefix_allowed_tokens_fn for an h x w grid (spec §4.1), relative to the last SOT."""
    sot = sp["sot"]

    def fn(batch_id, input_ids):
        ids = input_ids.tolist()
        pos = len(ids) - 1 - ids[::-1].index(sot)
        o = len(ids) - pos
        if o % (w + 1) == 0:
            return [sp["eol"]]
        if o == (w + 1) * h + 1:
            return [sp["eof"]]
        if o == (w + 1) * h + 2:
            return [sp["eov"]]
        if o == (w + 1) * h + 3:
            return [sp["eos"]]
        if o > (w + 1) * h + 3:
            return [sp["pad"]]
        return vis_ids

    return fn


@torch.no_grad()
def greedy(model, tok, sp, k, prompt_ids, neg_ids, h, w, guidance):
    vis0 = toklib.visual_offset(tok, k)
    dev = model.device
    out = model.generate(
        input_ids=torch.tensor([prompt_ids], device=dev),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=dev),
        negative_prompt_ids=torch.tensor([neg_ids], device=dev),
        guidance_scale=guidance,
        prefix_allowed_tokens_fn=prefix_fn(h, w, sp, list(range(vis0, vis0 + k))),
        do_sample=False,
        max_new_tokens=h * (w + 1) + 3,
        pad_token_id=sp["pad"],
        eos_token_id=sp["eos"],
        bos_token_id=sp["bos"],
    )
    gen = out[0, len(prompt_ids):]
    assert gen.numel() == h * (w + 1) + 3 and gen[-1].item() == sp["eos"], f"did not end with EOS: {gen[-5:].tolist()}"
    image = model.decode_image_tokens(image_tokens=gen[None], height=h, width=w)
    codes = (gen[:-3].view(h, w + 1)[:, :w] - vis0)
    assert codes.min() >= 0 and codes.max() < k
    return gen.tolist(), codes.tolist(), vqlib.to_u8(image)[0].cpu().numpy()


def generate_checks(model, tok, sp, k, args, cdir, summary):
    """Greedy t2i (and edit, if edit codes or --edit-json exist) with CFG + prefix constraint, in
    float32 without TF32; writes check/."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    summary["check_device"] = str(model.device)
    S = toklib.SPECIALS
    h, w = GRIDS[0]
    meta = S["sov"] + toklib.meta_text(h, w) + S["sot"]
    prompt_ids = tok.encode(S["bos"] + args.prompt + meta).ids
    neg_ids = tok.encode(S["bos"] + "" + meta).ids
    t1 = time.time()
    gen, codes, img = greedy(model, tok, sp, k, prompt_ids, neg_ids, h, w, args.guidance)
    record = {"task": "t2i", "prompt": args.prompt, "grid": [h, w], "guidance_scale": args.guidance,
              "do_sample": False, "dtype": "float32", "device": str(model.device), "input_ids": prompt_ids,
              "negative_prompt_ids": neg_ids, "generated_ids": gen, "codes": codes}
    with open(os.path.join(cdir, "gen_tokens.json"), "w") as f:
        json.dump(record, f)
    vqlib.write_png(os.path.join(cdir, "gen.png"), img)
    print(f"[export] greedy t2i {args.prompt!r} ({h}x{w}, cfg {args.guidance}) -> {len(gen)} tokens ending in EOS "
          f"in {time.time()-t1:.1f}s; first codes {codes[0][:8]}", flush=True)
    summary["t2i_seconds"] = time.time() - t1

    # An edit: from --edit-json (a previous edit_tokens.json) or the validation end of the edit codes.
    import numpy as np
    src = None
    codes_path = os.path.join(args.run or "", "codes", "edit_16x16.npy")
    if args.edit_json:
        with open(args.edit_json) as f:
            prev = json.load(f)
        src, instr = np.array(prev["source_codes"]), prev["instruction"]
    elif args.run and os.path.exists(codes_path):
        ecodes = np.load(codes_path, mmap_mode="r")
        with open(os.path.join(args.run, "codes", "edit_16x16.texts.json")) as f:
            instr = json.load(f)[-1]
        src = np.asarray(ecodes[-1, 0]).astype(int)
    if src is not None:
        src_block = "".join("".join(toklib.visual_token(int(c)) for c in row) + S["eol"] for row in src)
        head = S["bos"] + meta + src_block + S["eof"] + S["eov"]
        prompt_ids = tok.encode(head + instr + meta).ids
        neg_ids = tok.encode(head + "" + meta).ids
        t1 = time.time()
        gen, codes, img = greedy(model, tok, sp, k, prompt_ids, neg_ids, h, w, args.guidance)
        with torch.no_grad():
            src_img = vqlib.to_u8(model.model.vqmodel.decode(torch.tensor(src, device=model.device)[None]))[0].cpu().numpy()
        record = {"task": "edit", "instruction": instr, "grid": [h, w], "guidance_scale": args.guidance,
                  "do_sample": False, "dtype": "float32", "device": str(model.device), "source_codes": src.tolist(),
                  "input_ids": prompt_ids,
                  "negative_prompt_ids": neg_ids, "generated_ids": gen, "codes": codes}
        with open(os.path.join(cdir, "edit_tokens.json"), "w") as f:
            json.dump(record, f)
        vqlib.write_png(os.path.join(cdir, "edit.png"), np.concatenate([src_img, img], axis=1))
        print(f"[export] greedy edit {instr!r} -> {len(gen)} tokens ending in EOS in {time.time()-t1:.1f}s; "
              f"codes changed vs source: {float((np.array(codes) != src).mean()):.2f}", flush=True)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run directory (required unless --check)")
    ap.add_argument("--out", default=None, help="default RUN/export (with --check: DIR/check)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--guidance", type=float, default=GUIDANCE)
    ap.add_argument("--max-shard", default=MAX_SHARD)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the greedy check runs (float32, TF32 off)")
    ap.add_argument("--check", default=None, metavar="DIR",
                    help="only rerun the greedy checks on a shipped model (DIR/weights, DIR/tokenizer)")
    ap.add_argument("--edit-json", default=None, help="edit source + instruction from a previous edit_tokens.json")
    args = ap.parse_args()
    from transformers import Emu3ForConditionalGeneration
    t0 = time.time()
    if args.check:
        from tokenizers import Tokenizer
        cdir = args.out or os.path.join(args.check, "check")
        os.makedirs(cdir, exist_ok=True)
        model = Emu3ForConditionalGeneration.from_pretrained(os.path.join(args.check, "weights"), dtype=torch.float32)
        model = model.to(args.device).eval()
        tok = Tokenizer.from_file(os.path.join(args.check, "tokenizer", "tokenizer.json"))
        k = sum(1 for t in tok.get_vocab(with_added_tokens=True) if t.startswith("<|visual token"))
        summary = {}
        generate_checks(model, tok, toklib.special_ids(tok), k, args, cdir, summary)
        print(f"[export] checks done in {time.time()-t0:.1f}s -> {cdir}", flush=True)
        return
    if not args.run:
        ap.error("--run is required (or --check DIR)")
    out = args.out or os.path.join(args.run, "export")
    wdir, tdir, cdir = (os.path.join(out, d) for d in ("weights", "tokenizer", "check"))
    for d in (wdir, tdir, cdir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    model, tok, sp, k = assemble(args.run)
    model = model.to(torch.float16)
    model.generation_config.update(**generation_config(sp, k))
    model.save_pretrained(wdir, max_shard_size=args.max_shard, safe_serialization=True)
    reference = {n: t.detach().clone() for n, t in model.state_dict().items()}
    del model
    with open(os.path.join(wdir, "config.json")) as f:
        config = json.load(f)
    config["tessera"] = tessera_doc(toklib.SPECIALS)
    with open(os.path.join(wdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(wdir, "generation_config.json"), "w") as f:
        json.dump(generation_config(sp, k), f, indent=2)
        f.write("\n")
    with open(os.path.join(wdir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(), f, indent=2)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.run, "tokenizer", name), os.path.join(tdir, name))
    files = sorted(os.listdir(wdir))
    big = [f for f in files if os.path.getsize(os.path.join(wdir, f)) >= 15 * 2 ** 20]
    assert not big, f"files of 15 MiB or more: {big}"
    assert "model.safetensors.index.json" in files or len([f for f in files if f.endswith(".safetensors")]) == 1
    shipped = dir_size(wdir) + dir_size(tdir)
    print(f"[export] wrote {out}: {len(files)} weight files, largest "
          f"{max(os.path.getsize(os.path.join(wdir, f)) for f in files)/2**20:.2f} MiB; shipped (weights+tokenizer) "
          f"{shipped/2**20:.2f} MiB of {SHIP_LIMIT/2**20:.0f} MiB", flush=True)
    assert shipped <= SHIP_LIMIT, "shipped model over 64 MiB"

    # Reload exactly as a user would; strict about keys; weights identical to what we wrote.
    model, info = Emu3ForConditionalGeneration.from_pretrained(wdir, dtype=torch.float32, output_loading_info=True)
    bad = {key: v for key, v in info.items() if v and key != "error_msgs"} if isinstance(info, dict) else {}
    assert not bad and not info.get("error_msgs"), f"loading info: {info}"
    sd = model.state_dict()
    assert set(sd) == set(reference), set(sd) ^ set(reference)
    diff = max((sd[n].float() - reference[n].float()).abs().max().item() for n in reference)
    assert diff == 0.0, f"reloaded weights differ by {diff}"
    model = model.to(args.device).eval()
    print(f"[export] reloaded with from_pretrained: {len(sd)} tensors, no missing/unexpected keys, exact", flush=True)

    summary = {"shipped_bytes": shipped, "weight_files": files,
               "params": sum(p.numel() for p in model.parameters()),
               "lm_params": sum(p.numel() for p in model.model.text_model.parameters())
               + (0 if model.config.tie_word_embeddings else model.lm_head.weight.numel()),   # a tied head is the embedding
               "vq_params": sum(p.numel() for p in model.model.vqmodel.parameters())}
    try:
        generate_checks(model, tok, sp, k, args, cdir, summary)
    except Exception as err:  # noqa: BLE001  (the export itself is done; report and fail at the end)
        import traceback
        traceback.print_exc()
        summary["generation_error"] = repr(err)
    with open(os.path.join(cdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[export] done in {time.time()-t0:.1f}s; params total {summary['params']/1e6:.2f}M "
          f"(LM {summary['lm_params']/1e6:.2f}M, VQ {summary['vq_params']/1e6:.2f}M)", flush=True)
    if "generation_error" in summary:
        sys.exit(1)


if __name__ == "__main__":
    main()
