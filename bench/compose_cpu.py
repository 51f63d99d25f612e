"""Where the time of a composition goes, against plain generate(), on SD1.5-sized random weights, CPU fp32, the
same size and steps; and the peak memory of each. Each case runs in its own process (peak RSS is per process).

    python bench/compose_cpu.py [--size 256] [--steps 20] [--runs 5]   # writes bench/results/compose_cpu.json

Cases: plain generate; 2 and 4 ED-LoRA-shaped concepts (rank 4 on every attn1/attn2 q/k/v/out and the text
encoder attention, 2 pseudo-words × [16, 768]); 2 kohya LoRAs given globally and bound to their regions by their
trigger words; 2 ED-LoRA concepts with ``lora_scope="all"`` (each concept's LoRA confined to its region in every
layer). Every run is split into
- ``prepare``: spec checks, LoRA attach (first run only), the prompt encodings (per layer for ED-LoRA words);
- ``reinit``: the latent re-initialisation's cond-only forward (compose only);
- ``optimise``: the latent optimisation, one cond-only forward with gradients (stopping after the last analysis
  layer), the losses and the backward, per optimised step (compose only; steps 0..max_opt_step = steps // 2,
  fewer if the loss rises, so the optimised fraction of the loop is the official one);
- ``cfg``: the rest of each step, the CFG UNet pass (with region-aware attention in a composition) and the
  sampler step;
- ``decode``: the VAE decode.
The loop's parts come from the pipeline's own hooks: the denoise callback (end of every step) and the composition
observer's "optimise" event (end of each optimisation pass); reinit, the loop and decode are timed around the
calls. The cases are interleaved: each round runs every case once, each in a fresh process (so a load change on
this shared machine hits every case alike, and peak RSS is per case); the figures are medians over the rounds,
and the per-pass figures medians over every pass of every round. ``prepare`` includes attaching the LoRAs, as a
one-shot CLI run pays it; one untimed UNet forward and decode at the measured size warm each process up first.
Each process runs as the CLI does on CPU: tuned allocator and pre-packed UNet convs (composer/runtime.py).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from _common import peak_rss_mb, rss_mb  # noqa: E402

CASES = {  # name: (concepts, concept kind, lora_scope)
    "generate": (0, None, None),
    "compose-2": (2, "edlora", "cross"),
    "compose-4": (4, "edlora", "cross"),
    "kohya-2-triggers": (2, "kohya", "cross"),
    "compose-2-scope-all": (2, "edlora", "all"),
}


def build_pipe():
    import torch
    from composer.clip import CLIPTextConfig, CLIPTextModel
    from composer.pipeline import Pipeline
    from composer.schedulers import SchedulerConfig
    from composer.tiny import byte_tokenizer
    from composer.unet import UNet, UNetConfig
    from composer.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    with torch.device("meta"):
        models = [UNet(UNetConfig()), CLIPTextModel(CLIPTextConfig()), AutoencoderKL(VAEConfig())]
    for m in models:
        m.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return Pipeline(models[0].eval(), models[1].eval(), models[2].eval(), byte_tokenizer(), SchedulerConfig())


def concept_files(pipe, kind: str, n: int, tmp: str) -> list:
    import torch
    from composer.io import save_safetensors
    from composer.tiny import random_edlora, random_kohya
    paths = []
    for i in range(n):
        if kind == "edlora":
            p = os.path.join(tmp, f"c{i}.pth")
            torch.save(random_edlora(pipe, [f"<c{i}a>", f"<c{i}b>"], seed=i, emb_std=0.02), p)
        else:
            p = os.path.join(tmp, f"k{i}.safetensors")
            sd, meta = random_kohya(pipe, trigger(i), seed=i)
            save_safetensors(sd, p, meta)
        paths.append(p)
    return paths


def trigger(i: int) -> str:
    return f"zq{'xyzw'[i]}"


def spec_for(case: str, paths: list, size: int, steps: int) -> dict:
    n, kind, scope = CASES[case]
    w = 1.0 / n
    base = dict(prompt="a photo of friends in a garden", height=size, width=size, steps=steps, lora_scope=scope)
    if kind == "kohya":  # given globally; each binds to the region whose prompt holds its trigger word
        regs = [{"prompt": f"a {trigger(i)} person, smiling", "box": [0.1, i * w, 0.95, (i + 1) * w]} for i in range(n)]
        return {**base, "loras": list(paths), "regions": regs}
    regs = [{"prompt": f"a <c{i}a> <c{i}b>, smiling", "box": [0.1, i * w, 0.95, (i + 1) * w], "lora": paths[i]}
            for i in range(n)]
    return {**base, "regions": regs}


class Clock:
    """Marks from the pipeline's hooks: the denoise callback after every step, the observer's "optimise" event after
    each optimisation pass; the loop's start and end and the re-initialisation around the calls."""

    def __init__(self):
        self.marks = []

    def mark(self, what, i=None):
        self.marks.append((what, i, time.perf_counter()))

    def around(self, fn, name):
        """``fn`` wrapped to mark ``<name>_start`` and ``<name>_end`` around each call."""
        def wrapped(*a, **kw):
            self.mark(f"{name}_start")
            try:
                return fn(*a, **kw)
            finally:
                self.mark(f"{name}_end")
        return wrapped

    def callback(self, i, n, **_):
        self.mark("step", i)

    def observer(self, event, **data):
        if event == "optimise":
            self.mark("optimise", data["i"])

    def split(self) -> dict:
        """-> {"reinit", "optimise", "cfg"} seconds and per-step lists from the marks."""
        t = {k: 0.0 for k in ("reinit", "optimise", "cfg")}
        per_opt, per_cfg, prev = [], [], None
        for what, i, at in self.marks:
            if what in ("reinit_start", "loop_start"):
                prev = at
                continue
            if what == "reinit_end":
                t["reinit"] += at - prev
            elif what == "optimise":
                t["optimise"] += at - prev
                per_opt.append(at - prev)
            elif what == "step":
                t["cfg"] += at - prev
                per_cfg.append(at - prev)
            prev = at
        return {**t, "optimised_steps": len(per_opt), "per_optimise_s": per_opt, "per_cfg_s": per_cfg}


