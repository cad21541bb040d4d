"""The MoE-LLaVA transformers model: upcycling, checkpoints, routing outputs, padding, generation, sizes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from stgc.backbones import BACKBONES
from stgc.config import MoEConfig
from stgc.modeling import (
    MODALITY_IMAGE,
    MODALITY_TEXT,
    MoELlavaConfig,
    MoELlavaForConditionalGeneration,
    build_model,
    build_processor,
)
from stgc.moe import MoEBlock, RoutingContext
from tests.conftest import image_batch, make_tokenizer, tiny_dense_llava, tiny_model

ALL_BACKBONES = sorted(BACKBONES)


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_upcycled_logits_equal_dense_parent(backbone):
    """Sparse upcycling at step 0 computes the dense parent's function (fp32), images included."""
    dense = tiny_dense_llava(backbone)
    with torch.no_grad():  # a peaked router: the routing must not matter when all experts are equal
        moe = MoELlavaForConditionalGeneration.from_dense(dense, MoEConfig(), {"name": "baseline"}).eval()
        for block in moe.moe_blocks.values():
            block.router.weight.normal_()
        batch = image_batch(dense)
        torch.testing.assert_close(moe(**batch).logits, dense(**batch).logits, rtol=0, atol=1e-5)
    assert moe.config.moe_layers == (0, 2)
    assert all(isinstance(moe.model.language_model.layers[i].mlp, MoEBlock) for i in (0, 2))
    assert not isinstance(moe.model.language_model.layers[1].mlp, MoEBlock)
    assert moe.model.language_model.layers[0].mlp.router.weight.dtype == torch.float32
    # copies, not views: training the MoE model must leave the parent alone
    assert moe.lm_head.weight.data_ptr() != dense.lm_head.weight.data_ptr()


@pytest.mark.parametrize("backbone", ["phi", "stablelm"])
def test_save_load_roundtrip(tmp_path, backbone):
    """safetensors under the in-memory names, no missing/unexpected keys, identical weights and logits,
    config (MoE settings, routing method) round-trip; bf16 loading keeps the routers fp32."""
    model = tiny_model(backbone, layers=(1, 3), capacity_factor=2.0)
    model.config.routing_method = {"name": "stgc", "beta": 0.01}
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    assert not list(tmp_path.glob("*.bin"))
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, MoELlavaForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.config.moe_config == MoEConfig(layers=(1, 3), capacity_factor=2.0)
    assert loaded.config.routing_method == {"name": "stgc", "beta": 0.01}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "stgc_moe_llava"
    batch = image_batch(model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, model(**batch).logits)
    half = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16)
    block = half.moe_blocks[1]
    assert block.router.weight.dtype == torch.float32 and block.experts.w_in.dtype == torch.bfloat16


def test_router_settings_round_trip_and_route_evaluation_as_saved(tmp_path):
    """The router's own settings (a bias, the evaluation capacity factor) are in config.json: the reloaded
    model routes exactly as the saved one, in training and evaluation mode."""
    settings = dict(
        router={"name": "softmax_topk", "bias": True}, capacity_factor=1.0, eval_capacity_factor=2.0
    )
    model = tiny_model("llama", **settings)
    with torch.no_grad():
        for block in model.moe_blocks.values():
            block.router.bias.normal_()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.config.moe_config == MoEConfig(**settings)
    assert loaded.moe_blocks[0].router.bias is not None
    batch = image_batch(model)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(loaded, mode)()
        with torch.no_grad():
            a = model(**batch, output_routing=True).routing_records
            b = loaded(**batch, output_routing=True).routing_records
        for ra, rb in zip(a, b, strict=True):
            assert torch.equal(ra.topk_idx_TK, rb.topk_idx_TK) and torch.equal(ra.kept_TK, rb.kept_TK)
            torch.testing.assert_close(ra.weights_TK, rb.weights_TK)


