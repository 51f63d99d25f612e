"""Peak memory with 5 concept LoRAs held as live adapters on an SD1.5-sized model (CPU, fp32).

    python bench/lora_memory.py        # writes bench/results/lora_memory.json

ED-LoRA-shaped files (rank 4 on every attn1/attn2 q/k/v/out and the text encoder's attention, plus 2
pseudo-words × [16, 768]) are written to a temporary folder and loaded with ``mode="region"`` (the way
composition holds concepts). Peak RSS (VmHWM) is compared with: RSS before the model + model weights +
the LoRA files' size. Target: peak ≤ that + 10 % of (weights + files).
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from _common import peak_rss_mb, rss_mb, write_result






def main():
    from composer.clip import CLIPTextConfig, CLIPTextModel
    from composer.pipeline import Pipeline
    from composer.schedulers import SchedulerConfig
    from composer.tiny import byte_tokenizer
    from composer.unet import UNet, UNetConfig
    from composer.vae import AutoencoderKL, VAEConfig
    tok = byte_tokenizer()
    tmp = tempfile.mkdtemp()
    # write the LoRA files first (with a meta model for the module shapes) so their creation is not counted
    with torch.device("meta"):
        shapes = {n: tuple(m.weight.shape) for n, m in UNet(UNetConfig()).named_modules()
                  if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))}
    files = []
    for c in range(5):
        g = torch.Generator().manual_seed(c)
        unet = {}
        for n, (o, i) in shapes.items():
            unet[n + ".lora_down.weight"] = torch.randn(4, i, generator=g) * 0.01
            unet[n + ".lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.01
        te = {}
        for l in range(12):
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                m = f"text_model.encoder.layers.{l}.self_attn.{p}"
                te[m + ".lora_down.weight"] = torch.randn(4, 768, generator=g) * 0.01
                te[m + ".lora_up.weight"] = torch.randn(768, 4, generator=g) * 0.01
        emb = {f"<c{c}a>": torch.randn(16, 768, generator=g), f"<c{c}b>": torch.randn(16, 768, generator=g)}
        f = os.path.join(tmp, f"concept{c}.pth")
        torch.save({"params": {"new_concept_embedding": emb, "text_encoder": te, "unet": unet}}, f)
        files.append(f)
    del unet, te, emb
    file_mb = sum(os.path.getsize(f) for f in files) / 2**20
    rss0 = rss_mb()
    with torch.device("meta"):
        models = [UNet(UNetConfig()), CLIPTextModel(CLIPTextConfig()), AutoencoderKL(VAEConfig())]
    for m in models:  # materialise without init temporaries
        m.to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
    weights_mb = sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / 2**20
    pipe = Pipeline(models[0], models[1], models[2], tok, SchedulerConfig())
    rss_model = rss_mb()
    for i, f in enumerate(files):
        pipe.load_lora(f, mode="region", name=f"c{i}")
    rss_after = rss_mb()
    peak = peak_rss_mb()
    adapters_mb = sum(a.nbytes() for l in pipe._layers().values() for a in l.adapters.values()) / 2**20
    budget = rss0 + (weights_mb + file_mb) * 1.10
    res = {"rss_before_model_mb": rss0, "model_weights_mb": weights_mb, "rss_with_model_mb": rss_model,
           "lora_files_mb": file_mb, "adapters_held_mb": adapters_mb, "rss_with_5_loras_mb": rss_after,
           "peak_rss_mb": peak, "budget_mb": budget, "peak_over_model_plus_files": (peak - rss0) / (weights_mb + file_mb),
           "ok": peak <= budget}
    for k, v in res.items():
        print(f"{k:>28}: {v:.1f}" if isinstance(v, float) else f"{k:>28}: {v}")
    write_result("lora_memory.json", {"dtype": "fp32", "concepts": 5, "mode": "region (live adapters)", **res})


if __name__ == "__main__":
    main()
