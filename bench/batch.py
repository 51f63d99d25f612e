"""A 20-item batch on the tiny model: one ``--jobs`` process against 20 separate ``python -m composer.sample``
calls (same specs and seeds: 2-concept compositions at 128×128, 4 steps).

    python bench/batch.py        # writes bench/results/batch.json
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main():
    import torch
    import composer
    from _common import write_result
    from composer.tiny import random_edlora
    from weights_tools.make_tiny import make_tiny
    tmp = tempfile.mkdtemp()
    make_tiny(tmp)
    model = os.path.join(tmp, "diffusers")
    pipe = composer.load(model)
    loras = []
    for i, words in enumerate((("<cat1>", "<cat2>"), ("<dog1>", "<dog2>"))):
        p = os.path.join(tmp, f"c{i}.pth")
        torch.save(random_edlora(pipe, list(words), seed=i), p)
        loras.append(p)
    jobs = []
    for j in range(4):
        jobs.append({"name": f"setting{j}", "prompt": f"a cat and a dog, scene {j}", "height": 128, "width": 128,
                     "steps": 4, "seeds": list(range(5)),
                     "regions": [{"prompt": "a <cat1> <cat2>", "box": [0, 0, 1, 0.5], "lora": loras[0]},
                                 {"prompt": "a <dog1> <dog2>", "box": [0, 0.5, 1, 1], "lora": loras[1]}]})
    jp = os.path.join(tmp, "jobs.jsonl")
    with open(jp, "w") as f:
        for j in jobs:
            f.write(json.dumps(j) + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "composer.sample", "--model", model, "--jobs", jp, "--out-dir",
                    os.path.join(tmp, "batch"), "--quiet"], check=True, env=env, cwd=ROOT)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for j in jobs:
        spec = {k: v for k, v in j.items() if k not in ("name", "seeds")}
        sp = os.path.join(tmp, f"{j['name']}.json")
        with open(sp, "w") as f:
            json.dump(spec, f)
        for s in j["seeds"]:
            subprocess.run([sys.executable, "-m", "composer.sample", "--model", model, "--spec", sp, "--seed", str(s),
                            "--out", os.path.join(tmp, "single", f"{j['name']}_{s}.png"), "--quiet"],
                           check=True, env=env, cwd=ROOT)
            n += 1
    t_single = time.perf_counter() - t0
    res = {"items": n, "batch_total_s": t_batch, "separate_total_s": t_single, "batch_per_image_s": t_batch / n,
           "separate_per_image_s": t_single / n, "speedup": t_single / t_batch}
    print(res)
    write_result("batch.json", {"model": "tiny random (make_tiny)", "job": "2-concept composition, 128x128, 4 steps", **res})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