def test_checkpoints_written_before_routers_and_objectives_still_load(tmp_path):
    """A config.json of the layout before this refactor (no router / experts / implementation /
    eval_capacity_factor in ``moe``, the flat routing method) loads with the default router and bank and
    routes as it did."""
    model = tiny_model("llama", capacity_factor=2.0)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("router", "experts", "implementation", "eval_capacity_factor"):
        cfg["moe"].pop(key)
    cfg["routing_method"] = {"name": "stgc", "beta": 0.05, "mode": "fused"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.config.moe_config == MoEConfig(capacity_factor=2.0)
    from stgc.objectives.config import objective_params

    assert objective_params(loaded.config.routing_method, "stgc")["beta"] == 0.05
    batch = image_batch(model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, model.eval()(**batch).logits)


def test_processor_saved_with_checkpoint(tmp_path):
    """AutoProcessor loads the processor saved next to the model; <image> expands to the tower's tokens."""
    from PIL import Image

    tok = make_tokenizer()
    model = tiny_model("llama")
    vision = model.config.vision_config  # tiny: 48 px, patch 16 -> 9 image tokens
    proc = build_processor(tok, image_size=vision.image_size, patch_size=vision.patch_size)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (40, 50), (200, 10, 10))
    inputs = loaded(images=[image], text=["<image> what color is the square ?"], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 48, 48)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 9
    with torch.no_grad():
        out = model(**inputs, output_routing=True)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    with pytest.raises(ValueError, match="<image>"):
        build_processor(make_tokenizer(with_image=False), 32, 8)


def test_routing_outputs():
    """Records come back when asked (one per MoE layer, execution order), aux_loss is their unscaled sum,
    the loss stays the pure LM loss, nothing is recorded at evaluation unless asked."""
    model = tiny_model("qwen2")
    batch = image_batch(model)
    labels = batch["input_ids"].clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {i: sorted(b.__dict__) for i, b in model.moe_blocks.items()}
    with torch.no_grad():
        out = model(**batch, labels=labels, output_routing=True)
        plain = model(**batch, labels=labels)
    # evaluation leaves nothing behind in the model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert attrs == {i: sorted(b.__dict__) for i, b in model.moe_blocks.items()}
    assert all(b.routing_ctx is None for b in model.moe_blocks.values())
    assert [r.layer_idx for r in out.routing_records] == [0, 2]
    torch.testing.assert_close(out.aux_loss, sum(r.aux_loss for r in out.routing_records))
    assert plain.aux_loss is None and plain.routing_records is None
    logits = plain.logits[:, :-1].reshape(-1, plain.logits.shape[-1])
    lm = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm)
    torch.testing.assert_close(plain.loss, lm)
    model.train()
    train_out = model(**batch, labels=labels)
    assert train_out.aux_loss is not None and train_out.aux_loss.requires_grad
    assert train_out.routing_records is None
    (train_out.loss + 0.01 * train_out.aux_loss).backward()
    assert model.moe_blocks[0].router.weight.grad is not None


def test_external_routing_context():
    """A caller's context receives the records and is not mutated; modality codes mark image tokens."""
    model = tiny_model("llama")
    batch = image_batch(model)
    seen = []

    class Observer:
        def __call__(self, record, grads):
            seen.append(record.layer_idx)
            return None

    ctx = RoutingContext(records=[], observer=Observer())
    model.train()
    out = model(**batch, routing_ctx=ctx, output_routing=True)
    assert ctx.token_mask_BT is None and ctx.modality_BT is None
    assert [r.layer_idx for r in ctx.records] == [0, 2]
    assert out.routing_records == ctx.records
    out.logits.sum().backward()
    assert sorted(seen) == [0, 2]
    assert all(b.routing_ctx is None for b in model.moe_blocks.values())
    # modality codes
    captured = {}
    orig = MoEBlock.forward

    def spy(self, hidden_states):
        captured.setdefault("modality", self.routing_ctx.modality_BT)
        return orig(self, hidden_states)

    MoEBlock.forward = spy
    try:
        with torch.no_grad():
            model.eval()(**batch)
    finally:
        MoEBlock.forward = orig
    n_img = model.config.image_seq_length
    assert (captured["modality"][:, :n_img] == MODALITY_IMAGE).all()
    assert (captured["modality"][:, n_img:] == MODALITY_TEXT).all()


def test_padding_changes_no_routing_statistic():
    """Extra right padding: same aux loss, same tokens per expert, same logits on real tokens."""
    model = tiny_model("stablelm")
    short = image_batch(model)
    padded = image_batch(model, pad_right=5)
    with torch.no_grad():
        a = model(**short, output_routing=True)
        b = model(**padded, output_routing=True)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=0, atol=1e-6)
    for ra, rb in zip(a.routing_records, b.routing_records, strict=True):
        assert torch.equal(ra.tokens_per_expert_E, rb.tokens_per_expert_E)
        assert int(rb.token_mask_T.sum()) == ra.token_mask_T.numel()
    S = short["input_ids"].shape[1]
    torch.testing.assert_close(b.logits[:, :S], a.logits, rtol=0, atol=1e-5)


