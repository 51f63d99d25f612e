"""Export our (diffusers-named) components to one LDM single-file state dict, and back.

Uses the one name table in ``composer/convert.py``; every key is accounted for in both directions.
"""
from __future__ import annotations

import json

from composer import convert


def to_ldm(unet, vae, te) -> tuple[dict, dict]:
    """-> (LDM state dict, metadata). Metadata keeps the head/group counts that shapes cannot show."""
    out = {}
    for comp, m in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        sd = m.state_dict()
        names = convert.ldm_name_table(comp, sd.keys(), m.cfg)
        for k, v in sd.items():
            if comp == "vae" and convert.vae_needs_conv_shape(k):
                v = v[:, :, None, None]
            assert names[k] not in out, names[k]
            out[names[k]] = v
    meta = {"composer_config": json.dumps({"unet_heads": unet.cfg.heads, "unet_groups": unet.cfg.norm_num_groups,
                                           "vae_groups": vae.cfg.norm_num_groups,
                                           "clip_heads": te.cfg.num_attention_heads}),
            "format": "pt"}
    return out, meta