def child(case: str, size: int, steps: int, runs: int, tmp: str):
    import importlib

    from composer.runtime import prepack_convs, tune_cpu_allocator
    tune_cpu_allocator()  # as `python -m composer.sample` runs on CPU
    import torch
    cc = importlib.import_module("composer.compose")  # the module (the package's `composer.compose` is the function)
    n, kind, _ = CASES[case]
    pipe = build_pipe()
    prepack_convs(pipe.unet)
    paths = concept_files(pipe, kind, n, tmp) if n else []
    clock = Clock()
    pipe.denoise, cc.reinitialise = clock.around(pipe.denoise, "loop"), clock.around(cc.reinitialise, "reinit")
    base_rss = rss_mb()
    with torch.no_grad():  # warm-up at the measured shapes (oneDNN primitives, first-touch pages), not timed
        lat = torch.randn(2, 4, size // 8, size // 8)
        pipe.unet(lat, torch.tensor([500, 500]), torch.zeros(2, 77, 768))
        pipe.decode(lat[:1])
    rows = []
    for _ in range(runs):
        clock.marks = []
        t0 = time.perf_counter()
        if case == "generate":
            lat = pipe.sample_latents("a photo of friends in a garden", height=size, width=size, steps=steps,
                                      sampler="dpm++2m", callback=clock.callback)
            info = {}
        else:
            lat, info = cc.compose_latents(pipe, cc.ComposeSpec.from_dict(spec_for(case, paths, size, steps)),
                                           callback=clock.callback, observer=clock.observer)
        t1 = time.perf_counter()
        with torch.no_grad():
            pipe.decode(lat)
        t2 = time.perf_counter()
        loop = next(at for w, _, at in clock.marks if w == "loop_end") - next(at for w, _, at in clock.marks
                                                                             if w == "loop_start")
        s = clock.split()
        s["loop"] = loop
        s["prepare"] = (t1 - t0) - loop - s["reinit"]
        s["decode"] = t2 - t1
        s["total"] = t2 - t0
        if info:
            assert s["optimised_steps"] == info["optimised_steps"], (s["optimised_steps"], info["optimised_steps"])
            s["token_sources"] = [r["source"] for r in info["regions"]]
        rows.append(s)
    peak = peak_rss_mb()
    parts = ("prepare", "reinit", "optimise", "cfg", "loop", "decode", "total")
    med = {k: statistics.median(r[k] for r in rows) for k in parts}
    cfg_steps = [x for r in rows for x in r["per_cfg_s"]]
    opt_steps = [x for r in rows for x in r["per_optimise_s"]]
    print(json.dumps({"case": case, "concepts": n, "kind": kind, "lora_scope": CASES[case][2],
                      "median_s": med, "median_cfg_step_s": statistics.median(cfg_steps),
                      "median_optimise_pass_s": statistics.median(opt_steps) if opt_steps else None,
                      "optimised_steps": rows[0]["optimised_steps"], "token_sources": rows[0].get("token_sources"),
                      "runs": [{**{k: r[k] for k in parts}, "per_cfg_s": r["per_cfg_s"],
                                "per_optimise_s": r["per_optimise_s"]} for r in rows],
                      "rss_after_model_mb": base_rss, "peak_rss_mb": peak, "peak_over_model_mb": peak - base_rss}))


def merge_rounds(rs: list) -> dict:
    """One case's rounds (each a child's one-run record) -> medians over rounds; per-pass medians over all passes."""
    parts = rs[0]["median_s"].keys()
    r = {k: rs[0][k] for k in ("case", "concepts", "kind", "lora_scope", "optimised_steps", "token_sources")}
    r["median_s"] = {k: statistics.median(x["median_s"][k] for x in rs) for k in parts}
    cfg = [s for x in rs for s in x["runs"][0]["per_cfg_s"]]
    opt = [s for x in rs for s in x["runs"][0]["per_optimise_s"]]
    r["median_cfg_step_s"] = statistics.median(cfg)
    r["median_optimise_pass_s"] = statistics.median(opt) if opt else None
    r["runs"] = [{k: v for k, v in x["runs"][0].items()} for x in rs]
    for k in ("rss_after_model_mb", "peak_rss_mb", "peak_over_model_mb"):
        r[k] = statistics.median(x[k] for x in rs)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child")
    ap.add_argument("--tmp")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.size, a.steps, a.runs, a.tmp)
    from _common import write_result
    tmp = tempfile.mkdtemp()
    cases = a.cases.split(",")
    per_case, t_start = {c: [] for c in cases}, time.perf_counter()
    for rnd in range(a.runs):
        for case in cases:
            out = subprocess.run([sys.executable, __file__, "--child", case, "--size", str(a.size), "--steps",
                                  str(a.steps), "--runs", "1", "--tmp", tmp], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(out.returncode)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per_case[case].append(r)
            print(f"round {rnd + 1}/{a.runs}", case, {k: round(v, 2) for k, v in r["median_s"].items()},
                  f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
        if rnd + 1 < a.runs:  # a run cut short keeps the rounds it finished
            write_result("compose_cpu.json", {"partial": True, "rounds_done": rnd + 1, "size": a.size,
                                              "steps": a.steps, "rows": [merge_rounds(per_case[c]) for c in cases]})
    rows = [merge_rounds(per_case[c]) for c in cases]
    g = next((r for r in rows if r["case"] == "generate"), None)
    for r in rows:
        m = r["median_s"]
        r["share_of_total"] = {k: m[k] / m["total"] for k in ("prepare", "reinit", "optimise", "cfg", "decode")}
        if g is not None and r is not g:
            r["time_vs_generate"] = m["total"] / g["median_s"]["total"]
            r["loop_vs_generate"] = m["loop"] / g["median_s"]["loop"]
            r["cfg_step_vs_generate"] = r["median_cfg_step_s"] / g["median_cfg_step_s"]
            r["peak_vs_generate"] = r["peak_rss_mb"] / g["peak_rss_mb"]
            r["peak_over_model_vs_generate"] = r["peak_over_model_mb"] / max(g["peak_over_model_mb"], 1e-9)
    four = next((r for r in rows if r["case"] == "compose-4"), None)
    write_result("compose_cpu.json", {
        "size": a.size, "steps": a.steps, "sampler": "dpm++2m", "dtype": "fp32", "rounds": a.runs,
        "weights": "random, SD1.5 sizes", "wall_s": time.perf_counter() - t_start, "rows": rows,
        "target": "4-concept peak <= 1.3x plain generation",
        "ok": None if four is None or g is None else four["peak_vs_generate"] <= 1.3})


if __name__ == "__main__":
    main()
