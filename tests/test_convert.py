"""`stgc convert`: synthetic MoE-LLaVA folders (DeepSpeed-MoE key names, MoE-LLaVA config.json, a CLIP
folder, a tokenizer as the released folders ship it) made from a tiny model convert back to exactly that
model, with a processor that evaluates it the way MoE-LLaVA does (chat template, pad-to-square)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from transformers import AutoModelForImageTextToText, CLIPVisionModel

from stgc.convert import convert_moe_llava
from tests.conftest import WORDS, image_batch

MOE_LAYERS = (0, 2)
# the words of MoE-LLaVA's system prompt and roles, so that rendered prompts tokenize without <unk>
CHAT_WORDS = (
    "A chat between curious user an artificial intelligence assistant The gives helpful detailed polite "
    "answers ' s questions USER ASSISTANT Answer with option letter from given choices directly single word "
    "or phrase"
).split()


def source_tokenizer():
    """A tokenizer as a MoE-LLaVA folder ships it: byte-level BPE (as StableLM-2's, Phi-2's and Qwen's), EOS
    and unknown token ``<|endoftext|>``, no ``<image>`` (the converter adds it at the first free row) and no
    pad token (MoE-LLaVA pads with the unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS + CHAT_WORDS)] * 8, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|endoftext|>")


def source_model(backbone: str, seed: int = 7):
    """The tiny model a synthetic checkpoint is written from: its vocabulary is the source tokenizer's plus
    the row ``<image>`` gets when the converter adds it; its pad id is unk's."""
    from stgc.config import MoEConfig
    from stgc.modeling import build_model

    tok = source_tokenizer()
    torch.manual_seed(seed)
    return build_model(
        backbone,
        "tiny",
        vocab_size=len(tok) + 1,
        image_token_id=len(tok),
        pad_token_id=tok.unk_token_id,
        moe=MoEConfig(),
    ).eval()


def _moellava_state(model, naming: str) -> dict[str, torch.Tensor]:
    """The model's tensors under MoE-LLaVA's names, written from MoE-LLaVA's layout (independently of
    stgc.convert): DeepSpeed experts per index, mm_projector.image_spatial_proj, Qwen-1 names for qwen."""
    out = {}
    E = model.config.moe_config.num_experts
    P = "transformer" if naming == "qwen1" else "model"
    for key, t in model.state_dict().items():
        if key.startswith("model.vision_tower."):
            continue
        if key.startswith("lm_head."):
            out[key] = t.clone()
            continue
        m = re.fullmatch(r"model\.multi_modal_projector\.linear_([12])\.(\w+)", key)
        if m:
            out[f"{P}.mm_projector.image_spatial_proj.{0 if m.group(1) == '1' else 2}.{m.group(2)}"] = (
                t.clone()
            )
            continue
        rest = key.removeprefix("model.language_model.")
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.(.+)", rest)
        layer = (
            f"{P}.h.{m.group(1)}" if (m and naming == "qwen1") else f"model.layers.{m.group(1)}" if m else ""
        )
        if m and int(m.group(1)) in MOE_LAYERS:
            ds = f"{layer}.mlp.deepspeed_moe"
            ex = f"{ds}.experts.deepspeed_experts"
            F_ = model.config.text_config.intermediate_size
            gate, up, down = (
                ("w2", "w1", "c_proj") if naming == "qwen1" else ("gate_proj", "up_proj", "down_proj")
            )
            param, ffn = m.group(2), model.moe_blocks[0].experts.ffn
            if param == "router.weight":
                out[f"{ds}.gate.wg.weight"] = t.clone()
            elif ffn == "swiglu" and param == "experts.w_in":  # [gate; up] per expert
                for e in range(E):
                    out[f"{ex}.{e}.{gate}.weight"] = t[e, :F_].clone()
                    out[f"{ex}.{e}.{up}.weight"] = t[e, F_:].clone()
            elif ffn == "swiglu":
                for e in range(E):
                    out[f"{ex}.{e}.{down}.weight"] = t[e].clone()
            else:
                name = {"w_in": "fc1.weight", "b_in": "fc1.bias", "w_out": "fc2.weight", "b_out": "fc2.bias"}
                for e in range(E):
                    out[f"{ex}.{e}.{name[param.removeprefix('experts.')]}"] = t[e].clone()
            continue
        if naming == "qwen1":
            _qwen1_dense(out, rest, t)
        else:
            out[f"model.{rest}"] = t.clone()
    return out


