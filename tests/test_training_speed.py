"""The train stage's speed levers change how fast it runs, never what it computes."""

from __future__ import annotations

import pytest


def _batch(tok, n=6, seed=0):
    import random

    import torch

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = tok("### Instruction:\nRepeat the colors exactly.\n\n### Response:\n")["input_ids"]
        target = tok(" ".join(rng.choice(["red", "blue", "green"]) for _ in range(rng.randint(1, 9))),
                     add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt, target))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((n, width), tok.pad_token_id)
    labels = torch.full((n, width), -100)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, (p, t) in enumerate(rows):
        ids[r, :len(p) + len(t)] = torch.tensor(p + t)
        labels[r, len(p):len(p) + len(t)] = torch.tensor(t)
        mask[r, :len(p) + len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("lora,split,pack", [(False, True, False), (True, True, False), (True, False, False),
                                             (False, False, True), (True, False, True)])
def test_label_only_head_loss_and_gradients_equal_the_plain_forward(models, lora, split, pack, monkeypatch):
    import torch

    import verifily_train.training.loss as loss_module

    monkeypatch.setitem(loss_module.GROUP_COST_TOKENS, "cpu", 0)  # split even the fixture's small length spread
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verifily_train.training.loss import label_position_loss, supports_label_only_head

    tok = AutoTokenizer.from_pretrained(models["llama"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    assert supports_label_only_head(model)
    batch = _batch(tok)
    if pack:  # the packed path runs through the stage's attention function
        from verifily_train.model.attention import use_fp32_attention
        from verifily_train.training.loss import can_pack, unwrap_causal_lm

        assert use_fp32_attention(unwrap_causal_lm(model))
        assert can_pack(unwrap_causal_lm(model), batch["input_ids"], batch["attention_mask"])
    if split:
        lengths = batch["attention_mask"].sum(1).tolist()
        assert len(loss_module.length_groups(lengths, loss_module.group_cost_for("cpu"))) > 1
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    for num_items in (None, torch.tensor(n_items + 7)):
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        model.zero_grad()
        plain = model(**batch, **kwargs).loss
        plain.backward()
        plain_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        fast = label_position_loss(model, batch, num_items, split_by_length=split, pack=pack)
        fast.backward()
        fast_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        assert torch.allclose(plain, fast, rtol=1e-5, atol=1e-6)
        for a, b in zip(plain_grads, fast_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_models_with_capped_logits_keep_the_plain_forward():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from verifily_train.training.loss import supports_label_only_head

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert not supports_label_only_head(Gemma2ForCausalLM(config))


def test_length_grouped_order_is_a_seeded_permutation_with_little_padding():
    import random

    from verifily_train.training.batching import LengthGroupedSampler, length_grouped_order, padding_fraction

    rng = random.Random(3)
    lengths = [int(rng.lognormvariate(3.5, 0.7)) + 4 for _ in range(500)]
    order = length_grouped_order(lengths, 8, seed=1)
    assert sorted(order) == list(range(500))
    assert order == length_grouped_order(lengths, 8, seed=1)
    assert order != length_grouped_order(lengths, 8, seed=2)
    shuffled = list(range(500))
    random.Random(1).shuffle(shuffled)
    assert padding_fraction(lengths, order, 8) < 0.1 < padding_fraction(lengths, shuffled, 8)
    # batches are shuffled, not run longest-to-shortest
    firsts = [lengths[order[i]] for i in range(0, 80, 8)]
    assert firsts != sorted(firsts, reverse=True)
    sampler = LengthGroupedSampler(lengths, 8, seed=1)
    sampler.set_epoch(1)
    assert list(iter(sampler)) == length_grouped_order(lengths, 8, seed=2)


def _tiny_family(family: str, sliding_window=None):
    """A 2-layer model of one label-only family (GQA: 4 query heads, 2 key/value heads), built from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if family in ("mistral", "qwen2"):
        kwargs["sliding_window"] = sliding_window
    if family == "qwen3":
        kwargs["head_dim"] = 8
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **kwargs)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def _random_batch(rows=5, width=23, vocab=96, seed=0):
    """Right-padded rows of skewed lengths, the first few positions of each a prompt (labels -100)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = [width, 4, 17, 9, 1][:rows]
    ids = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), -100)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(1, vocab, (n,), generator=generator)
        mask[r, :n] = 1
        labels[r, n // 3:n] = ids[r, n // 3:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"])
def test_packed_rows_give_every_label_only_familys_loss_and_gradients(family):
    """Packing is exact for each family the label-only head serves: no token sees another row's, and the
    rotary positions restart per row (a length-1 row and a full-width row included)."""
    import torch

    from verifily_train.model.attention import use_fp32_attention
    from verifily_train.training.loss import can_pack, label_position_loss, supports_label_only_head

    model = _tiny_family(family)
    assert supports_label_only_head(model)
    batch = _random_batch()
    model.train()
    plain = model(**batch).loss
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    assert use_fp32_attention(model) and can_pack(model, batch["input_ids"], batch["attention_mask"])
    packed = label_position_loss(model, batch, pack=True)
    packed_grads = torch.autograd.grad(packed, list(model.parameters()))
    assert torch.allclose(plain, packed, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain_grads, packed_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rows_are_not_packed_where_the_mask_would_need_more_than_rows_and_causality():
    from verifily_train.model.attention import use_fp32_attention
    from verifily_train.training.loss import can_pack

    batch = _random_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    windowed = _tiny_family("mistral", sliding_window=8)  # a window shorter than the batch
    assert use_fp32_attention(windowed) and not can_pack(windowed, ids, mask)
    model = _tiny_family("llama")
    assert not can_pack(model, ids, mask)  # plain SDPA: the packed rows would attend to each other
    assert use_fp32_attention(model) and can_pack(model, ids, mask)
    assert not can_pack(model, ids.flip(1), mask.flip(1))  # left padding
    assert not can_pack(model, ids[:1], mask[:1])  # one row: nothing to pack


def test_length_groups_cover_the_batch_and_cut_padding():
    from verifily_train.training.loss import length_groups

    lengths = [40, 200, 35, 190, 45, 38, 210, 42]
    groups = length_groups(lengths, group_cost=24)
    assert sorted(i for g in groups for i in g) == list(range(8))
    padded = sum(max(lengths[i] for i in g) * len(g) for g in groups)
    assert 1 < len(groups) < 8 and padded < max(lengths) * len(lengths) * 0.7
    assert length_groups([50] * 8, group_cost=24) == [list(range(8))]


def _train_bf16(models, sft_splits, work, frozen_in_compute_dtype, save_adapter_only=True, **levers):
    """The real train stage (bf16 autocast on the CPU) on the fixture Llama; returns (manifest, adapter tensors)."""
    from safetensors.torch import load_file

    from verifily_train.config import load_config
    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.pipeline.runner import run_uncached
    from verifily_train.model.device import DevicePlan
    from verifily_train.model.loading import load_tokenizer
    from verifily_train.training.speed import Levers
    from verifily_train.training.trainer import train_adapter

    cfg = load_config(None, ["task=sft", f"base_model={models['llama']}", f"data_paths.train={sft_splits['train']}",
                             f"data_paths.test={sft_splits['test']}", "training.max_steps=4", "training.batch_size=4",
                             "training.logging_steps=1",
                             "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                             f"output.save_adapter_only={str(save_adapter_only).lower()}", "runtime.progress=false"])
    fp = fingerprint_stage(cfg, work / "cache")
    tokenized = run_uncached("tokenize", cfg, fp, work / "tok", work)
    spec = fp.model_spec
    out = work / f"out-{frozen_in_compute_dtype}"
    manifest = train_adapter(cfg, spec, load_tokenizer(spec), tokenized, work / "tok", DevicePlan("cpu", "bf16"),
                             out, work / f"w-{frozen_in_compute_dtype}",
                             fast=Levers(frozen_in_compute_dtype=frozen_in_compute_dtype, **levers))
    return manifest, load_file(out / "adapter" / "adapter_model.safetensors"), out


def test_frozen_weights_held_in_bf16_train_the_same_adapter_bit_for_bit(models, sft_splits, tmp_path):
    """Autocast casts a frozen fp32 weight on every forward; holding it in bf16 gives the very same operands."""
    import torch

    cast, cast_weights, _ = _train_bf16(models, sft_splits, tmp_path, False)
    held, held_weights, _ = _train_bf16(models, sft_splits, tmp_path, True)
    assert cast["frozen_linears_in_compute_dtype"] == 0
    assert held["frozen_linears_in_compute_dtype"] == 2 * 7 + 1  # 2 layers x 7 projections + the untied head
    assert held["train_loss"] == cast["train_loss"]
    assert cast_weights.keys() == held_weights.keys()
    for name in cast_weights:
        assert torch.equal(cast_weights[name], held_weights[name]), name


def test_lean_steps_train_the_same_adapter_bit_for_bit(models, sft_splits, tmp_path):
    """Counting flops once, clipping over the trainable parameters only and freezing long-lived objects out of
    the garbage collector change the Trainer's bookkeeping, never a loss, a gradient norm or a weight."""
    import json

    import torch

    plain, plain_weights, plain_out = _train_bf16(models, sft_splits, tmp_path / "plain", True, lean_steps=False)
    lean, lean_weights, lean_out = _train_bf16(models, sft_splits, tmp_path / "lean", True)
    assert plain["lean_steps"] is False and lean["lean_steps"] is True
    assert lean["train_loss"] == plain["train_loss"]
    for name in plain_weights:
        assert torch.equal(plain_weights[name], lean_weights[name]), name

    def logged(out):
        lines = (out / "trainer_log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("train_runtime", "train_samples_per_second",
                                                                        "train_steps_per_second")} for line in lines]
    assert logged(lean_out) == logged(plain_out)  # losses, gradient norms and total_flos, step by step


def test_merged_model_is_merged_into_the_fp32_base(models, sft_splits, tmp_path):
    """output.save_adapter_only: false must not save the bf16 copies the training held."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, out = _train_bf16(models, sft_splits, tmp_path, True, save_adapter_only=False)
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_cached_head_cast_gives_the_same_loss_and_gradients(models, monkeypatch):
    """A tied (fp32) head is cast to bf16 once and reused: the loss and gradients equal autocast's own cast."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import verifily_train.training.loss as loss_module

    tok = AutoTokenizer.from_pretrained(models["llama"])
    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    batch = _batch(tok)

    def loss_and_grad():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_module.label_position_loss(model, batch)
        loss.backward()
        return loss.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone()

    cached = [loss_and_grad() for _ in range(2)]
    assert loss_module._HEAD_CASTS[model.lm_head][1].dtype == torch.bfloat16
    monkeypatch.setattr(loss_module, "_autocast_head_weight", lambda head: None)
    plain = loss_and_grad()
    for loss, grad in cached:
        assert torch.equal(loss, plain[0]) and torch.equal(grad, plain[1])
    monkeypatch.undo()
    with torch.no_grad():  # a changed weight is cast again, not served stale
        model.lm_head.weight.mul_(0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recast = loss_module._autocast_head_weight(model.lm_head)
    assert torch.equal(recast, model.lm_head.weight.to(torch.bfloat16))


def test_fp32_attention_on_cpu_bf16_masks_padding_and_matches_fp32_attention(models):
    """Under CPU bf16 autocast the attention runs in fp32 (training.attention); left-padded batches must still
    mask their padding (a custom attention gets no mask unless one is registered) and agree with SDPA in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from verifily_train.model.attention import NAME, for_plan

    torch.manual_seed(0)
    ids = torch.randint(4, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as batched generation has it
    plain = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    patched = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    assert not for_plan(patched, "cpu", "fp32") and not for_plan(patched, "cuda", "bf16")
    assert for_plan(patched, "cpu", "bf16") and patched.config._attn_implementation == NAME
    with torch.no_grad():
        reference = plain(input_ids=ids, attention_mask=mask).logits  # fp32 everywhere
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = patched(input_ids=ids, attention_mask=mask).logits.float()
            bf16_sdpa = plain(input_ids=ids, attention_mask=mask).logits.float()
        # row 1's real tokens must not see its padding: same logits as the row alone, unpadded
        alone = plain(input_ids=ids[1:, 4:]).logits
    real = mask.bool()
    assert torch.allclose(ours[real], reference[real], atol=0.05, rtol=0.05)
    assert (ours[real] - reference[real]).abs().max() <= (bf16_sdpa[real] - reference[real]).abs().max() * 1.5 + 1e-3
    assert torch.allclose(reference[1, 4:], alone[0], atol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours_alone = patched(input_ids=ids[1:, 4:]).logits.float()
    assert torch.allclose(ours[1, 4:], ours_alone[0], atol=0.05)


def test_cpu_attention_under_autocast_is_fp32_math_equal_to_fp32_sdpa(monkeypatch):
    """The CPU bf16 attention: fp32 products and softmax (short sequences) or fp32 SDPA (long ones), both equal
    to SDPA in fp32, forward and backward: boolean padding masks, no mask (causal), additive masks, grouped
    key/value heads; and taken when autocast hands it an fp32 query and key (rotary embeddings) with a
    bf16 value, where it once fell through to SDPA in bf16."""
    import types

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from verifily_train.model import attention

    torch.manual_seed(0)
    b, heads, groups, t, d = 3, 4, 2, 11, 16
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=groups)
    lengths = torch.tensor([11, 7, 4])
    padding = torch.arange(t)[None, :] < lengths[:, None]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    boolean = causal[None, None] & padding[:, None, None, :]
    additive = torch.zeros(b, 1, t, t).masked_fill(~boolean, torch.finfo(torch.float32).min)
    rows = padding[:, None, :, None].expand(b, heads, t, d)  # queries that are real tokens

    def run(fn, mask, q_dtype, v_dtype, autocast):
        q = torch.randn(b, heads, t, d, generator=torch.Generator().manual_seed(1)).to(q_dtype).requires_grad_()
        k = torch.randn(b, heads // groups, t, d, generator=torch.Generator().manual_seed(2)).to(q_dtype).requires_grad_()
        v = torch.randn(b, heads // groups, t, d, generator=torch.Generator().manual_seed(3))
        v = v.to(torch.bfloat16).to(v_dtype).requires_grad_()  # bf16 values, in the dtype given
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(module, q, k, v, mask, dropout=0.0, scaling=d ** -0.5, use_cache=False)[0]
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        (out.float() * grad * rows.transpose(1, 2)).sum().backward()
        return out.float(), [x.grad.float() for x in (q, k, v)]

    for mask in (boolean, None, additive):
        ref_out, ref_grads = run(sdpa_attention_forward, mask, torch.float32, torch.float32, False)
        for limit in (attention.EAGER_MAX_SCORES, 0):  # the plain products, then SDPA in fp32
            monkeypatch.setattr(attention, "EAGER_MAX_SCORES", limit)
            out, grads = run(attention.sdpa_fp32_on_cpu, mask, torch.bfloat16, torch.bfloat16, True)
            real = rows.transpose(1, 2)
            # inputs rounded to bf16 on the way in, the output on the way out: compare at bf16 precision
            assert torch.allclose(out[real], ref_out[real], atol=3e-2), (mask is None, limit)
            for g, r in zip(grads, ref_grads):
                assert torch.allclose(g, r, atol=5e-2), (mask is None, limit)
    # autocast's rotary case: fp32 query and key, bf16 value. fp32 math gives the fp32 answer, rounded once to
    # bf16 on the way out; SDPA under autocast (what ran before) rounds its inputs and products to bf16 too.
    monkeypatch.setattr(attention, "EAGER_MAX_SCORES", 8 * 2 ** 20)
    exact, _ = run(sdpa_attention_forward, boolean, torch.float32, torch.float32, False)
    ours, _ = run(attention.sdpa_fp32_on_cpu, boolean, torch.float32, torch.bfloat16, True)
    bf16_sdpa, _ = run(sdpa_attention_forward, boolean, torch.float32, torch.bfloat16, True)
    real = rows.transpose(1, 2)
    ours_error, bf16_error = ((x[real] - exact[real]).abs() for x in (ours, bf16_sdpa))
    bound = exact[real].abs() * 2 ** -8 + 1e-6  # bf16's rounding of the output
    assert (ours_error <= bound).all() and not (bf16_error <= bound).all()


def test_cheap_dropout_has_dropouts_distribution_and_gradient():
    """LoRA's CPU dropout draws its masks from 16 random bits per element: the same distribution as nn.Dropout
    (drop rate p to 1/65536, kept elements scaled by 1/(1-p)), the mask's gradient, identity in eval mode,
    and a seeded generator repeats it bit for bit."""
    import torch

    from verifily_train.model.lora import _dropout_class

    layer = _dropout_class()(0.05)
    assert abs(layer.p - 0.05) < 1 / 65536
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.95) < 0.001  # 1e6 draws: sd 2e-4
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - layer.p)))
    assert abs(y.mean().item() - 1.0) < 0.002
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum)/dx is the scaled mask
    torch.manual_seed(0)
    assert torch.equal(layer(x), y)
    # rows, columns and the four 16-bit lanes of each random word are all unbiased
    for part in (kept[:, :250], kept[:, 750:], kept[::4], kept[3::4]):
        assert abs(part.float().mean().item() - 0.95) < 0.004
    layer.eval()
    assert layer(x) is x
    assert _dropout_class()(0.0)(x) is x


def test_cheap_dropout_replaces_every_lora_dropout_and_trains_reproducibly(models, sft_splits, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from verifily_train.model.lora import use_cheap_dropout

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models["llama"]),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    assert use_cheap_dropout(model) == 2 * 7
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    first, _, _ = _train_bf16(models, sft_splits, tmp_path / "a", True)
    again, _, _ = _train_bf16(models, sft_splits, tmp_path / "b", True)
    assert first["cheap_dropout_layers"] == 2 * 7 and again["train_loss"] == first["train_loss"]
    # the train stage packed each batch's rows (the CPU, the label-only path): no padding computed
    assert first["packed_rows"] is True and first["padding_fraction"] == 0.0
    assert first["label_rows_last_layers"] == 0  # bf16: the whole last layer (measured no faster at label rows)
    assert first["packed_row_counts"] == "multiple of 64"  # bf16, a small model: padded to a bucket (oneDNN's kernels)
    assert first["dead_tails_cut"] is True  # each row's last token (it predicts nothing) not computed


def test_sub_batch_cost_is_looked_up_by_device_and_autocast_precision(monkeypatch):
    """fp32 on a CPU splits, bf16 autocast on a CPU and GPUs never do; compute_loss reads the autocast state."""
    import torch

    import verifily_train.training.loss as loss_module

    assert loss_module.group_cost_for("cpu") is not None  # fp32 on a CPU splits
    monkeypatch.setitem(loss_module.GROUP_COST_TOKENS, "cpu", 11)
    # no "cpu-fp32" entry: the device's own cost; a device with no entry at all: the default
    assert loss_module.group_cost_for("cpu") == loss_module.group_cost_for("cpu", "fp32") == 11
    assert loss_module.group_cost_for("xpu") == loss_module.DEFAULT_GROUP_COST
    assert loss_module.group_cost_for("cpu", "bf16") is None
    assert loss_module.group_cost_for("cuda", "bf16") is None and loss_module.group_cost_for("cuda") is None
    monkeypatch.setitem(loss_module.GROUP_COST_TOKENS, "cpu-bf16", 7)
    assert loss_module.group_cost_for("cpu", "bf16") == 7
    assert loss_module.autocast_precision("cpu") == "fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss_module.autocast_precision("cpu") == "bf16"


def test_fused_lora_output_computes_peft_forward_and_gradients(models):
    """``addmm(result, h, (scaling * B)^T)`` is PEFT's ``result + B(h) * scaling``: same logits and gradients in
    fp32 (to rounding), PEFT's own path when adapters are disabled or merged."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verifily_train.model.lora import use_fused_lora_output

    tok = AutoTokenizer.from_pretrained(models["llama"])
    batch = _batch(tok)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM"))

    def run():
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    peft_logits, peft_grads = run()
    with torch.no_grad(), model.disable_adapter():
        peft_base = model(**batch).logits
    fused_layers = use_fused_lora_output(model)
    assert fused_layers == sum(1 for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    fused_logits, fused_grads = run()
    torch.testing.assert_close(fused_logits, peft_logits, rtol=1e-5, atol=1e-5)
    for fused, peft in zip(fused_grads, peft_grads):
        torch.testing.assert_close(fused, peft, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, peft_base)
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, peft_logits, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_compute_the_eager_forward_and_gradients_in_one_graph(models):
    """training.compile: each decoder block compiled in place, one graph for all blocks and lengths, no graph
    break, the same logits and gradients as eager, and unchanged parameter names (the saved adapter's keys)."""
    import torch
    import torch._dynamo
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verifily_train.training.compiled import compile_repeated_blocks, repeated_blocks
    from verifily_train.model.lora import use_fused_lora_output

    tok = AutoTokenizer.from_pretrained(models["llama"])
    batches = [_batch(tok, n=6, seed=0), _batch(tok, n=5, seed=3)]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    use_fused_lora_output(model)
    names = [name for name, _ in model.named_parameters()]

    def run(batch):
        model.zero_grad()
        out = model(**batch, use_cache=False)  # as training runs it (a KV cache is state the graph would guard on)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager = [run(b) for b in batches]
    torch._dynamo.reset()
    counters.clear()
    assert len(repeated_blocks(model)) == 2
    assert compile_repeated_blocks(model, backend="aot_eager") == 2
    compiled = [run(b) for b in batches]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # both blocks, both lengths, one trace
    assert [name for name, _ in model.named_parameters()] == names
    for (e_logits, e_grads), (c_logits, c_grads) in zip(eager, compiled):
        torch.testing.assert_close(c_logits, e_logits, rtol=1e-5, atol=1e-5)
        for c, e in zip(c_grads, e_grads):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_training_compile_trains_through_compiled_blocks(models, sft_splits, tmp_path, monkeypatch):
    """``training.compile: true`` in the real train stage: the blocks are compiled, nn.Dropout stays (the 16-bit
    sampler's in-place draw would break the graph), and the adapter trains to the eager run's loss."""
    import torch._dynamo

    from verifily_train.config import load_config
    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.pipeline.runner import run_uncached
    from verifily_train.training import compiled
    from verifily_train.model.device import DevicePlan
    from verifily_train.model.loading import load_tokenizer
    from verifily_train.training.trainer import train_adapter

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # the trace and autograd without code generation
    manifests = {}
    for flag in ("false", "true"):
        cfg = load_config(None, ["task=sft", f"base_model={models['llama']}",
                                 f"data_paths.train={sft_splits['train']}", f"data_paths.test={sft_splits['test']}",
                                 "training.max_steps=3", "training.batch_size=4", f"training.compile={flag}",
                                 "runtime.progress=false"])
        fp = fingerprint_stage(cfg, tmp_path / "cache")
        tokenized = run_uncached("tokenize", cfg, fp, tmp_path / "tok", tmp_path)
        spec = fp.model_spec
        torch._dynamo.reset()
        manifests[flag] = train_adapter(cfg, spec, load_tokenizer(spec), tokenized, tmp_path / "tok",
                                        DevicePlan("cpu", "fp32"), tmp_path / f"out-{flag}", tmp_path / f"w-{flag}")
    torch._dynamo.reset()
    assert manifests["false"]["compiled_blocks"] == 0 and manifests["true"]["compiled_blocks"] == 2
    assert manifests["false"]["cheap_dropout_layers"] > 0 and manifests["true"]["cheap_dropout_layers"] == 0
    assert (tmp_path / "out-true" / "adapter" / "adapter_model.safetensors").is_file()
    # other dropout masks (nn.Dropout's sampler), same data and steps: the loss agrees closely, not bitwise
    assert abs(manifests["true"]["train_loss"] - manifests["false"]["train_loss"]) < 0.02 * manifests["false"]["train_loss"]


def test_compiled_blocks_are_found_in_decoder_only_and_encoder_decoder_models(models):
    """One list of blocks in a Llama, the encoder's and the decoder's in a T5; lists inside a block are not taken."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from verifily_train.training.compiled import repeated_blocks

    llama = AutoModelForCausalLM.from_pretrained(models["llama"])
    assert repeated_blocks(llama) == list(llama.model.layers)
    t5 = AutoModelForSeq2SeqLM.from_pretrained(models["t5"])
    assert repeated_blocks(t5) == list(t5.encoder.block) + list(t5.decoder.block)


def test_training_compile_without_its_code_generator_is_refused_before_any_work(monkeypatch, tmp_path, sft_splits,
                                                                                models):
    """No C++ compiler (CPU) or no Triton (CUDA): one line naming training.compile, from preflight's device check."""
    import shutil

    from verifily_train.errors import EnvironmentProblem
    from verifily_train.pipeline.preflight import model_and_device_checks
    from verifily_train.training import compiled

    compiled.check_compile_support("cpu")  # this machine has one
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EnvironmentProblem, match="training.compile.*C\\+\\+ compiler"):
        compiled.check_compile_support("cpu")
    real_find_spec = compiled.importlib.util.find_spec
    monkeypatch.setattr(compiled.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    with pytest.raises(EnvironmentProblem, match="training.compile.*Triton"):
        compiled.check_compile_support("cuda")

    from verifily_train.config import load_config

    cfg = load_config(None, ["task=sft", f"base_model={models['llama']}", f"data_paths.train={sft_splits['train']}",
                             "compute.device=cpu", "training.compile=true"])
    with pytest.raises(EnvironmentProblem, match="training.compile"):
        model_and_device_checks(cfg)
    model_and_device_checks(load_config(None, ["task=sft", f"base_model={models['llama']}",
                                               f"data_paths.train={sft_splits['train']}", "compute.device=cpu"]))


def _lora_family(family: str, dropout: float):
    """``_tiny_family`` with LoRA on every projection, its B weights random (not PEFT's zeros), the CPU levers on."""
    import torch
    from peft import LoraConfig, get_peft_model

    from verifily_train.model import lora
    from verifily_train.model.attention import use_fp32_attention

    model = get_peft_model(_tiny_family(family), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                            target_modules="all-linear"))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)  # at PEFT's zero init the adapter's output, and dropout's effect, is nil
    assert use_fp32_attention(model.get_base_model())
    lora.use_cheap_dropout(model)
    lora.use_fused_lora_output(model)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_last_layer_at_label_positions_gives_the_whole_layers_loss_and_gradients(family, dropout, monkeypatch):
    """The last decoder layer computed at label positions only: the same loss bit for bit, the same
    gradients to rounding, and the same dropout masks (the skipped rows' bits are still drawn)."""
    import torch

    from verifily_train.model import last_layer
    from verifily_train.training.loss import label_position_loss

    batch = _random_batch()
    results, calls = [], []
    real = last_layer._label_rows_forward
    monkeypatch.setattr(last_layer, "_label_rows_forward", lambda *a: calls.append(a[1].shape) or real(*a))
    for selected in (False, True):
        model = _lora_family(family, dropout)
        if selected:
            assert last_layer.use_label_rows_last_layer(model) == 1
        assert last_layer.selects_label_rows(model.get_base_model()) == selected
        calls.clear()
        model.train()
        torch.manual_seed(5)
        loss = label_position_loss(model, batch, pack=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, trainable), torch.rand(3)))
        assert len(calls) == int(selected)  # the label-rows forward ran, once, where it was installed
    (whole, whole_grads, whole_after), (rows, rows_grads, rows_after) = results
    assert torch.equal(whole, rows)
    assert torch.equal(whole_after, rows_after)  # the random stream moved by as much: every mask drawn the same
    for a, b in zip(whole_grads, rows_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(g.abs().max()) for g in rows_grads) > 0


def test_last_layer_at_labels_stays_off_where_it_is_not_exact_or_not_faster():
    """Off under bf16 autocast (measured slower), for families outside its list, under gradient
    checkpointing, and where a LoRA dropout would not draw the skipped rows' masks."""
    import torch
    from peft import LoraConfig, get_peft_model

    from verifily_train.model import last_layer
    from verifily_train.training.loss import label_position_loss

    assert not last_layer.supports(_tiny_family("phi3")) and not last_layer.supports(_tiny_family("olmo2"))
    plain_dropout = get_peft_model(_tiny_family("llama"), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    assert last_layer.use_label_rows_last_layer(plain_dropout) == 0  # torch's nn.Dropout: masks of the computed rows only
    checkpointed = _tiny_family("llama")
    checkpointed.gradient_checkpointing_enable()
    assert last_layer.use_label_rows_last_layer(checkpointed) == 0
    no_dropout = get_peft_model(_tiny_family("llama"), LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    assert last_layer.use_label_rows_last_layer(no_dropout) == 1
    unlabelled = dict(_random_batch(), labels=torch.full_like(_random_batch()["labels"], -100))
    from verifily_train.model.attention import use_fp32_attention

    assert use_fp32_attention(no_dropout.get_base_model())
    no_dropout.train()
    assert float(label_position_loss(no_dropout, unlabelled, pack=True)) == 0.0  # no label: nothing selected
    # without a packed selection (evaluation, generation, the plain forward) the layer computes every position
    no_dropout.eval()
    with torch.no_grad():
        batch = _random_batch()
        out = no_dropout(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"])
def test_bucket_padding_rows_leave_loss_gradients_and_dropout_stream_unchanged(family, dropout, precision):
    """Packed rows padded to a longer row count (rows of their own, labels -100): the same loss and gradients
    bit for bit, and the 16-bit dropout draws no bits for the padding (the stream is unmoved)."""
    import torch

    from verifily_train.model import lora
    from verifily_train.training.loss import label_position_loss, pad_rows

    batch = _random_batch()
    real = int(batch["attention_mask"].sum())
    for extra in (50, 2):
        padded = pad_rows(batch["input_ids"], batch["attention_mask"], batch["labels"], real + extra)
        assert padded[3] == real and int(padded[1].sum()) == real + extra
        assert int(padded[1].sum(dim=1).max()) == int(batch["attention_mask"].sum(dim=1).max())  # no wider rows
        results = []
        for b in (None, lambda n, extra=extra: n + extra):
            model = _lora_family(family, dropout)
            if precision == "bf16":
                lora.store_frozen_linears_in(model, torch.bfloat16)
            model.train()
            torch.manual_seed(5)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = label_position_loss(model, batch, pack=True, pad_to=b)
            trainable = [p for p in model.parameters() if p.requires_grad]
            results.append((loss, torch.autograd.grad(loss, trainable), torch.rand(3)))
        (plain, plain_grads, plain_after), (padded_loss, padded_grads, padded_after) = results
        assert torch.equal(plain, padded_loss)
        assert torch.equal(plain_after, padded_after)  # no bits drawn for the padding rows
        for a, b in zip(plain_grads, padded_grads):
            assert torch.equal(a, b)
        assert max(float(g.abs().max()) for g in padded_grads) > 0


def test_bucketed_packed_rows_train_the_same_bf16_adapter_bit_for_bit(models, sft_splits, tmp_path):
    """The real train stage under bf16 with and without the bucket: the same losses and adapter tensors; the
    bucket stays off where torch's own dropout would draw bits for the padding rows."""
    import torch
    from peft import LoraConfig, get_peft_model

    from verifily_train.training.speed import SpeedPlan, apply_to_adapter

    on, on_tensors, _ = _train_bf16(models, sft_splits, tmp_path / "on", True)
    off, off_tensors, _ = _train_bf16(models, sft_splits, tmp_path / "off", True, bucket_packed_tokens=False)
    assert on["packed_row_counts"] == "multiple of 64" and off["packed_row_counts"] is None
    assert on["train_loss"] == off["train_loss"]
    assert on_tensors.keys() == off_tensors.keys()
    assert all(torch.equal(on_tensors[k], off_tensors[k]) for k in on_tensors)
    plain_dropout = get_peft_model(_tiny_family("llama"), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    wish = SpeedPlan(label_only_head=True, cpu_fp32_attention=True, pack_rows=True, bucket_packed_tokens=True,
                     trim_dead_tails=True, lean_steps=True, precision="bf16")
    assert apply_to_adapter(wish, plain_dropout).plan.bucket_packed_tokens is False
    no_dropout = get_peft_model(_tiny_family("llama"), LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    assert apply_to_adapter(wish, no_dropout).plan.bucket_packed_tokens is True


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"])
def test_cutting_dead_tails_leaves_loss_gradients_and_dropout_stream_unchanged(family, dropout):
    """Packed rows without the positions after each row's last label-reading one (SFT: the final token), alone,
    with the label-rows last layer, and with bucket padding under bf16: the same loss bit for bit, gradients
    to rounding, and every dropout bit still drawn (the stream moves by as much)."""
    import torch

    from verifily_train.model import last_layer, lora
    from verifily_train.training.loss import dead_tails, label_position_loss

    batch = _random_batch()
    mask, cut_rows = dead_tails(batch["attention_mask"], batch["labels"])
    lengths = batch["attention_mask"].sum(dim=1)
    # every row ends on a label: one token less each, but the one-token row (a row keeps a token)
    assert mask.sum(dim=1).tolist() == [max(int(n) - 1, 1) for n in lengths]
    assert cut_rows.shape[0] == int(mask.sum()) and int(cut_rows.max()) < int(lengths.sum())
    # a row's last token never predicts a label: only one-token rows have nothing to cut
    one_token = batch["attention_mask"][-1:]
    assert dead_tails(one_token, batch["labels"][-1:]) is None
    arms = [("fp32", {}), ("fp32", {"trim": True}), ("fp32-last", {"trim": True}), ("bf16", {}),
            ("bf16", {"trim": True, "pad_to": lambda n: n + 9})]
    results = {}
    for arm, (precision, kwargs) in enumerate(arms):
        model = _lora_family(family, dropout)
        if precision == "fp32-last" and not last_layer.use_label_rows_last_layer(model):
            continue  # phi3, olmo2: no label-rows last layer
        if precision == "bf16":
            lora.store_frozen_linears_in(model, torch.bfloat16)
        model.train()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = label_position_loss(model, batch, pack=True, **kwargs)
        trainable = [p for p in model.parameters() if p.requires_grad]
        results[arm] = (precision[:4], loss, torch.autograd.grad(loss, trainable), torch.rand(3))
    for arm, (precision, loss, grads, after) in results.items():
        _, plain, plain_grads, plain_after = results[0 if precision == "fp32" else 3]
        assert torch.equal(loss, plain), (arms[arm], float(loss), float(plain))
        assert torch.equal(after, plain_after)
        for a, b in zip(grads, plain_grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7) if precision == "fp32" else torch.allclose(a, b, rtol=1e-2, atol=1e-4)


def test_row_counts_pad_small_models_to_a_bucket_and_leave_larger_ones_unpadded():
    """The next multiple of 64 for a model up to the size limit (outside its embeddings), no padding above it."""
    from verifily_train.training import loss as loss_module
    from verifily_train.training.loss import RowCounts

    bucket = RowCounts(64)
    assert [bucket(n) for n in (1, 64, 65, 183)] == [64, 64, 128, 192]
    small = _tiny_family("llama")
    body = sum(p.numel() for n, p in small.named_parameters() if "embed" not in n and "lm_head" not in n)
    saved = loss_module.PACK_BUCKET_MAX_BODY_PARAMETERS
    try:
        loss_module.PACK_BUCKET_MAX_BODY_PARAMETERS = body
        assert RowCounts.for_model(small).bucket == 64
        loss_module.PACK_BUCKET_MAX_BODY_PARAMETERS = body - 1
        assert RowCounts.for_model(small) is None
    finally:
        loss_module.PACK_BUCKET_MAX_BODY_PARAMETERS = saved
