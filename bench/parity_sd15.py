"""SD1.5-sized parity: our UNet, text encoder and VAE against diffusers/transformers on the same random weights.

    python bench/parity_sd15.py            # fp32, CPU; writes bench/results/parity_sd15.json

Not part of CI (≈3 GB of RAM and a minute or two of CPU). Random weights, SD1.5 sizes (860 M UNet params).
"""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _common import write_result
from composer.clip import CLIPTextConfig, CLIPTextModel
from composer.unet import UNet, UNetConfig
from composer.vae import AutoencoderKL, VAEConfig


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    from diffusers import AutoencoderKL as DVAE, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCfg, CLIPTextModel as HFClip
    torch.manual_seed(0)
    res = {}
    with torch.no_grad():
        ref = UNet2DConditionModel.from_config(UNetConfig().to_diffusers()).eval()
        ours = UNet(UNetConfig()).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x, ctx = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
        res["unet_max_rel_err"] = rel(ours(x, 981, ctx), ref(x, 981, ctx).sample)
        del ref, ours
        ref = HFClip(HFCfg(**CLIPTextConfig().to_transformers())).eval()
        ours = CLIPTextModel(CLIPTextConfig()).eval()
        ours.load_state_dict({("text_model." + k if not k.startswith("text_model.") else k): v
                              for k, v in ref.state_dict().items() if "position_ids" not in k})
        ids = torch.randint(0, 49406, (2, 77))
        res["text_encoder_max_rel_err"] = rel(ours(ids), ref(ids).last_hidden_state)
        del ref, ours
        ref = DVAE.from_config(VAEConfig().to_diffusers()).eval()
        ours = AutoencoderKL(VAEConfig()).eval()
        ours.load_state_dict(ref.state_dict())
        z = torch.randn(1, 4, 32, 32)
        want = ref.decode(z).sample
        res["vae_decode_max_rel_err"] = rel(ours.decode(z, fast=False), want)  # the reference path: diffusers' ops
        res["vae_decode_fast_max_rel_err"] = rel(ours.decode(z), want)  # the default path (sub-pixel convs)
    print(res)
    write_result("parity_sd15.json", {"dtype": "fp32", "weights": "random, SD1.5 sizes",
                                      "unet_input": "1x4x64x64, t=981", "vae_input": "1x4x32x32", **res})


if __name__ == "__main__":
    main()
