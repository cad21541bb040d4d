"""A converted MoE-LLaVA checkpoint computes what MoE-LLaVA's own architecture computes from the source
weights, on a prompt rendered with MoE-LLaVA's template, and `stgc eval` answers every task with it.

The reference is built here from the source folder only (its config.json, its tensors under MoE-LLaVA's
names, its CLIP folder, its tokenizer), without `stgc.convert` or `stgc.modeling`, the way MoE-LLaVA
assembles the model (moellava/model/llava_arch.py, language_model/llava_*_moe.py): the dense language model
(transformers' StableLm / Phi; Qwen-1's blocks written out below) whose MLP at the MoE layers is
`deepspeed.moe.layer.MoE` holding the DeepSpeed experts; the CLIP tower's second-to-last layer without CLS;
the mlp2x_gelu projector; the image features spliced in at the `<image>` sentinel of the prompt tokenized
around it (mm_utils.tokenizer_image_token); the image padded to a square with the processor's mean colour
(mm_utils.expand2square). DeepSpeed routes with MoE-LLaVA's evaluation capacity factor 2.0, which drops no
token of a top-2-of-4 layer, and a deterministic second expert (`top2_2nd_expert_sampling=False`; MoE-LLaVA
samples it with Gumbel noise, which `--reproduce-moellava-routing` keeps).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tests.test_convert import make_source, source_tokenizer, write_qwen1_tokenizer

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
QUESTION = "What color is the square ?"
IMAGE_SENTINEL = -200  # moellava/constants.py IMAGE_TOKEN_INDEX
LAYOUTS = [
    ("stablelm", "moe_llava_stablelm", "hf"),
    ("phi", "moe_llava_phi", "hf"),
    ("qwen2", "moe_llava_qwen", "qwen1"),
]


# --------------------------------------------------------------------------------------------------------
# Qwen-1 (MoE-LLaVA's language_model/qwen/modeling_qwen.py names): fused c_attn with bias, full rotary,
# RMSNorm, MLP c_proj(w1(x) * silu(w2(x)))


class QwenRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class QwenMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(hidden, ffn, bias=False)
        self.c_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QwenAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, base: float):
        super().__init__()
        self.heads, self.base = heads, base
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        B, S, D = x.shape
        d = D // self.heads
        q, k, v = (t.view(B, S, self.heads, d).transpose(1, 2) for t in self.c_attn(x).split(D, dim=-1))
        inv = 1.0 / self.base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = torch.outer(torch.arange(S, dtype=torch.float32), inv)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rotate(t):
            half = torch.cat([-t[..., d // 2 :], t[..., : d // 2]], dim=-1)
            return t * cos + half * sin

        q, k = rotate(q), rotate(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D)
        return self.c_proj(out)


class QwenBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, eps = cfg["hidden_size"], cfg["layer_norm_epsilon"]
        self.ln_1, self.ln_2 = QwenRMSNorm(D, eps), QwenRMSNorm(D, eps)
        self.attn = QwenAttention(D, cfg["num_attention_heads"], cfg["rotary_emb_base"])
        self.mlp = QwenMLP(D, cfg["intermediate_size"] // 2)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class QwenLM(nn.Module):
    """Qwen-1's causal LM; parameter names as MoE-LLaVA's checkpoints hold them (``transformer.*``)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.transformer.h = nn.ModuleList(QwenBlock(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.transformer.ln_f = QwenRMSNorm(cfg["hidden_size"], cfg["layer_norm_epsilon"])
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def embed(self, ids):
        return self.transformer.wte(ids)

    def forward(self, embeds):
        x = embeds
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def layers(self):
        return self.transformer.h


# --------------------------------------------------------------------------------------------------------
# StableLM-2 and Phi-2 (MoE-LLaVA's StableLMEpoch / phi modules use transformers' parameter names)


class HFLM(nn.Module):
    def __init__(self, model_type: str, cfg: dict):
        super().__init__()
        from transformers import PhiConfig, PhiForCausalLM, StableLmConfig, StableLmForCausalLM

        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings")  # fmt: skip
        common = {k: cfg[k] for k in names}
        rope = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
        if model_type == "moe_llava_stablelm":  # StableLMEpoch's config names
            rope["partial_rotary_factor"] = cfg["rope_pct"]
            config = StableLmConfig(
                **common,
                layer_norm_eps=cfg["norm_eps"],
                use_qkv_bias=cfg["use_qkv_bias"],
                rope_parameters=rope,
                tie_word_embeddings=False,
            )
            self.lm = StableLmForCausalLM(config)
        else:
            rope["partial_rotary_factor"] = cfg["partial_rotary_factor"]
            config = PhiConfig(
                **common,
                layer_norm_eps=cfg["layer_norm_eps"],
                rope_parameters=rope,
                tie_word_embeddings=False,
            )
            self.lm = PhiForCausalLM(config)
            # MoELLaVAPhiForCausalLM replaces Phi's lm_head by one without bias (llava_phi_moe.py)
            self.lm.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.config = config

    def embed(self, ids):
        return self.lm.model.embed_tokens(ids)

    def forward(self, embeds):
        return self.lm(inputs_embeds=embeds).logits

    def layers(self):
        return self.lm.model.layers


def _expert_template(model_type: str, lm: nn.Module, cfg: dict) -> nn.Module:
    if model_type == "moe_llava_qwen":
        return QwenMLP(cfg["hidden_size"], cfg["intermediate_size"] // 2)
    from transformers.models.phi.modeling_phi import PhiMLP
    from transformers.models.stablelm.modeling_stablelm import StableLmMLP

    return (StableLmMLP if model_type == "moe_llava_stablelm" else PhiMLP)(lm.config)


def moellava_reference(src) -> tuple[nn.Module, nn.Module, nn.Module, dict]:
    """(language model with DeepSpeed MoE layers, CLIP tower, projector, config) from a MoE-LLaVA folder.
    Call inside a process group (DeepSpeed's MoE layer needs one)."""
    from deepspeed.moe.layer import MoE
    from transformers import CLIPVisionModel

    class MoEOutput(MoE):
        """MoE-LLaVA's decoder layers take the first of MoE's (output, l_aux, exp_counts)."""

        def forward(self, hidden_states, used_token=None):
            return super().forward(hidden_states, used_token)[0]

    cfg = json.loads((src / "config.json").read_text())
    model_type, moe = cfg["model_type"], cfg["moe"]
    lm = QwenLM(cfg) if model_type == "moe_llava_qwen" else HFLM(model_type, cfg)
    layers = lm.layers()
    for i, experts in zip(moe["moe_layers_idx"], moe["num_experts"]):
        layer = MoEOutput(
            cfg["hidden_size"],
            _expert_template(model_type, lm, cfg),
            num_experts=experts,
            ep_size=moe["ep_size"],
            k=moe["top_k_experts"],
            capacity_factor=moe["capacity_factor"],
            eval_capacity_factor=moe["eval_capacity_factor"],
            min_capacity=moe["min_capacity"],
            use_residual=moe["use_residual"],
            top2_2nd_expert_sampling=False,
        )
        layer.set_deepspeed_parallelism()
        layers[i].mlp = layer
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    prefix = "transformer" if model_type == "moe_llava_qwen" else "model"
    proj = {k.split("image_spatial_proj.")[1]: v for k, v in state.items() if ".mm_projector." in k}
    lm_state = {k: v for k, v in state.items() if ".mm_projector." not in k and not k.endswith("inv_freq")}
    target = lm.lm if isinstance(lm, HFLM) else lm
    target.load_state_dict(lm_state, strict=True)  # every tensor of the checkpoint has its place
    projector = nn.Sequential(
        nn.Linear(*proj["0.weight"].shape[::-1]), nn.GELU(), nn.Linear(*proj["2.weight"].shape[::-1])
    )
    projector.load_state_dict(proj)
    tower = CLIPVisionModel.from_pretrained(cfg["mm_image_tower"])
    assert prefix in ("model", "transformer")
    return lm.eval(), tower.eval(), projector.eval(), cfg


def expand2square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def reference_logits(src, prompt: str, image: Image.Image) -> torch.Tensor:
    """MoE-LLaVA's forward of `prompt` (with one <image>) and `image`."""
    from transformers import CLIPImageProcessorPil

    from stgc.bench.deepspeed_ref import single_process_group

    with single_process_group("gloo"), torch.no_grad():
        lm, tower, projector, cfg = moellava_reference(src)
        size = tower.config.image_size
        clip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        square = expand2square(image, tuple(int(x * 255) for x in clip.image_mean))
        pixels = torch.as_tensor(np.asarray(clip(square)["pixel_values"][0]))[None]
        hidden = tower(pixels, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]]
        features = projector(hidden[:, 1:])  # mm_vision_select_feature "patch": CLS dropped
        tok = source_tokenizer()
        before, after = prompt.split("<image>")
        ids = tok(before).input_ids + [IMAGE_SENTINEL] + tok(after).input_ids
        at = ids.index(IMAGE_SENTINEL)
        text = lm.embed(torch.tensor([ids[:at] + ids[at + 1 :]]))
        embeds = torch.cat([text[:, :at], features, text[:, at:]], dim=1)
        return lm(embeds)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from evals.testing import write_tiny_suite

    return write_tiny_suite(tmp_path_factory.mktemp("mini"), n=2, image_size=32)


@pytest.mark.parametrize("backbone,model_type,naming", LAYOUTS)
def test_converted_checkpoint_equals_moellavas_forward_and_evaluates(
    tmp_path, mini, backbone, model_type, naming, capsys
):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stgc.cli import main
    from stgc.convert import convert_moe_llava

    _, src = make_source(tmp_path, backbone, model_type, naming, tokenizer=naming == "hf")
    kwargs = {}
    if naming == "qwen1":  # Qwen-1's tiktoken tokenizer is remote code: a fast one of the same vocabulary
        write_qwen1_tokenizer(src)
        source_tokenizer().save_pretrained(tmp_path / "fast")
        kwargs = {"tokenizer_path": tmp_path / "fast"}
    out = convert_moe_llava(src, tmp_path / "converted", **kwargs)

    # the prompt as MoE-LLaVA's conversation template renders it, and as the checkpoint's template does
    prompt = f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert (
        processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == prompt
    )
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))  # wide: padding matters
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        ours = model(**processor(images=[image], text=[prompt], return_tensors="pt")).logits
    theirs = reference_logits(src, prompt, image)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # stgc eval on the mini suite (MoE-LLaVA's protocol): every task answers
    capsys.readouterr()
    rc = main(["eval", str(out), "--tasks", "moe-llava", "--mini-root", str(mini), "--limit", "4",
               "--max-new-tokens", "3", "--batch-size", "4", "--out", str(tmp_path / "eval")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err[-3000:]
    samples = sorted((tmp_path / "eval").glob("samples_*.jsonl"))
    answered = set()
    for path in samples:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and all(r["resps"][0][0].strip() for r in rows), path.name
        answered.add(path.name.removeprefix("samples_").removesuffix(".jsonl"))
    from evals import tasks as T

    expected = {s for t in T.SUITES[T.MOE_LLAVA] for s in (T.TASKS[t].subtasks or (t,))}
    assert answered == expected
