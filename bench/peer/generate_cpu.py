"""The generation peer on the CPU: the work of `generate_speed`'s reduced configuration, in
diffusers 0.31 (its UNet, VAE and DDIM scheduler) on Debian's torch 1.13 — the LibTorch the
project links on the CPU — so that the two differ only in the code around the kernels.

One batch, as ../shared/peer/peer_generate.py does on the GPU: text encoding of the prompts and of
the empty negative prompt, DDIM (trailing timesteps) with classifier-free guidance 7.5 (the UNet at
batch 2·B), VAE decode; random weights (speed does not depend on their values). The models have
the shapes of bench/step_bench.hpp's `reduced` configuration: the UNet of SD 1.5's layout at
channels 32/64/128/128 (16 groups, cross-attention 64, latents 16×16: 128 px), the tiny VAE of
examples/sd/tiny.hpp (16/32/32/32, one resnet per block, 8 groups) and a CLIP text encoder of
2 layers, width 64, 4 heads, MLP 64, over a 514-symbol vocabulary. transformers does not import on
torch 1.13, so the text encoder is written out here: transformers' CLIPTextModel, pre-norm layers
with a causal mask and quick GELU (its share of a batch is well under 1%).

Run with Debian's python and the unpacked peer (../shared/peer/cpu/README.md says how):

    PYTHONPATH=/tmp/cpupeer/stubs:/tmp/cpupeer/src /usr/bin/python3 bench/peer/generate_cpu.py

Environment: GEN_BS (1,2), GEN_STEPS (50), GEN_DTYPES (fp32,bf16), GEN_REPEAT (3 timed batches
after one warm-up), THREADS (torch's intra-op threads; default: the CPUs this process may use).
Prints one JSON line per configuration, with the fields of generate_speed's `--json` rows.
"""
import json, os, statistics, time

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

torch.set_num_threads(int(os.environ.get("THREADS", len(os.sched_getaffinity(0)))))
VOCAB, WIDTH, LAYERS, HEADS, MLP, TOKENS = 514, 64, 2, 4, 64, 77


class CLIPLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q_proj, self.k_proj = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.v_proj, self.out_proj = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, MLP), nn.Linear(MLP, WIDTH)

    def forward(self, x, mask):
        b, n, _ = x.shape
        h = self.layer_norm1(x)
        q, k, v = (p(h).view(b, n, HEADS, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        w = (q * (WIDTH // HEADS) ** -0.5) @ k.transpose(-1, -2) + mask
        a = (w.softmax(-1) @ v).transpose(1, 2).reshape(b, n, WIDTH)
        x = x + self.out_proj(a)
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


class CLIPText(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding, self.position_embedding = nn.Embedding(VOCAB, WIDTH), nn.Embedding(TOKENS, WIDTH)
        self.layers = nn.ModuleList(CLIPLayer() for _ in range(LAYERS))
        self.final_layer_norm = nn.LayerNorm(WIDTH)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]
        mask = torch.full((TOKENS, TOKENS), float("-inf"), dtype=x.dtype).triu(1)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)


def models(dtype):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
    return [m.to(dtype).eval().requires_grad_(False) for m in (unet, vae, CLIPText())]


@torch.no_grad()
def generate(unet, vae, text, scheduler, bs, steps, dtype, gen):
    ids = torch.randint(0, VOCAB, (bs, TOKENS), generator=gen)
    empty = torch.randint(0, VOCAB, (bs, TOKENS), generator=gen)
    ctx = text(torch.cat([empty, ids]))
    lat = torch.randn((bs, 4, 16, 16), generator=gen).to(dtype)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=ctx).sample
        uncond, cond = eps.chunk(2)
        lat = scheduler.step(uncond + 7.5 * (cond - uncond), t, lat).prev_sample
    image = vae.decode(lat / 2.9).sample
    return ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def run(dtype_name, bs, steps, repeat):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    unet, vae, text = models(dtype)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="trailing")
    gen = torch.Generator().manual_seed(0)
    generate(unet, vae, text, scheduler, bs, steps, dtype, gen)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        generate(unet, vae, text, scheduler, bs, steps, dtype, gen)
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return dict(peer="diffusers-0.31+torch-1.13-cpu", precision=dtype_name, batch_size=bs, steps=steps,
                size=128, s_per_batch=round(s, 4), images_per_s=round(bs / s, 3),
                unet_steps_per_s=round(steps / s, 2), threads=torch.get_num_threads(), config="reduced")


for name in os.environ.get("GEN_DTYPES", "fp32,bf16").split(","):
    for bs in [int(b) for b in os.environ.get("GEN_BS", "1,2").split(",")]:
        print(json.dumps(run(name, bs, int(os.environ.get("GEN_STEPS", "50")),
                             int(os.environ.get("GEN_REPEAT", "3")))), flush=True)
