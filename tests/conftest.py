"""Shared fixtures: reference models built by diffusers/transformers (test-only) and saved the way those
libraries save them. Everything a test reads lives in the repository: the CLIP vocabulary shipped in the
package (composer/data/clip/) and the official method vectors (tests/data/method_vectors/)."""
import os
import pathlib
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BPE = ROOT / "composer" / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
METHOD_VECTORS = ROOT / "tests" / "data" / "method_vectors"


def _choose_triton_mode(config):
    """The Triton kernels run on CPU tensors under the interpreter, chosen before triton is imported (test
    modules are imported after pytest_configure). Without CUDA: the interpreter. With CUDA: compiled kernels only
    when the run selects the real-GPU tests (``-m cuda``, as bench/gpu_check.sh does); otherwise the interpreter,
    so the CPU-tensor Triton tests stay right on a GPU machine and the cuda-marked tests skip (they need
    compiled kernels)."""
    import torch as _t
    marks = config.getoption("markexpr", "") or ""
    gpu_run = _t.cuda.is_available() and "cuda" in marks and "not cuda" not in marks
    if not gpu_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    _choose_triton_mode(config)
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: slower CPU test")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bpe_path():
    assert BPE.exists(), f"the packaged CLIP vocabulary is missing: {BPE}"
    return str(BPE)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, bpe_path):
    from composer.tokenizer import CLIPTokenizer
    d = tmp_path_factory.mktemp("tok")
    CLIPTokenizer.from_file(bpe_path).save(str(d))
    return str(d)


def perturb(module, std=0.05, seed=0):
    """Add noise to every parameter (norm scales and biases included), so a swapped or missing weight
    anywhere shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="session")
def ref_pipe_dir(tmp_path_factory, tokenizer_dir):
    """A tiny SD1.5-structured StableDiffusionPipeline saved with save_pretrained (diffusers' own layout)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from composer.clip import CLIPTextConfig as OurCLIP
    from composer.schedulers import SchedulerConfig
    from composer.unet import UNetConfig
    from composer.vae import VAEConfig

    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel.from_config(UNetConfig.from_name("tiny").to_diffusers()), seed=1)
    vae = perturb(AutoencoderKL.from_config(VAEConfig.from_name("tiny").to_diffusers()), seed=2)
    te = perturb(CLIPTextModel(CLIPTextConfig(**OurCLIP.from_name("tiny").to_transformers())), seed=3)
    tok = CLIPTokenizer(os.path.join(tokenizer_dir, "vocab.json"), os.path.join(tokenizer_dir, "merges.txt"),
                        model_max_length=77)
    sched = PNDMScheduler.from_config(SchedulerConfig().to_diffusers())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    d = tmp_path_factory.mktemp("ref") / "sd-tiny"
    pipe.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="session")
def ref_pipe(ref_pipe_dir):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(ref_pipe_dir, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def our_pipe(ref_pipe_dir):
    import composer
    return composer.load(ref_pipe_dir)


@pytest.fixture(scope="session")
def ldm_file(tmp_path_factory, our_pipe):
    """Our pipeline's weights exported to an LDM single file by weights_tools."""
    from composer.io import save_safetensors
    from weights_tools.ldm import to_ldm
    sd, meta = to_ldm(our_pipe.unet, our_pipe.vae, our_pipe.text_encoder)
    p = tmp_path_factory.mktemp("ldm") / "tiny.safetensors"
    save_safetensors(sd, str(p), meta)
    return str(p)


def max_rel_err(a, b):
    """max |a - b| relative to the output scale (max |b|)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