def test_generate_with_cache_equals_greedy_without_cache():
    """generate() (KV cache: decode steps of one token) == greedy decoding by full forwards."""
    model = tiny_model("phi", seed=3)
    batch = image_batch(model, batch=2, text_len=4)
    image_id = model.config.image_token_id
    n_new = 4
    with torch.no_grad():
        gen = model.generate(
            **batch, max_new_tokens=n_new, do_sample=False, suppress_tokens=[image_id], output_routing=True
        )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(n_new):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits[
                :, -1
            ]
            logits[:, image_id] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    assert torch.equal(gen, ids)


def test_left_padded_generation_runs():
    """Batched generation with left padding: the decode-step token mask is the mask's last column."""
    model = tiny_model("llama")
    batch = image_batch(model, batch=2)
    pad = model.config.text_config.pad_token_id
    ids = torch.cat([torch.full((2, 2), pad), batch["input_ids"]], dim=1)
    mask = torch.cat([torch.zeros(2, 2, dtype=torch.long), batch["attention_mask"]], dim=1)
    mask[1, :2] = 1
    ids[1, :2] = 7
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=batch["pixel_values"],
            max_new_tokens=3,
            do_sample=False,
            suppress_tokens=[model.config.image_token_id],
        )
    assert out.shape == (2, ids.shape[1] + 3)


def test_bad_configs_name_value_and_range():
    tok = make_tokenizer()
    kw = dict(vocab_size=len(tok), image_token_id=4, pad_token_id=0)
    with pytest.raises(ValueError, match=r"backbone='gpt2'.*llama.*phi.*qwen2.*stablelm"):
        build_model("gpt2", "tiny", moe=MoEConfig(), **kw)
    with pytest.raises(ValueError, match=r"size='huge'.*small.*tiny"):
        build_model("llama", "huge", moe=MoEConfig(), **kw)
    with pytest.raises(ValueError, match=r"\[4\].*4 decoder layers.*0\.\.3"):
        build_model("llama", "tiny", moe=MoEConfig(layers=(0, 4)), **kw)
    with pytest.raises(ValueError, match=r"top_k=3.*num_experts=2"):
        build_model("llama", "tiny", moe=MoEConfig(num_experts=2, top_k=3), **kw)
    with pytest.raises(ValueError, match=r"image_token_id=999"):
        build_model("llama", "tiny", moe=MoEConfig(), **{**kw, "image_token_id": 999})
    llava_cfg = tiny_dense_llava("llama").config.to_dict()
    llava_cfg["text_config"] = {"model_type": "gpt2"}
    llava_cfg.pop("model_type")
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*valid model types"):
        MoELlavaConfig(**llava_cfg)


@pytest.mark.parametrize(
    "backbone,size,total_b,active_b",
    [
        # MoE-LLaVA (Table 1) counts LM + projector: 2.9B/2.0B, 3.1B/2.2B, 5.3B/3.6B; + CLIP-L (0.3B) here
        ("stablelm", "full", 3.2, 2.37),
        ("qwen2", "full", 3.36, 2.55),
        ("phi", "full", 5.61, 3.93),
        ("llama", "small", 0.10, 0.075),
    ],
)
def test_size_registry_parameter_counts(backbone, size, total_b, active_b):
    """The registry's sizes, built on the meta device (nothing allocated), have the expected counts."""
    with torch.device("meta"):
        model = build_model(
            backbone,
            size,
            vocab_size=8000 if size == "small" else None,
            image_token_id=5,
            pad_token_id=0,
            moe=MoEConfig(),
        )
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for b in model.moe_blocks.values() for p in b.experts.parameters())
    active = total - experts * (4 - 2) // 4
    assert total / 1e9 == pytest.approx(total_b, rel=0.02)
    assert active / 1e9 == pytest.approx(active_b, rel=0.02)
    if size == "full":
        assert model.config.image_seq_length == 576
        assert model.config.vision_feature_layer == -2


def test_activation_checkpointing_routes_like_the_forward():
    """With activation checkpointing the recomputed layers see this forward's mask and observer: the same
    gradients as without it (padding included), the observer called once per layer, no duplicate records."""
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model("llama", seed=1).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        batch = image_batch(model, pad_right=3)
        seen = []

        def observer(record, grads, seen=seen):
            seen.append(record.layer_idx)

        ctx = RoutingContext(records=[], observer=observer)
        out = model(**batch, labels=batch["input_ids"], routing_ctx=ctx)
        (out.loss + 0.01 * out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        calls.append((sorted(seen), len(ctx.records)))
    assert calls[0] == calls[1] == ([0, 2], 2)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6)