def _qwen1_dense(out: dict, rest: str, t: torch.Tensor) -> None:
    top = {"embed_tokens.weight": "transformer.wte.weight", "norm.weight": "transformer.ln_f.weight"}
    if rest in top:
        out[top[rest]] = t.clone()
        return
    i, sub = re.fullmatch(r"layers\.(\d+)\.(.+)", rest).groups()
    h = f"transformer.h.{i}"
    m = re.fullmatch(r"self_attn\.([qkv])_proj\.(\w+)", sub)
    if m:  # fused q/k/v: filled in three parts
        fused = f"{h}.attn.c_attn.{m.group(2)}"
        parts = out.setdefault(fused, [None, None, None])
        parts["qkv".index(m.group(1))] = t.clone()
        if all(p is not None for p in parts):
            out[fused] = torch.cat(parts, dim=0)
        return
    table = {
        "input_layernorm.weight": "ln_1.weight",
        "post_attention_layernorm.weight": "ln_2.weight",
        "self_attn.o_proj.weight": "attn.c_proj.weight",
        "mlp.gate_proj.weight": "mlp.w2.weight",
        "mlp.up_proj.weight": "mlp.w1.weight",
        "mlp.down_proj.weight": "mlp.c_proj.weight",
    }
    out[f"{h}.{table[sub]}"] = t.clone()


def _moellava_config(model, model_type: str, clip_dir) -> dict:
    text = model.config.text_config.to_dict()
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["rope_theta"]
    if model_type == "moe_llava_stablelm":  # StableLM's remote-code names
        text["rope_pct"] = rope["partial_rotary_factor"]
        text["norm_eps"] = text.pop("layer_norm_eps")
    elif model_type == "moe_llava_phi":
        text["partial_rotary_factor"] = rope["partial_rotary_factor"]
    elif model_type == "moe_llava_qwen":  # Qwen-1 names
        text = {
            "hidden_size": text["hidden_size"],
            "intermediate_size": 2 * text["intermediate_size"],
            "num_attention_heads": text["num_attention_heads"],
            "num_hidden_layers": text["num_hidden_layers"],
            "vocab_size": text["vocab_size"],
            "layer_norm_epsilon": text["rms_norm_eps"],
            "rotary_emb_base": text["rope_theta"],
            "rotary_pct": 1.0,
            "seq_length": 2048,
            "kv_channels": text["hidden_size"] // text["num_attention_heads"],
            "no_bias": True,
        }
    text.pop("model_type", None)
    return {
        **text,
        "model_type": model_type,
        "architectures": ["MoELLaVAForCausalLM"],
        "mm_image_tower": str(clip_dir),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "moe": {
            "moe_enable": True,
            "moe_mode": "sparse",
            "moe_layers_idx": list(MOE_LAYERS),
            "ep_size": 1,
            "top_k_experts": 2,
            "capacity_factor": 1.5,
            "eval_capacity_factor": 2.0,
            "min_capacity": 0,
            "use_residual": False,
            "router_aux_loss_coef": 0.01,
            "num_experts": [4, 4],
            "train_modules": ["fc1", "fc2", "gate_proj", "up_proj", "down_proj", "wg"],
        },
    }


def make_source(tmp_path, backbone: str, model_type: str, naming: str, *, shards: int = 1, tokenizer=True):
    """(model, folder): a MoE-LLaVA checkpoint folder holding ``model``'s tensors under MoE-LLaVA's names."""
    model = source_model(backbone)
    clip_dir = tmp_path / "clip"
    tower = CLIPVisionModel(model.config.vision_config)
    tower.load_state_dict(model.model.vision_tower.state_dict())
    tower.save_pretrained(clip_dir)
    src = tmp_path / "moe_llava"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_moellava_config(model, model_type, clip_dir)))
    state = _moellava_state(model, naming)
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry these
    keys = sorted(state)
    if shards == 1:
        torch.save(state, src / "pytorch_model.bin")
    else:
        weight_map = {}
        for s in range(shards):
            name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            part = {k: state[k] for k in keys[s::shards]}
            torch.save(part, src / name)
            weight_map.update(dict.fromkeys(part, name))
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer:
        source_tokenizer().save_pretrained(src)
    return model, src


