"""Warm start: read the VQ and the LM of a shipped model (or of a run directory) back into the
trainers' float32 form, so a session continues from the model in `weights/` instead of from scratch.

    --init ROOT          ROOT/weights (config.json + safetensors) and ROOT/tokenizer (the repo root)
    --init WEIGHTS_DIR   a plain transformers directory (config.json + safetensors)
    --init RUN           a run directory: RUN/vq/vq.safetensors and/or RUN/lm/{lm.safetensors, lm_config.json}

The shipped weights are float16; upcasting them to float32 is exact, so a warm start begins at
exactly the shipped model. The tokenizer is never rebuilt on a warm start (its ids are the LM's
vocabulary): `same_tokenizer` checks that the run's tokenizer is the shipped one.
"""

import json
import os

import torch

# Keys of the shipped config's vq_config that are Emu3VQVAEConfig arguments (the rest is HF bookkeeping).
VQ_KEYS = ("codebook_size", "embed_dim", "latent_channels", "double_latent", "in_channels", "out_channels",
           "temporal_downsample_factor", "base_channels", "channel_multiplier", "num_res_blocks",
           "attn_resolutions", "hidden_size", "num_attention_heads", "attention_dropout")


def weights_dir(path):
    """The transformers directory under `path` (ROOT/weights or the directory itself), or None."""
    for d in (os.path.join(path, "weights"), path):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    return None


def tokenizer_file(path):
    """tokenizer.json of a shipped root (ROOT/tokenizer/), a weights dir, or a run dir; or None."""
    for p in (os.path.join(path, "tokenizer", "tokenizer.json"), os.path.join(path, "tokenizer.json"),
              os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer", "tokenizer.json")):
        if os.path.isfile(p):
            return p
    return None


_CACHE = {}


def _shipped_model(wdir):
    """Emu3ForConditionalGeneration in float32 from a transformers directory (cached per process)."""
    if wdir not in _CACHE:
        from transformers import Emu3ForConditionalGeneration
        _CACHE[wdir] = Emu3ForConditionalGeneration.from_pretrained(wdir, dtype=torch.float32)
    return _CACHE[wdir]


def load_vq_init(path):
    """(config dict, float32 state_dict) of the VQ at `path` (see module docstring)."""
    run_ckpt = os.path.join(path, "vq", "vq.safetensors")
    if path.endswith(".safetensors") or os.path.isfile(run_ckpt):
        from safetensors import safe_open
        from safetensors.torch import load_file
        f = path if path.endswith(".safetensors") else run_ckpt
        with safe_open(f, "pt") as h:
            cfg = json.loads(h.metadata()["vq_config"])
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(f).items()}
        return cfg, sd
    wdir = weights_dir(path)
    if wdir is None:
        raise FileNotFoundError(f"--init {path}: no weights/config.json, config.json or vq/vq.safetensors there")
    with open(os.path.join(wdir, "config.json")) as f:
        full = json.load(f)
    cfg = {k: full["vq_config"][k] for k in VQ_KEYS if k in full["vq_config"]}
    model = _shipped_model(wdir)
    sd = {k: v.detach().clone() for k, v in model.model.vqmodel.state_dict().items()}
    return cfg, sd


def with_head(sd, config):
    """An LM state_dict as load_state_dict wants it: a tied head (`tie_word_embeddings`, saved
    without `lm_head.weight`) gets the embedding back under its own name."""
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in sd:
        sd = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]})
    return sd


def load_lm_init(path):
    """(Emu3TextConfig, float32 state_dict of Emu3ForCausalLM) of the LM at `path`."""
    from transformers import Emu3TextConfig
    run_cfg = os.path.join(path, "lm", "lm_config.json")
    if os.path.isfile(run_cfg):
        from safetensors.torch import load_file
        config = Emu3TextConfig.from_json_file(run_cfg)
        sd = {k: v.float() for k, v in load_file(os.path.join(path, "lm", "lm.safetensors")).items()}
        return config, with_head(sd, config)
    wdir = weights_dir(path)
    if wdir is None:
        raise FileNotFoundError(f"--init {path}: no weights/config.json, config.json or lm/lm_config.json there")
    model = _shipped_model(wdir)
    config = Emu3TextConfig(**model.config.text_config.to_dict())
    sd = {"model." + k: v.detach().clone() for k, v in model.model.text_model.state_dict().items()}
    sd["lm_head.weight"] = model.lm_head.weight.detach().clone()
    return config, sd


def same_tokenizer(a, b):
    """Whether two tokenizer.json files define the same vocabulary and added tokens (ids included)."""
    from tokenizers import Tokenizer
    ta, tb = Tokenizer.from_file(a), Tokenizer.from_file(b)
    return ta.get_vocab(with_added_tokens=True) == tb.get_vocab(with_added_tokens=True)