QWEN1_TOKENIZER_CONFIG = {  # what Qwen-1 folders ship: the tokenizer is remote code (tiktoken)
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    "tokenizer_class": "QWenTokenizer",
}


def write_qwen1_tokenizer(src) -> None:
    """Qwen-1's tokenizer files, with a tokenization module that fails to import as it does here
    (tiktoken is not installed)."""
    (src / "tokenizer_config.json").write_text(json.dumps(QWEN1_TOKENIZER_CONFIG))
    (src / "tokenization_qwen.py").write_text("import tiktoken  # noqa\n")
    (src / "qwen.tiktoken").write_text("")


def test_qwen1_remote_tokenizer_needs_a_flag_or_a_fast_tokenizer(tmp_path, capsys):
    from stgc.cli import main

    _, src = make_source(tmp_path, "qwen2", "moe_llava_qwen", "qwen1", tokenizer=False)
    write_qwen1_tokenizer(src)
    out = tmp_path / "converted"
    capsys.readouterr()  # the fixture's progress bars
    assert main(["convert", str(src), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "remote code (tokenization_qwen.QWenTokenizer)" in line and "--trust-remote-code" in line
    assert "tiktoken" in line and "--tokenizer" in line
    assert main(["convert", str(src), "--out", str(out), "--trust-remote-code"]) == 2
    line = _one_error_line(capsys)
    assert "does not load offline" in line and "tiktoken" in line and "--tokenizer" in line
    assert not out.exists()  # nothing written before the inputs are known to be complete


def test_remote_fast_tokenizer_is_saved_without_its_code(tmp_path):
    """A remote-code tokenizer that loads offline is kept (vocabulary, special tokens), as a plain fast
    tokenizer: the converted checkpoint's processor loads without remote code."""
    from transformers import AutoProcessor

    _, src = make_source(tmp_path, "stablelm", "moe_llava_stablelm", "hf")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_fixture.FixtureTokenizerFast"]}
    cfg["tokenizer_class"] = "FixtureTokenizerFast"
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src / "tokenization_fixture.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class FixtureTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
    )
    with pytest.raises(ValueError, match="--trust-remote-code"):
        convert_moe_llava(src, tmp_path / "refused")
    out = convert_moe_llava(src, tmp_path / "converted", trust_remote_code=True)
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    processor = AutoProcessor.from_pretrained(out)
    expected = source_tokenizer()
    assert processor.tokenizer("USER : red square").input_ids == expected("USER : red square").input_ids


@pytest.mark.parametrize(
    "backbone,model_type,naming,shards",
    [
        ("stablelm", "moe_llava_stablelm", "hf", 1),
        ("phi", "moe_llava_phi", "hf", 2),
        ("qwen2", "moe_llava_qwen", "qwen1", 1),
    ],
)
def test_convert_roundtrip(tmp_path, backbone, model_type, naming, shards):
    """Every tensor and the logits equal the model the synthetic checkpoint was made from; the folder holds
    the processor MoE-LLaVA's protocol needs (Qwen-1 through a fast tokenizer of the same vocabulary)."""
    from transformers import AutoProcessor

    from stgc.data.chat_templates import MOELLAVA_SYSTEM

    model, src = make_source(tmp_path, backbone, model_type, naming, shards=shards, tokenizer=naming == "hf")
    kwargs = {}
    if naming == "qwen1":
        write_qwen1_tokenizer(src)
        source_tokenizer().save_pretrained(tmp_path / "qwen_fast")
        kwargs = {"tokenizer_path": tmp_path / "qwen_fast"}
    out = convert_moe_llava(src, tmp_path / "converted", **kwargs)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    loaded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.moe_config.layers == MOE_LAYERS and loaded.config.moe_config.capacity_factor is None
    assert loaded.config.image_token_id == model.config.image_token_id
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    batch = image_batch(model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, model(**batch).logits)

    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    assert loaded.generation_config.eos_token_id == tok.eos_token_id
    assert processor.image_processor.do_pad  # the source config says image_aspect_ratio: pad
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat color?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == f"{MOELLAVA_SYSTEM} USER: <image>\nWhat color? ASSISTANT:"
    conversion = json.loads((out / "conversion.json").read_text())
    assert conversion["chat_template"] == f"moellava_{'qwen' if naming == 'qwen1' else backbone}"
    assert conversion["image_aspect_ratio"] == "pad"


def test_image_aspect_ratio_from_the_source_config(tmp_path, capsys):
    """`square` gives CLIP's resize + centre crop; a config without the key is one line and exit 2 unless
    --image-aspect-ratio says it."""
    from transformers import AutoProcessor

    from stgc.cli import main

    _, src = make_source(tmp_path, "phi", "moe_llava_phi", "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["image_aspect_ratio"] = "square"
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert_moe_llava(src, tmp_path / "square")
    assert not AutoProcessor.from_pretrained(out).image_processor.do_pad
    del cfg["image_aspect_ratio"]
    (src / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # the conversions' progress bars
    assert main(["convert", str(src), "--out", str(tmp_path / "none")]) == 2
    line = _one_error_line(capsys)
    assert "no image_aspect_ratio" in line and "--image-aspect-ratio pad" in line
    assert not (tmp_path / "none").exists()
    assert main(["convert", str(src), "--out", str(tmp_path / "pad"), "--image-aspect-ratio", "pad"]) == 0
    assert AutoProcessor.from_pretrained(tmp_path / "pad").image_processor.do_pad


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_convert_reproduce_moellava_routing(tmp_path):
    """MoE-LLaVA's routing: DeepSpeed's capacity factors (training and evaluation where the config has
    both fields, else the evaluation one), Gumbel 2nd expert, padding routed."""
    import dataclasses

    from stgc.config import MoEConfig

    model, src = make_source(tmp_path, "stablelm", "moe_llava_stablelm", "hf")
    out = convert_moe_llava(src, tmp_path / "converted", reproduce_moellava_routing=True)
    cfg = json.loads((out / "config.json").read_text())["moe"]
    if "eval_capacity_factor" in {f.name for f in dataclasses.fields(MoEConfig)}:
        assert cfg["capacity_factor"] == 1.5 and cfg["eval_capacity_factor"] == 2.0
    else:
        assert cfg["capacity_factor"] == 2.0
    assert cfg["min_capacity"] == 0
    assert cfg["second_expert_sampling"] and cfg["sample_at_eval"] and cfg["route_padding"]


def test_wrong_key_set_is_an_error(tmp_path):
    _, src = make_source(tmp_path, "phi", "moe_llava_phi", "hf")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    del state["model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight"]
    state["model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.4.fc1.weight"] = torch.zeros(1)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(
        ValueError, match=r"1 missing .*deepspeed_experts\.3\.fc1.*1 unexpected .*deepspeed_experts\.4"
    ):
        convert_moe_llava(src, tmp_path / "converted")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    _, src = make_source(tmp_path, "stablelm", "moe_llava_stablelm", "hf")
    torch.save({"model.embed_tokens.weight": _RunsCode()}, src / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="refusing to load"):
        convert_moe_llava(src, tmp_path / "converted")
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_unknown_model_type(tmp_path):
    _, src = make_source(tmp_path, "llama", "moe_llava_llama", "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "moe_llava_mamba"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"moe_llava_mamba.*moe_llava_phi"):
        convert_moe_llava(src, tmp_path / "converted")


def test_convert_cli(tmp_path, capsys):
    from stgc.cli import main

    model, src = make_source(tmp_path, "stablelm", "moe_llava_stablelm", "hf")
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists() and "converted" in capsys.readouterr().out
